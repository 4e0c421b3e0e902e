"""How much of the torchvision zoo does the compiler spine handle, how fast, and in how much memory?

Every model is measured in its own fresh process (``zoo_child.py``), with torch pinned to one
thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), at 224x224 batch 1 unless the
model needs another size. The model is built with ``weights=None`` and its BatchNorm statistics
calibrated on the example input plus 3 random images (activations keep a normal scale instead of
decaying into denormals or blowing up). Per model:

* the spine: traced? (or the TraceError), channel groups, prunable groups, prunable channel %;
  with random gates (half of every prunable group at exactly 0) the relative output difference
  ``max|fin - gated| / max|gated|``, parameters before and after; after a float32
  EquivalenceError, the float64 re-check (randomly initialised deep nets with random gates can
  amplify float32 rounding beyond the 1e-4 check: efficientnet_b2..b6);
* time (process CPU seconds, wall clock beside): one eager ``torch.no_grad()`` forward of the
  dense model is the unit (median of the forwards interleaved with the timed runs, 3 before each);
  each phase of trace -> analyze -> insert_gates -> finalize (with its equivalence check) in
  seconds and in forwards, median of ``--repeats`` runs after a first (cold) run;
* memory (Linux): peak RSS of that first run above the model's settled RSS, per phase and overall,
  in units of the model's parameter bytes, next to one forward's activation peak in the same unit;
  the traced, gated and finalized modules are all kept alive, as a user script holds them;
* with ``--tp``: Torch-Pruning's ``MagnitudePruner(...).step()`` on a copy of the same model in
  the same process, interleaved with fxprune's runs (``pip install -r benchmarks/requirements.txt``;
  it is not a dependency of fxprune, and its columns are skipped when it does not import).

Memory peaks of small models depend on glibc's dynamic mmap threshold (what earlier phases left
in the heap); ``MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/zoo.py ...`` fixes it and makes
them repeat (the children inherit the environment; the command line in the results shows it).

A memory watchdog kills a model's process whose RSS passes ``--rss-limit-gb``, or when the
machine's available memory falls under 1 GB, and records at what RSS and in which phase.

    python benchmarks/zoo.py --quick                  # the default test-suite list (14 models)
    python benchmarks/zoo.py --models resnet18,vgg11  # chosen models
    python benchmarks/zoo.py --tp                     # vs Torch-Pruning on the 4 reference models
    python benchmarks/zoo.py --quick --memory-only    # one pipeline run per model: memory table
    python benchmarks/zoo.py --models regnet_y_128gf  # a huge model: memory run only, watchdog
    python benchmarks/zoo.py                          # every classification model (long)

Results go to benchmarks/results/zoo.{json,md} (``--out`` changes the stem), rewritten
atomically after every model so that an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torchvision

from fxprune.files import write_atomic
from zoo_common import PHASES, input_size, proc_status

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHILD = HERE / "zoo_child.py"
QUICK = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
    "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x1_0", "regnet_y_400mf", "squeezenet1_1",
    "googlenet", "vgg11_bn", "mnasnet0_5", "deeplabv3_mobilenet_v3_large",
]
# issue 8's time targets: the whole pipeline in eager forwards of the dense model
TARGET_FORWARDS = {"resnet50": 4, "densenet121": 4, "mobilenet_v2": 8, "efficientnet_b0": 8}
TP_MODELS = list(TARGET_FORWARDS)  # the geometric mean of the speed ratio is over these
HUGE = {  # not in the full zoo unless --include-huge; measured with one pipeline run, no repeats
    "vit_h_14": "632M parameters", "regnet_y_128gf": "644M parameters",
    "vit_l_16": "304M parameters", "vit_l_32": "306M parameters",
}
GB = 1024 ** 3
MB = 1024 ** 2


# ---- running one model in a child process under a watchdog ------------------------------------

@dataclass
class Limits:
    rss_bytes: int
    min_available_bytes: int
    timeout_s: float


def mem_available() -> int:
    """The machine's MemAvailable in bytes (unbounded where /proc/meminfo does not exist)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return sys.maxsize


def over_limit(rss: int, elapsed: float, limits: Limits) -> str | None:
    if rss > limits.rss_bytes:
        return f"RSS over the {limits.rss_bytes / GB:g} GB limit"
    if mem_available() < limits.min_available_bytes:
        return f"the machine's available memory fell under {limits.min_available_bytes / GB:g} GB"
    if elapsed > limits.timeout_s:
        return f"ran over the {limits.timeout_s:.0f} s timeout"
    return None


