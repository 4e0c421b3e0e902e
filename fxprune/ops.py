"""Which torch ops the channel analysis understands, grouped by how they treat channels.

Ops are named by function object (call_function), method name (call_method) or module class
(call_module). Everything not listed here is opaque: the channels it touches become unprunable.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torchvision.ops import StochasticDepth
except ImportError:  # pragma: no cover
    StochasticDepth = None


def _with_inplace(names: set[str]) -> set[str]:
    return names | {n + "_" for n in names}


# Element-wise, one tensor in, same shape out: channels pass through unchanged.
UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.clamp, torch.clip, torch.square, torch.erf, operator.neg, torch.nn.functional.relu_,
    torch.relu_, torch.sigmoid_, torch.tanh_, torch.clone, torch.detach,
}
UNARY_METHODS = _with_inplace(
    {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "clamp", "clip", "square", "erf"}
) | {"contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as"}
UNARY_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.LogSigmoid,
) + ((StochasticDepth,) if StochasticDepth is not None else ())

# Spatial ops: the channel dim (1) keeps its size and position, other dims may change.
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.pad,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
SPATIAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)

# Element-wise with broadcasting over several operands: their channels are coupled.
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
ELEMENTWISE_METHODS = _with_inplace({"add", "sub", "mul", "div", "maximum", "minimum"})

# Pure data movement: analysed by running the op on a tensor of channel labels.
MOVEMENT_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
    torch.squeeze, torch.unsqueeze, torch.flip, torch.roll, torch.t, torch.unflatten,
    operator.getitem,
}
MOVEMENT_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim",
    "squeeze", "unsqueeze", "expand", "expand_as", "t", "flip", "roll", "repeat", "view_as",
    "reshape_as",
}
MOVEMENT_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)

REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}

CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split}
SPLIT_METHODS = {"split", "chunk"}

SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
SOFTMAX_MODULES: tuple[type, ...] = (nn.Softmax, nn.LogSoftmax)

CONV_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES: tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
LINEAR_FUNCTIONS = {F.linear}
BATCHNORM_MODULES: tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
BATCHNORM_FUNCTIONS = {F.batch_norm, F.instance_norm}

# Shape queries produce plain Python values: they never constrain channels.
QUERY_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "type", "get_device"}
QUERY_FUNCTIONS = {getattr, len, torch.numel}


def op_name(node) -> str:
    """A readable name for a node's op: function, method or module class."""
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    return f"function {getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".replace(
        "_operator.", "operator."
    )
