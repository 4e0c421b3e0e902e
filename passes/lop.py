"""LOP: linear over-parameterization of a pruned (compact) network for fine-tuning.

Source: "Boosting Pruned Networks with Linear Over-parameterization", arXiv:2204.11444 (v3, Dec 2023:
Yu Qian, Jian Cao, Xiaoshuang Li, Jie Zhang, Hufei Li, Jue Chen; v1, Apr 2022, was titled
"Fine-tuning Pruned Networks with Linear Over-parameterization"). What the paper states (abstract
and introduction, the parts of it that could be read for this module):

* after structured pruning, each compact convolution / linear layer is replaced, for fine-tuning
  only, by several consecutive convolution / linear layers with no non-linearity between them;
* the replacement is *equivalent*: at the start of fine-tuning it produces the same output
  feature maps as the compact layer, so fine-tuning starts from the pruned network's function;
* after fine-tuning the consecutive layers are re-parameterized (multiplied) back into one layer
  of the original shape, so the deployed network costs exactly what the pruned one costs;
* "similarity-preserving" in the paper is a *training loss*, not an initialisation: similarity-
  preserving knowledge distillation (Tung & Mori, ICCV 2019) makes the batch-by-batch similarity
  matrix of an over-parameterized block's features match that of the corresponding layer of the
  dense (unpruned) network. fxprune's LOP fine-tune does not add that loss (it is a separate
  training aid; the benchmark measures the over-parameterization alone).

The paper's exact factor layout and how it initialises the factors were not in the material
available when this module was written, so both are this library's choice, described below.

Library's choice (layout). A ``k x k`` convolution ``C_in -> C_out`` with weight ``W`` (stride,
padding, dilation, padding mode as it has) becomes

    y = W2 * (W1 * x) + b        W1: k x k conv C_in -> M, same stride/padding/dilation, no bias
                                 W2: 1 x 1 conv M -> C_out, stride 1, with the layer's bias b

and a linear layer ``C_in -> C_out`` becomes ``y = W2 (W1 x) + b`` the same way. The 1 x 1 second
factor is pointwise, so the product is again one ``k x k`` convolution:

    W[o, i, :, :] = sum_m W2[o, m] W1[m, i, :, :]        b = W2 b1 + b2  (b1 = 0 here)

which ``collapse`` computes (in float64, then cast back) for any pair of factors, trained or not.
Default width ``M = ceil(width * max(C_in, C_out))`` with ``width = 2``: a 3 x 3 conv with
C_in = C_out = C trains ``2 + 2/9 ~ 2.2x`` its parameters (and about as many FLOPs). Because
``M >= C_out`` for every ``width >= 1``, the factorisation below is always exact.

Library's choice (initialisation: exact, random, norm-balanced). Flatten ``W`` to ``O x n``
(``n = C_in k k``). ``W1`` (``M x n``) is a random semi-orthogonal matrix whose row space contains
the row space of ``W``, and ``W2 = W W1^T``, so that ``W2 W1 = W P = W`` (``P = W1^T W1`` is the
projector onto that row space):

* ``M >= n``: ``W1`` has random orthonormal columns (QR of a Gaussian matrix), so ``P = I``;
* ``M < n``: ``W1^T`` is the orthonormal ``Q`` of the QR factorisation of ``[W^T, G] A``, with
  ``G`` an ``n x (M - O)`` and ``A`` an ``M x M`` Gaussian matrix: its span is the row space of
  ``W`` plus ``M - O`` random directions, and the mixing ``A`` ties no hidden unit to one row of
  ``W`` (one QR per layer, done on the layer's device in float64: the costly step, about 15 s
  for a whole ResNet-18 on 2 CPU cores).

``W1`` always has full rank ``min(M, n)`` and ``W2`` no zero column, so both factors (every row
and column of them, generically) get gradient from the first step and no hidden direction starts
at a saddle. (An all-zero factor, or the SVD split ``W1 = Q S^1/2 V^T``, ``W2 = U S^1/2 Q^T``
with ``Q`` of rank ``O``, would leave the other ``M - O`` hidden directions without gradient
forever.) The pair is then rescaled, ``W1 -> a W1`` and ``W2 -> W2 / a`` (the product is
unchanged), so that both have the same Frobenius norm (``a^4 = |W|_F^2 / min(M, n)``): the
scaling that minimises ``|W1|^2 + |W2|^2``, i.e. where weight decay has no reason to move it.
``expand(..., seed=...)`` makes the draw reproducible; without a seed torch's global generator
is used (``torch.manual_seed`` governs it).

Which layers. Only modules whose type is exactly ``nn.Conv2d`` (``groups == 1``) or ``nn.Linear``:
grouped and depthwise convolutions are left as they are (a dense ``M``-wide factor would not
collapse back into a grouped layer), as are subclasses (their forward may differ, e.g. the
``out_proj`` of ``nn.MultiheadAttention`` whose weight the attention reads directly), lazy
layers, layers inside an already expanded layer, and, with an ``FxpruneWarning``, layers with
hooks, layers sharing a parameter with another module, and, in a GraphModule, layers whose
parameters the graph reads with ``get_attr``. A layer registered under several names stays one
object. Everything else (BatchNorm, activations, ...) is untouched; ``requires_grad``, device,
dtype and train/eval mode are kept. A plain module whose forward reads ``self.conv.weight``
directly cannot be seen from outside: do not expand such a layer (pass ``names=``).

    >>> import torch, torch.nn as nn
    >>> from fxprune.passes.lop import expand, collapse
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> big = expand(net, width=2, seed=0)
    >>> type(big[0]).__name__, big[0].first.out_channels
    ('ExpandedConv2d', 16)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> bool(torch.allclose(big(x), net(x), atol=1e-5))
    True
    >>> small = collapse(big)
    >>> shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    >>> type(small[0]).__name__, shapes(small) == shapes(net)
    ('Conv2d', True)
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune import checks
from fxprune.errors import ConfigError, FxpruneWarning

__all__ = ["ExpandedConv2d", "ExpandedLinear", "expand", "collapse"]

DEFAULT_WIDTH = 2.0
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_state_dict_hooks", "_load_state_dict_pre_hooks")


class _Product(nn.Module):
    """``last(first(x))``: two linear factors with nothing between them."""

    first: nn.Module
    last: nn.Module

    def __init__(self, first: nn.Module, last: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.last = last

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the name nn.Conv2d / nn.Linear use
        return self.last(self.first(input))

    def _factors(self) -> tuple[nn.Module, nn.Module]:
        """The two factors, each a plain layer (a factor that is itself a product is multiplied out)."""
        first = self.first.collapse() if isinstance(self.first, _Product) else self.first
        last = self.last.collapse() if isinstance(self.last, _Product) else self.last
        return first, last


def _combined_bias(w2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor | None:
    """``W2 b1 + b2`` in float64, or None when neither factor has a bias."""
    if b1 is None and b2 is None:
        return None
    out = torch.zeros(w2.shape[0], dtype=torch.float64, device=w2.device)
    if b1 is not None:
        out = out + w2 @ b1.detach().double()
    if b2 is not None:
        out = out + b2.detach().double()
    return out


def _fill(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
    """Write ``weight``/``bias`` into ``layer`` (cast to its dtype); keep ``like``'s requires_grad and mode."""
    grad = like.weight.requires_grad
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(grad if getattr(like, "bias", None) is None else like.bias.requires_grad)
    layer.train(like.training)
    return layer


