"""2:4 semi-structured kernels (issue 13, deployment): on CPU the backend says why it cannot run;
on a CUDA GPU of compute capability >= 8.0 a 2:4-pruned model converts and computes the same."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.backends.sparse24 import PointwiseAsLinear, is_2_4, require_sparse24, to_semi_structured
from fxprune.errors import BackendUnavailable


def _sparse24_available() -> str | None:
    try:
        require_sparse24()
    except BackendUnavailable as exc:
        return str(exc)
    return None


WHY_NOT = _sparse24_available()
gpu = pytest.mark.skipif(WHY_NOT is not None, reason=f"2:4 kernels unavailable: {WHY_NOT}")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))


def test_2_4_check_reads_groups_of_four_along_the_input():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0]])
    assert is_2_4(w) and not is_2_4(torch.ones(1, 8)) and not is_2_4(torch.ones(1, 6))


def test_a_pointwise_conv_runs_as_a_linear_layer():
    conv = nn.Conv2d(8, 16, 1)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(PointwiseAsLinear(conv)(x), conv(x))


@pytest.mark.skipif(WHY_NOT is None, reason="this machine runs 2:4 kernels")
def test_without_a_capable_gpu_the_backend_says_why():
    with pytest.raises(BackendUnavailable, match="GPU|compute capability|to_sparse_semi_structured"):
        to_semi_structured(_mlp())


@gpu
@pytest.mark.gpu
def test_a_2_4_pruned_mlp_converts_and_computes_the_same():
    model = _mlp()
    x = (torch.randn(64, 128),)
    pruned = fxprune.compile(model, "nm", fxprune.Budget(nm=(2, 4)), x, progress=False).model
    fast, converted, dense = to_semi_structured(pruned)
    assert converted, dense
    xs = x[0].cuda().half()
    ref = pruned.cuda().half()(xs)
    torch.testing.assert_close(fast(xs), ref, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_a_dense_model_is_refused():
    with pytest.raises(fxprune.ConfigError, match="2:4"):
        to_semi_structured(_mlp())
