"""report.html: one self-contained page per run (plots embedded as PNG), drawn from report.json
alone, so ``fxprune report RUN_DIR`` can redraw any run; ``compare`` plots several runs together.

The page: the summary, kept width per group (dense vs pruned; for a weight budget, the zeros per
weight tensor, non-zero MACs and the sparse stored size instead), training curves (loss, accuracy
and the method's own per-epoch values such as lambda or the gated MACs), latency dense vs pruned,
the groups that were not prunable and why, and the submodules tracing kept opaque.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

from fxprune.errors import ConfigError
from fxprune.files import atomic_path, write_atomic


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """(pyplot, figure, axes as a flat list) on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=110, squeeze=False, sharex=rows > 1)
    return plt, fig, list(axes.ravel())


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def widths_png(report: dict[str, Any]) -> bytes:
    """Bars per channel group: its dense width and what the pruned model kept."""
    groups = report["groups"]
    plt, fig, (ax,) = _figure(max(6.4, 0.35 * len(groups)), 3.2)
    xs = range(len(groups))
    ax.bar(xs, [g["size"] for g in groups], color="#cccccc", label="dense")
    ax.bar(xs, [g["kept"] for g in groups], color=["#1f77b4" if g["prunable"] else "#999999" for g in groups],
           label="kept")
    ax.set_xticks(list(xs), [f"g{g['id']}" for g in groups], rotation=90, fontsize=7)
    ax.set_ylabel("channels (units)")
    ax.set_title("kept width per channel group (grey: not prunable)")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def curves_png(report: dict[str, Any]) -> bytes | None:
    """Loss and accuracy per epoch (training, then fine-tuning), and the method's own values."""
    epochs = report.get("epochs") or []
    if not epochs:
        return None
    extra = sorted({k for e in epochs for k, v in e.get("extra", {}).items() if isinstance(v, (int, float))})
    plt, fig, axes = _figure(6.4, 2.6 * (2 + bool(extra)), rows=2 + bool(extra))
    xs = list(range(1, len(epochs) + 1))
    axes[0].plot(xs, [e["train_loss"] for e in epochs], marker="o", label="train loss")
    axes[0].set_ylabel("loss")
    axes[1].plot(xs, [e["train_acc"] for e in epochs], marker="o", label="train")
    if any(e.get("eval_acc") is not None for e in epochs):
        axes[1].plot(xs, [e.get("eval_acc") for e in epochs], marker="o", label="eval")
    axes[1].set_ylabel("accuracy")
    for k in extra:
        axes[2].plot(xs, [e.get("extra", {}).get(k) for e in epochs], marker="o", label=k)
    if extra:
        axes[2].set_yscale("symlog")
        axes[2].set_ylabel("method")
    tuned = next((i for i, e in enumerate(epochs) if e["phase"] == "finetune"), None)
    for ax in axes:
        if tuned is not None:
            ax.axvline(tuned + 0.5, color="black", lw=0.8, ls="--")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch (dashed: pruned, fine-tuning starts)")
    return _png(plt, fig)


def latency_png(report: dict[str, Any]) -> bytes | None:
    lat = report.get("latency")
    if not lat:
        return None
    plt, fig, (ax,) = _figure(4.0, 2.4)
    ms = [lat["dense"]["median_ms"], lat["pruned"]["median_ms"]]
    ax.barh(["dense", "pruned"], ms, color=["#999999", "#1f77b4"])
    ax.set_xlabel(f"median latency, ms ({lat['settings']['backend']})")
    ax.set_title(f"speedup {lat['speedup']:.2f}x")
    return _png(plt, fig)