def watch(proc: subprocess.Popen, limits: Limits) -> tuple[str | None, int]:
    """Poll the child's RSS every 50 ms until it exits; stop it past a limit.

    Returns (why it was stopped or None, the largest RSS sampled)."""
    start, peak = time.monotonic(), 0
    while proc.poll() is None:
        rss = proc_status(proc.pid).get("VmRSS", 0)
        peak = max(peak, rss)
        why = over_limit(rss, time.monotonic() - start, limits)
        if why:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return why, peak
        time.sleep(0.05)
    return None, peak


def merge_lines(text: str) -> dict[str, Any]:
    """The child's JSON lines merged in order (later findings override; other output ignored)."""
    row: dict[str, Any] = {}
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            row.update(item)
    return row


def last_line(f: IO[str]) -> str:
    f.seek(0)
    lines = [line for line in f.read().splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def run_child(job: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Measure one model in a fresh process; the row says if and why the watchdog stopped it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    size = input_size(job["model"], job["size"])
    row: dict[str, Any] = {"model": job["model"], "input": [1, 3, size, size]}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(job)],
                                stdout=out, stderr=err, env=env, text=True)
        stopped, sampled = watch(proc, limits)
        out.seek(0)
        row.update(merge_lines(out.read()))
        row["sampled_peak_rss"] = sampled
        if stopped:
            row["killed"] = (f"killed by the watchdog at {sampled / GB:.1f} GB RSS during "
                             f"{row.get('phase', 'start-up')}: {stopped}")
        elif proc.returncode != 0:
            row.setdefault("error", f"process ended with status {proc.returncode} during "
                                    f"{row.get('phase', 'start-up')}: {last_line(err)}")
    if row.get("phase") == "done":
        del row["phase"]
    return row


def job_for(name: str, args: argparse.Namespace) -> dict[str, Any]:
    huge = name in HUGE
    return {"model": name, "size": args.size, "tp": args.tp and not huge,
            "repeats": 0 if (huge or args.memory_only) else args.repeats,
            "forward_repeats": 3 if huge else 5}


# ---- reporting ------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "torch_pruning": version("torch-pruning"),
        "fxprune": fxprune_source(),
        "platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
        "mem_total_gb": round(_meminfo_total() / GB, 1), "torch_threads_in_measurements": 1,
    }


def fxprune_source() -> str:
    """The commit of this checkout when fxprune is imported from it (uncommitted changes to the
    package flagged), else the directory it is imported from."""
    spec = importlib.util.find_spec("fxprune")
    if spec is None or spec.origin is None:
        return "not importable"
    path = Path(spec.origin).resolve().parent
    if path.parent != HERE.parent:
        return str(path)

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(HERE.parent), *cmd], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "fxprune", "passes", "backends")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _meminfo_total() -> int:
    line = next((x for x in _read("/proc/meminfo").splitlines() if x.startswith("MemTotal:")), "")
    return int(line.split()[1]) * 1024 if line else 0


def fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def per(r: dict[str, Any], key: str, unit_key: str, spec: str = ".2f") -> str:
    """``r[key] / r[unit_key]`` formatted, or blank where either is missing."""
    v, unit = r.get(key), r.get(unit_key)
    return "" if v is None or not unit else format(v / unit, spec)


def note(r: dict[str, Any]) -> str:
    text = r.get("killed") or r.get("error") or r.get("finalize_error") or ""
    if "rel_diff_fp64" in r:
        text = (f"float32: {text.split(';')[0]}; but the float32 gated model is itself "
                f"{r['fp32_noise']:.1e} from its float64 twin, and in float64 finalize matches "
                f"to {r['rel_diff_fp64']:.1e}")
    if r.get("leaf_modules"):
        text = f"leaves: {', '.join(r['leaf_modules'])}. " + text
    return text.replace("|", "/")


TRACED = {True: "yes", False: "no", None: "–"}  # None: stopped before tracing finished


