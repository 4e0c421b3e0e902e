"""Where does the pipeline spend its time? cProfile of one trace -> analyze -> insert_gates ->
finalize run on one thread, with the model and input that zoo.py uses: a warm run (after a cold
one), or with ``--cold`` the process's first run (lazy imports, first-call initialisation).

    python benchmarks/profile_pipeline.py resnet50 --top 30 --sort cumulative
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from zoo_child import build, forward_times, run_pipeline
from zoo_common import input_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--top", type=int, default=30, help="rows to print")
    ap.add_argument("--sort", default="cumulative", help="pstats sort key: cumulative, tottime, ...")
    ap.add_argument("--cold", action="store_true", help="profile the first run instead of a warm one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, x = build(args.model, input_size(args.model, args.size))
    forward_s = min(t.cpu for t in forward_times(model, x, 3))
    if not args.cold:
        run_pipeline(model, x)  # the cold run: imports and one-time initialisation
    profiler = cProfile.Profile()
    p = profiler.runcall(run_pipeline, model, x)
    print(f"{args.model}: forward {forward_s * 1e3:.1f} ms (CPU); phases under the profiler (CPU s): "
          + ", ".join(f"{k} {v.cpu:.3f}" for k, v in p.took.items()))
    pstats.Stats(profiler).strip_dirs().sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