def latency_budget_png(report: dict[str, Any]) -> bytes | None:
    """A latency budget's run: the predictor's samples (predicted vs measured, relative to dense),
    and the pruned model's prediction and measurement against the target."""
    lb = report.get("latency_budget")
    if not lb:
        return None
    plt, fig, (ax,) = _figure(4.4, 4.0)
    for split, color in (("fit", "#bbbbbb"), ("test", "#1f77b4")):
        pts = [(s["measured"], s["predicted"]) for s in lb["predictor"]["samples"] if s["split"] == split]
        if pts:
            ax.scatter(*zip(*pts), s=12, color=color, label=f"{split} samples")
    ax.scatter([lb["ratio"]], [lb["predicted_ms"] / lb["dense_ms"]], marker="*", s=120, color="#d62728",
               label="pruned model", zorder=3)
    ax.axvline(lb["target_ms"] / lb["dense_ms"], color="black", lw=1, ls="--", label="target")
    ax.plot([0, 1.05], [0, 1.05], color="#999999", lw=0.8)
    ax.set_xlabel(f"measured latency / dense ({lb['backend']})")
    ax.set_ylabel("predicted latency / dense")
    ax.set_title(f"LPNet held-out error {lb['predictor_mape']:.1f}%")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def sparsity_png(report: dict[str, Any]) -> bytes | None:
    """A weight budget's run: the fraction of zero weights per prunable weight tensor."""
    z = report.get("sparsity")
    if not z:
        return None
    names = list(z["layers"])
    plt, fig, (ax,) = _figure(max(6.4, 0.35 * len(names)), 3.2)
    ax.bar(range(len(names)), [100 * z["layers"][n]["sparsity"] for n in names], color="#1f77b4")
    ax.axhline(100 * z["overall"], color="black", lw=1, ls="--", label=f"overall {z['overall']:.1%}")
    ax.set_xticks(list(range(len(names))), [n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("zero weights (%)")
    ax.set_title("sparsity per weight tensor")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sparsity_table(z: dict[str, Any]) -> str:
    t = z["target"]
    return _table(("", "value"), [
        ("target", f"N:M {t['nm'][0]}:{t['nm'][1]}" if t["nm"] else f"{t['sparsity']:.1%} ({t['scope']})"),
        ("zero weights", f"{z['overall']:.2%} of {t['prunable_weights']:,} prunable"),
        ("MACs with a non-zero weight", f"{z['nonzero_macs']:,} of {z['dense_macs']:,} "
                                        f"({z['nonzero_macs'] / max(1, z['dense_macs']):.1%})"),
        ("stored size (dense / values + bit mask)", f"{z['bytes_dense']:,} / {z['bytes_sparse']:,} bytes"),
        ("kept dense", ", ".join(f"{k} ({v})" for k, v in t["skipped"].items()) or "none")])


def render(report: dict[str, Any], summary: str = "") -> str:
    """The page for one run's report dict (``CompileReport.to_dict()`` / report.json)."""
    d, p = report["dense"], report["pruned"]
    rows = [("MACs / example", f"{d['flops']:,}", f"{p['flops']:,}", f"{p['flops'] / d['flops']:.1%}"),
            ("parameters", f"{d['params']:,}", f"{p['params']:,}", f"{p['params'] / d['params']:.1%}")]
    acc = [(k, f"{v:.4f}") for k, v in report.get("accuracy", {}).items() if v is not None]
    fixed = [(f"g{g['id']}", g["size"], g["reason"]) for g in report["groups"] if not g["prunable"]]
    leaves = sorted((report.get("leaves") or {}).items())
    parts = [
        f"<h1>fxprune: {html.escape(report['method'])}</h1>",
        f"<p>budget {html.escape(json.dumps(report['budget']))}; FLOPs are {html.escape(report['flops_unit'])}; "
        f"finalize check: max relative difference {report['equivalence'].get('max_rel_diff', float('nan')):.2e}</p>",
        _table(("", "dense", "pruned", "fraction"), rows),
        "<h2>Accuracy</h2>", _table(("model", "accuracy"), acc),
        *(("<h2>Weight sparsity</h2>", _sparsity_table(report["sparsity"]),
            _img(sparsity_png(report), "sparsity per weight tensor")) if report.get("sparsity") else
          ("<h2>Kept width per group</h2>", _img(widths_png(report), "kept width per group"))),
        "<h2>Training</h2>", _img(curves_png(report), "training curves") or "<p>no training epochs</p>",
        *(("<h2>Latency budget</h2>", _table(("decision", "predictor limit (µs)", "predicted ms", "measured ms",
                                               "target ms", "noise"),
                                              [(i + 1, a["limit_us"], f"{a['predicted_ms']:.3f}", f"{a['measured_ms']:.3f}",
                                                f"{report['latency_budget']['target_ms']:.3f}", f"{a['noise']:.1%}")
                                               for i, a in enumerate(report["latency_budget"]["attempts"])]),
            _img(latency_budget_png(report), "predicted vs measured latency"))
          if report.get("latency_budget") else ()),
        "<h2>Latency</h2>", _img(latency_png(report), "latency") or "<p>not measured (validate=...)</p>",
        "<h2>Groups that were not prunable</h2>", _table(("group", "size", "why"), fixed),
        "<h2>Submodules tracing kept opaque</h2>", _table(("module", "why"), leaves),
        "<h2>Method options</h2>", f"<pre>{html.escape(json.dumps(report.get('method_options', {}), indent=1))}</pre>",
    ]
    if summary:
        parts.insert(2, f"<pre>{html.escape(summary)}</pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fxprune report: "
            f"{html.escape(report['method'])}</title><style>{style}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Redraw ``RUN_DIR/report.html`` from its report.json (and summary.txt). Raises
    ``ConfigError`` for a folder without report.json."""
    run_dir = Path(run_dir)
    source = run_dir / "report.json"
    if not source.is_file():
        raise ConfigError(f"{run_dir} has no report.json: pass a folder `fxprune compile` wrote")
    summary = (run_dir / "summary.txt").read_text() if (run_dir / "summary.txt").is_file() else ""
    out = run_dir / "report.html"
    write_atomic(out, render(json.loads(source.read_text()), summary))
    return out


def compare(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Accuracy against MACs (and against latency where measured) of several runs, as a PNG.
    Raises ``ConfigError`` for a folder without report.json."""
    points = []
    for d in map(Path, run_dirs):
        if not (d / "report.json").is_file():
            raise ConfigError(f"{d} has no report.json: pass folders `fxprune compile` wrote")
        r = json.loads((d / "report.json").read_text())
        acc = [v for v in r.get("accuracy", {}).values() if v is not None]
        points.append((d.name, r["pruned"]["flops"] / r["dense"]["flops"], acc[-1] if acc else None,
                       (r.get("latency") or {}).get("pruned", {}).get("median_ms")))
    with_latency = any(p[3] is not None for p in points)
    plt, fig, axes = _figure(6.4 * (1 + with_latency), 3.6, cols=1 + with_latency)
    for name, macs, acc, ms in points:
        if acc is None:
            continue
        axes[0].scatter(100 * macs, 100 * acc)
        axes[0].annotate(name, (100 * macs, 100 * acc), fontsize=7)
        if with_latency and ms is not None:
            axes[1].scatter(ms, 100 * acc)
            axes[1].annotate(name, (ms, 100 * acc), fontsize=7)
    axes[0].set_xlabel("MACs (% of dense)")
    axes[0].set_ylabel("accuracy (%)")
    if with_latency:
        axes[1].set_xlabel("pruned latency (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
    png = _png(plt, fig)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png)
    return out