def spine_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Spine", "",
        "Random gates: half of every prunable group at exactly 0, the rest uniform in [0.25, 1.75). "
        "`rel diff` = max|finalized - gated| / max|gated| on the example input.", "",
        "| model | input | traced | groups | prunable | prunable ch % | rel diff | params M before → after | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = r.get("params_after")
        params = f"{r.get('params', 0) / 1e6:.2f}" + (f" → {after / 1e6:.2f}" if after is not None else "")
        lines.append(
            f"| {r['model']} | {r['input'][2]} | {TRACED[r.get('traced')]} "
            f"| {fmt(r.get('groups'), 'd')} | {fmt(r.get('prunable_groups'), 'd')} "
            f"| {fmt(r.get('prunable_channel_pct'), '.1f')} | {fmt(r.get('rel_diff'), '.1e')} "
            f"| {params} | {note(r)} |")
    ok = [r for r in rows if "rel_diff" in r]
    lines += ["", f"{len(rows)} models: {sum(bool(r.get('traced')) for r in rows)} traced, "
              f"{len(ok)} finalized equivalently (max rel diff "
              f"{max((r['rel_diff'] for r in ok), default=0):.1e}), "
              f"{sum('finalize_error' in r for r in rows)} finalize errors "
              f"({sum('rel_diff_fp64' in r for r in rows)} of them float32 noise of an ill-conditioned "
              f"random model: exact in float64), {sum('killed' in r for r in rows)} stopped by the watchdog."]
    return lines


def phase_times(r: dict[str, Any]) -> tuple[dict[str, float], float, float, int]:
    """(phase seconds, total seconds, total wall seconds, timed runs): the repeats' medians, else
    the first run's."""
    if "phase_s" in r:
        return r["phase_s"], r["total_s"], r["total_wall_s"], len(r["total_runs"])
    cold = r.get("cold_s") or {}
    return cold, sum(cold.values()), sum((r.get("cold_wall_s") or {}).values()), 0


def time_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Time", "",
        "Unit `fwd` = one eager `torch.no_grad()` forward of the dense model on the example input "
        "(`forward ms`): the median of the forwards interleaved with the timed runs (3 before each), "
        "or with 0 runs of 5 after a warm-up. Phases: `trace` = `fxprune.trace` (copy-on-write "
        "copy, concrete trace that records every shape; convs and linears are not computed); "
        "`analyze` = `fxprune.analyze`; `gates` = "
        "`insert_gates`; `finalize` = `finalize` including its equivalence check against the gated "
        "model. Each is the median over `runs` timed runs that follow a first (cold) run; "
        "`total` is the median of the runs' sums; `first run` is the cold run's sum (0 runs: only "
        "the first run was made, and the phase columns are its times). `wall` = `total (fwd)` in "
        "wall-clock time. `code` = what the finalized module's first call costs beyond a later "
        "call (writing and compiling its Python code, which finalize leaves to that call; a script "
        "that runs or exports the pruned model pays it), median over the timed runs. `target`: "
        "issue 8's bound on `total (fwd)`, then on `total + code`.", "",
        "| model | forward ms | trace (fwd) | analyze (fwd) | gates (fwd) | finalize (fwd) "
        "| total s | total (fwd) | wall (fwd) | first run (fwd) | runs | code (fwd) | total + code (fwd) "
        "| target (fwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases, total, wall, runs = phase_times(r)
        fwd = r.get("forward_s")
        if not phases or not fwd:
            continue
        cells = [fmt(phases[p] / fwd, ".2f") if p in phases else "" for p in PHASES]
        cold = sum(r["cold_s"].values()) / fwd if r.get("cold_s") else None
        target = TARGET_FORWARDS.get(r["model"])
        code = r["first_call_code_s"] / fwd if "first_call_code_s" in r else None
        with_code = total / fwd + code if code is not None else None
        verdict = "" if target is None else f"≤ {target} " + " ".join(
            "✓" if v <= target else "✗" for v in (total / fwd, with_code) if v is not None)
        lines.append(f"| {r['model']} | {fwd * 1e3:.1f} | {' | '.join(cells)} | {total:.3f} "
                     f"| {total / fwd:.1f} | {wall / r['forward_wall_s']:.1f} "
                     f"| {fmt(cold, '.1f')} | {runs} | {fmt(code, '.2f')} | {fmt(with_code, '.1f')} | {verdict} |")
    return lines


