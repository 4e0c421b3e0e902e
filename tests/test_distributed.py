"""GDP under torch.distributed (issue 15): 2 CPU processes with gloo and a DistributedSampler hold
identical gates and decisions, equal to one process on the same global batches."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_gdp.py"
STEPS, BATCH = 12, 16


def _example():
    spec = importlib.util.spec_from_file_location("ddp_gdp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(prepared) -> dict:
    gates = {gid: g.values().detach().clone() for gid, g in prepared.method.gates.items()}
    keep = {gid: torch.as_tensor(m) for gid, m in prepared.method.decide(prepared.ctx).keep.items()}
    return {"gates": gates, "keep": keep, "lam": prepared.method.lam}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        prepared = _example().run(rank, world, STEPS, BATCH)
        torch.save(_state(prepared), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree_with_each_other_and_with_one_process(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for gid in ranks[0]["gates"]:
        assert torch.equal(ranks[0]["gates"][gid], ranks[1]["gates"][gid])  # DDP keeps them identical
        assert torch.equal(ranks[0]["keep"][gid], ranks[1]["keep"][gid])
    assert ranks[0]["lam"] == ranks[1]["lam"]
    torch.set_num_threads(1)
    single = _state(_example().run(0, 1, STEPS, 2 * BATCH))  # the same global batches in one process
    for gid, gate in single["gates"].items():
        np.testing.assert_allclose(ranks[0]["gates"][gid].numpy(), gate.numpy(), rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0]["keep"][gid], single["keep"][gid])
    assert any((~k).any() for k in single["keep"].values())  # GDP removed units within the run
    assert single["lam"] != 1.0  # and steered its penalty
