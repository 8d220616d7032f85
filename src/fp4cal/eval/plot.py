"""layers.png: per-layer relative output error, one line per method (scale searches and GPTQ variants), and
each method's error relative to max scales (matplotlib, imported only here)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

from fp4cal.eval.result import EvalResult
from fp4cal.export.io import write_bytes_atomic

STYLE = {
    "max": ("tab:gray", "s"),
    "mse": ("tab:blue", "o"),
    "local_hessian": ("tab:red", "^"),
    "gptq": ("tab:green", "D"),
    "gptq:local_hessian": ("tab:green", "D"),
    "gptq:local_hessian_dynamic": ("tab:purple", "v"),
    "gptq:mse": ("tab:olive", "P"),
    "gptq:max": ("tab:brown", "X"),
}


def short_name(name: str) -> str:
    """'encoder.layer.3.attention.self.query.weight' -> '3.query'; 'model.layers.0.mlp.down_proj.weight' ->
    '0.down_proj': the layer index and the module's distinctive part, for axis labels."""
    n = re.sub(r"\.weight$", "", name)
    n = re.sub(r"^.*?\b(?:layers?|h|blocks)\.(\d+)\.", r"\1.", n)
    for part in ("self_attn.", "attention.self.", "attention.", "mlp.", "block_sparse_moe.", "experts."):
        n = n.replace(part, "att." if part == "attention." else "")
    return n


def plot_layers(res: EvalResult, path: str | Path) -> Path:
    """Write the per-layer plot to path (atomically). Top: relative output error (%) per layer and method;
    bottom (when 'max' and another method are present): each method's error divided by max's."""
    # A bare Figure (no pyplot): no global backend switch, no figure registry to leak into.
    from matplotlib.figure import Figure

    layers = res.layers
    x = list(range(len(layers)))
    ratio = "max" in res.methods and len(res.methods) > 1
    fig = Figure(figsize=(max(8.0, 0.28 * len(layers) + 3), 8 if ratio else 5))
    axes = fig.subplots(2 if ratio else 1, 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    for m in res.methods:
        color, marker = STYLE.get(m, (None, "x"))
        y = [100 * le.output_error[m] for le in layers]
        ax.plot(x, y, marker=marker, color=color, markersize=4, linewidth=1, label=m)
    ax.set_ylabel("relative output error (%)\n" + r"$\|XW^T - X\hat{W}^T\|_F \,/\, \|XW^T\|_F$")
    ax.set_title(f"NVFP4 per-layer relative output error on held-out data: {res.model_name}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method", fontsize=8)
    if ratio:
        ax2 = axes[1][0]
        for m in res.methods:
            color, marker = STYLE.get(m, (None, "x"))
            y = [le.output_error[m] / le.output_error["max"] if le.output_error["max"] > 0 else math.nan
                 for le in layers]
            ax2.plot(x, y, marker=marker, color=color, markersize=4, linewidth=1, label=m)
        ax2.axhline(1.0, color="black", linewidth=0.8)
        ax2.set_ylabel("error relative to max scales")
        ax2.grid(True, alpha=0.3)
        ax2.legend(title="method", fontsize=8)
    bottom = axes[-1][0]
    step = max(1, math.ceil(len(layers) / 80))  # at most ~80 labels
    bottom.set_xticks(x[::step])
    bottom.set_xticklabels([short_name(le.name) for le in layers][::step], rotation=90, fontsize=7)
    bottom.set_xlabel("quantized layer (in model order)")
    fig.tight_layout()
    path = Path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_bytes_atomic(path, png.getvalue())
    return path