def tp_table(rows: list[dict[str, Any]]) -> list[str]:
    measured = [r for r in rows if "tp_s" in r or "tp_error" in r]
    if not measured:
        return []
    lines = [
        "## fxprune vs Torch-Pruning", "",
        "Same process, same model and input, 1 thread, runs interleaved. `fxprune` = trace + analyze + "
        "insert_gates + finalize with its equivalence check (random half gates); `Torch-Pruning` = "
        "`tp.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=1), pruning_ratio=0.5, "
        "ignored_layers=[final classifier]).step()` on a deep copy (the copy is not timed; building "
        "the pruner is: its dependency graph is part of its cost as fxprune's trace + analyze are). "
        "Torch-Pruning checks nothing afterwards. `fxprune s`, `Torch-Pruning s`: medians of the timed "
        "runs; `speed-up` = the median over the repeats of Torch-Pruning s / fxprune s within one "
        "repeat (> 1: fxprune is faster; each repeat runs both back to back, so drift of a shared "
        "machine cancels within the pair, where a ratio of the two medians pairs runs minutes apart); "
        "`wall`: the same in wall-clock time.", "",
        "| model | fxprune s | fxprune (fwd) | Torch-Pruning s | Torch-Pruning (fwd) | speed-up | wall | "
        "params M after: fxprune / TP | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        fx_s = r.get("total_s")
        ratio, wall = paired_speedup(r), paired_speedup(r, wall=True)
        after = " / ".join(fmt(r[k] / 1e6, ".2f") if k in r else "–" for k in ("params_after", "tp_params_after"))
        lines.append(f"| {r['model']} | {fmt(fx_s, '.3f')} | {per(r, 'total_s', 'forward_s', '.1f')} "
                     f"| {fmt(r.get('tp_s'), '.3f')} | {per(r, 'tp_s', 'forward_s', '.1f')} "
                     f"| {fmt(ratio, '.2f')} | {fmt(wall, '.2f')} | {after} | {r.get('tp_error', '').replace('|', '/')} |")
    ratios = {r["model"]: paired_speedup(r) for r in measured}
    coded = {r["model"]: paired_speedup(r, code=r["first_call_code_s"]) for r in measured if "first_call_code_s" in r}
    ratios, coded = ({m: v for m, v in d.items() if v is not None} for d in (ratios, coded))
    if all(m in ratios for m in TP_MODELS):
        line = f"Geometric mean of the speed-up over {', '.join(TP_MODELS)}: **{gmean(ratios):.2f}x** "
        if all(m in coded for m in TP_MODELS):
            line += f"({gmean(coded):.2f}x counting the finalized module's first-call code, see Time) "
        lines += ["", line + "(issue 8's target: at least 2x)."]
    return lines


def paired_speedup(r: dict[str, Any], code: float = 0.0, wall: bool = False) -> float | None:
    """Median over the timed repeats of Torch-Pruning's time / fxprune's (plus ``code``, the
    finalized module's first-call cost) in the same repeat; None without both series."""
    fx_runs = r.get("total_wall_runs" if wall else "total_runs")
    tp_runs = r.get("tp_wall_runs" if wall else "tp_runs")
    if not fx_runs or not tp_runs or len(fx_runs) != len(tp_runs):
        return None
    return statistics.median(tp / (fx + code) for fx, tp in zip(fx_runs, tp_runs))


def gmean(ratios: dict[str, float]) -> float:
    return math.exp(sum(math.log(ratios[m]) for m in TP_MODELS) / len(TP_MODELS))


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Memory", "",
        "Each model in a fresh process (Linux RSS from /proc/self/status). `model RSS` = the process's "
        "resident memory with the calibrated model built, after warm-up forwards, garbage collection and "
        "`malloc_trim` (the baseline). `P` = the model's parameter bytes. `forward` = peak RSS above the "
        "baseline during one eager `torch.no_grad()` forward (its activations). `pipeline peak` = peak "
        "RSS above the baseline during the first trace -> analyze -> insert_gates -> finalize run "
        "(VmHWM, reset through /proc/self/clear_refs as each phase starts; the per-phase columns), "
        "with the traced, gated and finalized modules all kept alive; `held` = RSS above the baseline "
        "afterwards with all three still alive. `peak − forward` = (pipeline peak − forward) / P: "
        "issue 8's target `extra ≤ 2 P + one forward's activations` holds when it is ≤ 2. "
        "`TP peak` = Torch-Pruning's peak above its own settled baseline, its model copy included. "
        "With glibc's default allocator the small models' peaks move between runs of the same code "
        "(mobilenet_v2's P is only 13 MB), because glibc raises its mmap "
        "threshold as large blocks are freed, so whether a phase's tensors get fresh pages depends on "
        "what earlier phases left in its heap; `MALLOC_MMAP_THRESHOLD_=131072` in the environment "
        "(a fixed threshold, shown in the command) makes them repeat to the 0.01 P.", "",
        "| model | params M | P MB | model RSS MB | forward (×P) | pipeline peak (×P) | peak − forward (×P) "
        "| held (×P) | trace / analyze / gates / finalize peak (×P) | TP peak (×P) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("param_bytes")
        if not p or "mem_model_rss" not in r:
            continue
        peak = r.get("mem_pipeline_peak")
        above = (peak - r["mem_forward"]) / p if peak is not None and "mem_forward" in r else None
        phases = " / ".join(per(r, f"mem_peak_{ph}", "param_bytes") or "–" for ph in PHASES)
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {p / MB:.0f} | {r['mem_model_rss'] / MB:.0f} "
            f"| {per(r, 'mem_forward', 'param_bytes')} | {per(r, 'mem_pipeline_peak', 'param_bytes')} "
            f"| {fmt(above, '.2f')} | {per(r, 'mem_pipeline_held', 'param_bytes')} | {phases} "
            f"| {per(r, 'tp_mem_peak', 'param_bytes')} | {(r.get('killed') or '').replace('|', '/')} |")
    return lines


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], config: dict[str, Any]) -> str:
    header = [
        "# fxprune on the torchvision zoo", "",
        f"{info['date']}, torch {info['torch']}, torchvision {info['torchvision']}, torch-pruning "
        f"{info['torch_pruning'] or 'not installed'}; fxprune {info['fxprune']}; {info['cpu']} ({info['cpus']} CPUs, "
        f"{info['mem_total_gb']} GB). **Torch pinned to 1 thread in every measurement** "
        "(`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`); times are process CPU time (on one "
        "thread the wall time of an idle machine; other processes on a shared machine do not inflate "
        "it), wall-clock ratios beside them; each model in a fresh process; "
        f"input batch 1 at {config['size']}x{config['size']} unless the model needs another size.", "",
        f"Command: `{config['command']}`", "",
    ]
    sections = [spine_table(rows), time_table(rows), tp_table(rows), memory_table(rows)]
    return "\n".join(header + [line for s in sections if s for line in s + [""]])


