"""2:4 semi-structured sparsity on NVIDIA GPUs: the one place where zero weights run faster.

Dense runtimes (ONNX Runtime on CPU, cuDNN) multiply zeros like any other weight, so an
unstructured sparse model is smaller to store but not faster. Sparse tensor cores (compute
capability 8.0 and later) skip half of a matmul when its weight keeps at most 2 of every 4
consecutive entries along the reduction dimension, which is what ``Budget(nm=(2, 4))`` produces
(along the input dimension). ``to_semi_structured`` converts the layers that qualify, through
``torch.sparse.to_sparse_semi_structured``:
- ``nn.Linear``: its weight (out, in) is already (rows, reduction);
- a 1x1, ungrouped, unstrided ``nn.Conv2d`` (a matmul over channels): replaced by a module that
  runs it as a linear layer on channels-last activations.
Other convolutions (k x k, grouped, depthwise) stay dense: torch offers no semi-structured
convolution. torch's kernels need fp16/bf16 (or int8) on CUDA and a minimum weight shape; a
layer it refuses stays dense and the reason is returned.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fxprune.errors import BackendUnavailable, ConfigError


def require_sparse24() -> None:
    """Check that 2:4 sparse kernels can run here. Raises ``BackendUnavailable`` saying why not
    (no CUDA device, a GPU older than compute capability 8.0, a torch without the API)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise BackendUnavailable(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured; "
                                 "install torch >= 2.1 for 2:4 sparse kernels")
    if not torch.cuda.is_available():
        raise BackendUnavailable("2:4 sparse kernels need an NVIDIA GPU (sparse tensor cores), but "
                                 "torch.cuda.is_available() is False; on CPU a sparse model runs at dense speed "
                                 "(export it to ONNX for exactness, not speed)")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise BackendUnavailable(f"2:4 sparse kernels need compute capability >= 8.0 (Ampere or later); this GPU, "
                                 f"{torch.cuda.get_device_name()}, is {major}.{minor}")


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every 4 consecutive entries of each row of ``weight`` (reduction dim last, as a
    linear weight) hold at most 2 non-zeros. Raises nothing."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % 4:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


class PointwiseAsLinear(nn.Module):
    """A 1x1 convolution computed as a linear layer on channels-last activations, so its weight
    can be a semi-structured sparse matrix."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.stride == (1, 1) and module.padding in ((0, 0), "valid") and module.dilation == (1, 1))


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16,
                       device: str = "cuda") -> tuple[nn.Module, list[str], dict[str, str]]:
    """A copy of ``model`` in ``dtype`` on ``device`` whose 2:4-sparse linear and 1x1 conv weights
    are semi-structured sparse tensors; returns (copy, converted layer names, layers kept dense
    and why). The user's model is not modified. Raises ``BackendUnavailable`` where the kernels
    cannot run (``require_sparse24``) and ``ConfigError`` when no layer qualifies."""
    require_sparse24()
    work = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    converted: list[str] = []
    dense: dict[str, str] = {}
    for name, module in list(work.named_modules()):
        target = module
        if _pointwise(module):
            target = PointwiseAsLinear(module).to(device=device, dtype=dtype)
        elif not isinstance(module, nn.Linear):
            continue
        if not is_2_4(target.weight):
            dense[name] = "its weight is not 2:4 sparse along the input dimension"
            continue
        try:
            sparse = torch.sparse.to_sparse_semi_structured(target.weight.detach())
        except (RuntimeError, ValueError) as exc:  # shape or dtype the kernels do not take
            dense[name] = f"torch refused it: {exc}".splitlines()[0]
            continue
        target.weight = nn.Parameter(sparse, requires_grad=False)
        if target is not module:
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent), attr, target)
        converted.append(name)
    if not converted:
        raise ConfigError(f"no linear or 1x1 conv layer of the model is 2:4 sparse and accepted by torch's kernels "
                          f"({len(dense)} checked: {dict(list(dense.items())[:3])}); prune with Budget(nm=(2, 4))")
    return work, converted, dense
