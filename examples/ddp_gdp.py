"""GDP under torch.distributed: ``prepare`` once per process, DistributedDataParallel around the
prepared module, a DistributedSampler, and rank 0 alone writes the result.

    torchrun --nproc_per_node=2 examples/ddp_gdp.py --steps 60 --out runs/ddp

Why it needs nothing else: DDP averages every gradient that reaches the module's parameters, the
gates included, and GDP's own state (lambda, eps, which gates are snapped) is computed from the
gates and the step count alone, so it is identical on every rank without communication.
``tests/test_distributed.py`` runs this file's ``run`` on 2 gloo processes and checks that.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fxprune
from fxprune.data import digits_loaders


def small_net() -> nn.Module:
    """A conv net without BatchNorm (per-rank batch statistics would differ from one process's)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def run(rank: int, world: int, steps: int, batch: int, seed: int = 0) -> fxprune.Prepared:
    """Train GDP for ``steps`` steps of ``batch`` examples per process; returns the Prepared."""
    data = digits_loaders(image_size=16, channels=1, batch_size=batch, seed=0)
    sampler = DistributedSampler(data.train.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data.train.dataset, batch_size=batch, sampler=sampler, drop_last=True)
    torch.manual_seed(seed)  # the same initial weights on every rank
    prepared = fxprune.prepare(small_net(), "gdp", fxprune.Budget(flops=0.5), data.example_inputs(),
                               total_steps=steps)
    module = DistributedDataParallel(prepared.module) if world > 1 else prepared.module
    opt = torch.optim.SGD([{"params": prepared.model_parameters()},
                           {"params": prepared.method_parameters(), "lr": 0.2, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, weight_decay=5e-4)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step == steps:
                break
            loss = nn.functional.cross_entropy(module(x), y) + prepared.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            prepared.after_backward()
            opt.step()
            prepared.step()
            step += 1
        epoch += 1
    return prepared


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="examples per process and step")
    p.add_argument("--out", default="runs/ddp")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    prepared = run(rank, world, args.steps, args.batch)
    if rank == 0:  # one process writes; the decision is the same on every rank
        pruned = fxprune.finalize(prepared)
        os.makedirs(args.out, exist_ok=True)
        fxprune.save(pruned, os.path.join(args.out, "model.fxprune"))
        print(f"rank 0: {prepared.measured} -> {args.out}/model.fxprune")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