class ExpandedConv2d(_Product):
    """A dense ``k x k`` conv (``first``, C_in -> M) followed by a 1 x 1 conv (``last``, M -> C_out).

    Trains as two layers (more parameters for fine-tuning), deploys as one: ``collapse()``."""

    def __init__(self, first: nn.Conv2d, last: nn.Conv2d) -> None:
        """Raises ``ConfigError`` if the factors are not Conv2d layers that chain and collapse
        into one conv (``first`` ungrouped; ``last`` 1 x 1, stride 1, no padding, ungrouped)."""
        for name, conv in (("first", first), ("last", last)):
            if not isinstance(conv, (nn.Conv2d, ExpandedConv2d)):
                raise ConfigError(f"ExpandedConv2d: '{name}' must be an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(first, nn.Conv2d) and first.groups != 1:
            raise ConfigError(f"ExpandedConv2d: 'first' has groups={first.groups}; only ungrouped factors "
                              "multiply into one conv: pass groups=1")
        if isinstance(last, nn.Conv2d) and (tuple(last.kernel_size) != (1, 1) or tuple(last.stride) != (1, 1)
                                            or last.padding not in ((0, 0), "valid") or last.groups != 1):
            raise ConfigError("ExpandedConv2d: 'last' must be a 1x1 conv with stride 1, no padding and groups=1 "
                              f"(got kernel {last.kernel_size}, stride {last.stride}, padding {last.padding}, "
                              f"groups {last.groups}); build it with nn.Conv2d(M, C_out, 1)")
        if first.out_channels != last.in_channels:
            raise ConfigError(f"ExpandedConv2d: 'first' gives {first.out_channels} channels but 'last' takes "
                              f"{last.in_channels}; make them equal")
        super().__init__(first, last)

    in_channels = property(lambda self: self.first.in_channels)
    out_channels = property(lambda self: self.last.out_channels)
    kernel_size = property(lambda self: self.first.kernel_size)
    stride = property(lambda self: self.first.stride)
    padding = property(lambda self: self.first.padding)
    dilation = property(lambda self: self.first.dilation)

    def collapse(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` computing what the two factors compute now (float64 product, cast back).

        ``W[o, i] = sum_m W2[o, m] W1[m, i]`` and ``b = W2 b1 + b2``; stride, padding, dilation
        and padding mode are the first factor's (the compact layer's). Raises nothing of its own."""
        first, last = self._factors()
        w2 = last.weight.detach().double()[:, :, 0, 0]
        weight = torch.einsum("om,mikl->oikl", w2, first.weight.detach().double())
        bias = _combined_bias(w2, first.bias, last.bias)
        conv = nn.Conv2d(first.in_channels, last.out_channels, first.kernel_size, stride=first.stride,
                         padding=first.padding, dilation=first.dilation, groups=1, bias=bias is not None,
                         padding_mode=first.padding_mode, device=last.weight.device, dtype=last.weight.dtype)
        return _fill(conv, weight, bias, last)


class ExpandedLinear(_Product):
    """A linear layer ``first`` (C_in -> M, no bias) followed by ``last`` (M -> C_out, with the bias).

    Trains as two layers, deploys as one: ``collapse()``."""

    def __init__(self, first: nn.Linear, last: nn.Linear) -> None:
        """Raises ``ConfigError`` if the factors are not Linear layers whose sizes chain."""
        for name, lin in (("first", first), ("last", last)):
            if not isinstance(lin, (nn.Linear, ExpandedLinear)):
                raise ConfigError(f"ExpandedLinear: '{name}' must be an nn.Linear, got {type(lin).__name__}")
        if first.out_features != last.in_features:
            raise ConfigError(f"ExpandedLinear: 'first' gives {first.out_features} features but 'last' takes "
                              f"{last.in_features}; make them equal")
        super().__init__(first, last)

    in_features = property(lambda self: self.first.in_features)
    out_features = property(lambda self: self.last.out_features)

    def collapse(self) -> nn.Linear:
        """One ``nn.Linear`` with ``W = W2 W1`` and ``b = W2 b1 + b2`` (float64 product, cast back).

        Raises nothing of its own."""
        first, last = self._factors()
        w2 = last.weight.detach().double()
        weight = w2 @ first.weight.detach().double()
        bias = _combined_bias(w2, first.bias, last.bias)
        lin = nn.Linear(first.in_features, last.out_features, bias=bias is not None,
                        device=last.weight.device, dtype=last.weight.dtype)
        return _fill(lin, weight, bias, last)


# --- initialisation -------------------------------------------------------------------------------

def _gaussian(rows: int, cols: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Drawn on the CPU (so one seed gives the same factors on every device), used on ``device``."""
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device)


def _orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """The Q of ``a = QR`` with R's diagonal made positive (a Haar-random frame for Gaussian ``a``)."""
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _factorize(w: torch.Tensor, width: int, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W1, W2)`` with ``W2 @ W1 == W`` for ``W`` of shape ``O x n``, float64 (module docstring)."""
    o, n = w.shape
    if width >= n:
        first = _orthonormal_columns(_gaussian(width, n, gen, w.device))                 # W1^T W1 = I_n
    else:  # o <= width < n (expand guarantees width >= o): rows spanning W's rows and random ones
        rms = float(torch.linalg.matrix_norm(w)) / math.sqrt(o * n)
        spanning = torch.cat([w.T / (rms or 1.0), _gaussian(n, width - o, gen, w.device)], dim=1)   # n x width
        first = torch.linalg.qr(spanning @ _gaussian(width, width, gen, w.device))[0].T   # mixed, orthonormal rows
    second = w @ first.T
    norm = float(torch.linalg.matrix_norm(w))
    if norm > 0:  # |a W1|_F = |W2 / a|_F
        scale = math.sqrt(norm / math.sqrt(min(width, n)))
        first, second = first * scale, second / scale
    return first, second


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 where the factorisation runs: its own device, or the CPU where float64 is
    missing (MPS)."""
    return t.detach().to("cpu" if t.device.type == "mps" else t.device, torch.float64)


def _hidden_width(c_in: int, c_out: int, width: float) -> int:
    return max(1, math.ceil(width * max(c_in, c_out) - 1e-9))


def _expand_conv(conv: nn.Conv2d, width: float, gen: torch.Generator | None) -> ExpandedConv2d:
    m = _hidden_width(conv.in_channels, conv.out_channels, width)
    w = conv.weight.detach()
    w1, w2 = _factorize(_work(w).reshape(w.shape[0], -1), m, gen)
    kw = dict(device=w.device, dtype=w.dtype)
    first = nn.Conv2d(conv.in_channels, m, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=1, bias=False, padding_mode=conv.padding_mode, **kw)
    last = nn.Conv2d(m, conv.out_channels, 1, bias=conv.bias is not None, **kw)
    _fill(first, w1.reshape(m, *w.shape[1:]), None, conv)
    _fill(last, w2[:, :, None, None], conv.bias.detach() if conv.bias is not None else None, conv)
    out = ExpandedConv2d(first, last)
    out.train(conv.training)
    return out


def _expand_linear(lin: nn.Linear, width: float, gen: torch.Generator | None) -> ExpandedLinear:
    m = _hidden_width(lin.in_features, lin.out_features, width)
    w = lin.weight.detach()
    w1, w2 = _factorize(_work(w), m, gen)
    kw = dict(device=w.device, dtype=w.dtype)
    first = nn.Linear(lin.in_features, m, bias=False, **kw)
    last = nn.Linear(m, lin.out_features, bias=lin.bias is not None, **kw)
    _fill(first, w1, None, lin)
    _fill(last, w2, lin.bias.detach() if lin.bias is not None else None, lin)
    out = ExpandedLinear(first, last)
    out.train(lin.training)
    return out


# --- model-level passes ---------------------------------------------------------------------------

def _check_width(width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not math.isfinite(float(width)):
        raise ConfigError(f"fxprune.passes.lop.expand: width must be a finite number >= 1 (the hidden width is "
                          f"ceil(width * max(C_in, C_out))), got {width!r}; the default is {DEFAULT_WIDTH:g}")
    if width < 1:
        raise ConfigError(f"fxprune.passes.lop.expand: width={width!r} is below 1: the hidden width "
                          "ceil(width * max(C_in, C_out)) would be narrower than the layer's output and the "
                          "expansion could not reproduce it; pass width >= 1 (default "
                          f"{DEFAULT_WIDTH:g})")
    return float(width)


def _replace(root: nn.Module, names: list[str], new: nn.Module) -> None:
    """Register ``new`` at every qualified name in ``names`` (none of them the root)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent_name), leaf, new)


def _occurrences(model: nn.Module, skip_inside: type) -> dict[int, tuple[nn.Module, list[str]]]:
    """id -> (module, every qualified name it has), in module order, not looking inside ``skip_inside``."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    stop: list[str] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") or (p == "" and name) for p in stop):
            continue
        if isinstance(mod, skip_inside):
            stop.append(name)
        found.setdefault(id(mod), (mod, []))[1].append(name)
    return found


def _why_not(mod: nn.Module, names: list[str], owners: dict[int, set[int]],
             read_attrs: set[str]) -> tuple[str, bool] | None:
    """Why ``mod`` cannot be expanded, and whether that deserves a warning; None when it can."""
    if type(mod) not in (nn.Conv2d, nn.Linear):
        return f"it is a {type(mod).__name__}, not exactly nn.Conv2d or nn.Linear", False
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        return (f"it is a grouped conv (groups={mod.groups}): a dense hidden factor would not collapse back "
                "into a grouped layer"), False
    if any(p.is_meta for p in mod.parameters()):
        return "its parameters are on the meta device (materialise the model first)", True
    if any(getattr(mod, t, None) for t in _HOOK_TABLES):
        return "it has hooks, which the replacement would not carry (remove them, expand, register again)", True
    if any(len(owners[id(p)]) > 1 for p in mod.parameters()):
        return "it shares a parameter with another module (expanding would untie them)", True
    read = sorted(t for t in read_attrs if any(t.startswith(n + ".") for n in names))
    if read:
        return f"the graph reads its parameters directly ({', '.join(read)})", True
    return None


def expand(model: nn.Module, width: int | float = DEFAULT_WIDTH, *, convs: bool = True, linears: bool = True,
           names: Iterable[str] | str | None = None, seed: int | None = None) -> nn.Module:
    """A copy of ``model`` whose Conv2d / Linear layers are each two linear factors computing the same.

    Fine-tune the result, then ``collapse`` it: more trainable parameters while fine-tuning, the
    pruned model's shape when deployed. The hidden width of a layer ``C_in -> C_out`` is
    ``ceil(width * max(C_in, C_out))``. ``convs`` / ``linears`` choose the layer kinds (ungrouped
    ``nn.Conv2d``; ``nn.Linear``, expanded by default as in the paper); ``names`` (qualified names)
    selects exact layers instead and overrides both. ``seed`` makes the random factorisation
    reproducible. Works on plain modules and GraphModules (the graph keeps calling the same
    names). ``model`` itself is never modified (the work is done on ``copy.deepcopy(model)``).

    Raises ``ConfigError`` for a ``model`` that is not a module, a ``width`` below 1 or not a finite
    number, non-bool ``convs`` / ``linears``, a non-int ``seed``, and a name in ``names`` that is
    not in the model or not a layer that can be expanded (the message says why).
    """
    where = "fxprune.passes.lop.expand"
    model = checks.module_arg(model, where)
    width = _check_width(width)
    for flag, value in (("convs", convs), ("linears", linears)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {flag} must be True or False, got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ConfigError(f"{where}: seed must be an int or None, got {seed!r}")
    if isinstance(names, str):
        names = [names]
    wanted = None
    if names is not None:
        try:
            wanted = list(names)
        except TypeError:
            raise ConfigError(f"{where}: names must be qualified module names (e.g. ['layer1.0.conv1']), "
                              f"got {names!r}") from None
        bad = [n for n in wanted if not isinstance(n, str)]
        if bad:
            raise ConfigError(f"{where}: names must be strings, got {bad[0]!r}")

    out = copy.deepcopy(model)
    layers = _occurrences(out, _Product)
    owners: dict[int, set[int]] = {}
    for mod, _ in layers.values():
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    read_attrs = ({str(n.target) for n in out.graph.nodes if n.op == "get_attr"}
                  if isinstance(out, fx.GraphModule) else set())

    if wanted is not None:
        by_name = {n: key for key, (_, ns) in layers.items() for n in ns}
        chosen = []
        for n in wanted:
            if n not in by_name:
                inside = [p for p, k in by_name.items() if isinstance(layers[k][0], _Product) and n.startswith(p + ".")]
                why = (f"it is inside the expanded layer '{inside[0]}'" if inside
                       else "there is no module of that name (see model.named_modules())")
                raise ConfigError(f"{where}: cannot expand '{n}': {why}")
            mod, ns = layers[by_name[n]]
            reason = _why_not(mod, ns, owners, read_attrs)
            if reason is not None:
                raise ConfigError(f"{where}: cannot expand '{n}': {reason[0]}; leave it out of names")
            if by_name[n] not in chosen:
                chosen.append(by_name[n])
    else:
        chosen = []
        kinds = (nn.Conv2d,) * convs + (nn.Linear,) * linears
        for key, (mod, ns) in layers.items():
            if type(mod) not in kinds:
                continue
            reason = _why_not(mod, ns, owners, read_attrs)
            if reason is None:
                chosen.append(key)
            elif reason[1]:
                warnings.warn(f"{where}: '{ns[0]}' is left compact: {reason[0]}", FxpruneWarning, stacklevel=2)

    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    for key in chosen:
        mod, ns = layers[key]
        new = _expand_conv(mod, width, gen) if isinstance(mod, nn.Conv2d) else _expand_linear(mod, width, gen)
        if "" in ns:  # the model is the layer itself
            return new
        _replace(out, ns, new)
    return out


def collapse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every expanded layer multiplied back into one Conv2d / Linear.

    The result has the compact model's layers, state_dict keys and shapes (the deployable model);
    it computes what ``model`` computes now, trained or not, up to float rounding. ``model`` itself
    is not modified. Raises ``ConfigError`` if ``model`` is not an ``nn.Module``.
    """
    model = checks.module_arg(model, "fxprune.passes.lop.collapse")
    out = copy.deepcopy(model)
    for mod, ns in _occurrences(out, _Product).values():
        if isinstance(mod, _Product):
            new = mod.collapse()
            if "" in ns:
                return new
            _replace(out, ns, new)
    return out

