"""Keep a pruned model without pickling code: ``fxprune.save`` / ``fxprune.load``.

A pickled GraphModule (``torch.save(model)``) needs the classes it was built from and fxprune's
internals at load time, and breaks when either moves. What defines a pruned model is small: the
dense architecture (the user's own code), which units of each channel group were kept, and the
weights. ``save`` writes exactly that — the record finalize leaves on the pruned module
(``meta["fxprune_record"]``: kept units per group and the traced graph's fingerprint), the
fxprune version, the example input shapes and the ``state_dict`` — as a plain tensor file that
``torch.load(weights_only=True)`` reads. ``load`` takes a freshly built *dense* model from the
user's code, traces it at the saved input size, checks the fingerprint (a changed architecture is
an error, not a silently different model), replays the decision with finalize (which verifies
the structure it builds), and loads the weights.

For deployment without fxprune at all, export the pruned model: ``fxprune.export(model,
"model.onnx", example_inputs=x)`` (ONNX, validated), or ``torch.export.save(torch.export.export(
model, x), "model.pt2")``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from fxprune import checks
from fxprune.analysis import analyze
from fxprune.decision import Decision
from fxprune.errors import ConfigError
from fxprune.files import atomic_path
from fxprune.passes.finalize import finalize as finalize_pass
from fxprune.tracing import trace

FORMAT = "fxprune-pruned/1"


def save(pruned: Any, path: str | os.PathLike) -> None:
    """Write ``pruned`` (a finalized module, or a ``CompileResult``) as its pruning record and
    weights, atomically. Raises ``ConfigError`` for a module finalize did not make, or a path that
    cannot be written."""
    model = getattr(pruned, "model", pruned)
    record = getattr(model, "meta", {}).get("fxprune_record") if isinstance(model, fx.GraphModule) else None
    if record is None:
        raise ConfigError(f"fxprune.save expects a model fxprune finalized (compile(...).model or finalize(...)), got "
                          f"{type(model).__name__} without a pruning record; save a plain model with torch.save("
                          "model.state_dict(), path)")
    path = checks.writable_file(path, "fxprune.save")
    import fxprune

    inputs = model.meta.get("fxprune_example_inputs", ())
    payload = {"format": FORMAT, "fxprune_version": fxprune.__version__, "fingerprint": record["fingerprint"],
               "keep": {str(gid): torch.tensor(units, dtype=torch.int64) for gid, units in record["keep"].items()},
               "input_shapes": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(model: torch.nn.Module, path: str | os.PathLike, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The pruned model saved at ``path``, rebuilt from ``model`` (a freshly constructed *dense*
    model from your code; it is not modified) traced on ``example_inputs`` (the input size used
    when pruning; the batch size may differ).

    Raises ``ConfigError`` for a file that is not an fxprune record, an architecture or input size
    other than the saved one (fingerprint mismatch), or weights that do not fit; plus what
    ``fxprune.trace`` raises.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"fxprune.load: no file at {path}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        raise ConfigError(f"fxprune.load: {path} is not a file fxprune.save wrote ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"fxprune.load: {path} is not a file fxprune.save wrote (format "
                          f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
                          f"expected {FORMAT!r})")
    gm = trace(model, example_inputs)
    cg = analyze(gm)
    found = cg.fingerprint(gm)
    if found != payload["fingerprint"]:
        raise ConfigError(
            f"fxprune.load: the model traced on inputs of shapes {[list(t.shape) for t in gm.meta['fxprune_example_inputs'] if isinstance(t, torch.Tensor)]} "
            f"has graph fingerprint {found}, the saved one {payload['fingerprint']} (pruned by fxprune "
            f"{payload['fxprune_version']} from inputs of shapes {payload['input_shapes']}): the architecture or the "
            "input size changed; build the model with the same code and arguments, and pass inputs of the saved size")
    keep = {}
    for gid, units in payload["keep"].items():
        group = cg.group(int(gid))
        mask = np.zeros(group.size, dtype=bool)
        mask[units.numpy()] = True
        keep[group.id] = mask
    pruned = finalize_pass(gm, cg, Decision(keep))
    try:
        pruned.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"fxprune.load: the saved weights do not fit the replayed model ({str(exc).splitlines()[0]}); "
                          "the file may come from another fxprune version: re-save it") from exc
    return pruned.eval()