# ---- command line ----------------------------------------------------------------------------

def select_models(args: argparse.Namespace) -> list[str]:
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    elif args.quick:
        names = list(QUICK)
    elif args.tp:
        names = list(TP_MODELS)
    else:
        names = [n for n in torchvision.models.list_models(module=torchvision.models) if n not in HUGE]
    if args.include_huge:
        names += [n for n in HUGE if n not in names]
    return names


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated model names (torchvision classification or segmentation)")
    ap.add_argument("--quick", action="store_true", help="the default test-suite list")
    ap.add_argument("--tp", action="store_true",
                    help=f"also time Torch-Pruning; without --models/--quick the models are {TP_MODELS}")
    ap.add_argument("--memory-only", action="store_true",
                    help="one pipeline run per model (memory and first-run times), no timed repeats")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the first run (default 3)")
    ap.add_argument("--size", type=int, default=224, help="input height/width (default 224)")
    ap.add_argument("--include-huge", action="store_true",
                    help=f"also run {sorted(HUGE)} (memory run only; named in --models they run anyway)")
    ap.add_argument("--rss-limit-gb", type=float, default=20.0,
                    help="watchdog: stop a model's process past this RSS (default 20)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="watchdog: seconds per model (default 3600)")
    ap.add_argument("--out", default="zoo", help="result file stem in benchmarks/results/")
    return ap.parse_args()


def summary_line(row: dict[str, Any]) -> str:
    keys = ("model", "traced", "forward_s", "total_s", "tp_s", "mem_pipeline_peak", "param_bytes",
            "rel_diff", "killed", "error", "finalize_error", "tp_error")
    return json.dumps({k: row[k] for k in keys if k in row})


def main() -> None:
    args = parse_args()
    names = select_models(args)
    limits = Limits(int(args.rss_limit_gb * GB), 1 * GB, args.timeout)
    info = machine()
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # passed on to the children with the environment
    prefix = [f"MALLOC_MMAP_THRESHOLD_={malloc}"] if malloc else []
    config = {"command": " ".join([*prefix, "python", "benchmarks/zoo.py", *sys.argv[1:]]), "models": names,
              "size": args.size, "repeats": 0 if args.memory_only else args.repeats, "tp": args.tp,
              "gating": "uniform [0.25, 1.75), half of each group 0, seed 0",
              "rss_limit_gb": args.rss_limit_gb, "timeout_s": args.timeout}
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows.append(run_child(job_for(name, args), limits))
        print(summary_line(rows[-1]), flush=True)
        write_atomic(RESULTS / f"{args.out}.json",
                     json.dumps({"machine": info, "config": config, "results": rows}, indent=1))
        write_atomic(RESULTS / f"{args.out}.md", markdown(rows, info, config))
    print(markdown(rows, info, config))


if __name__ == "__main__":
    main()
