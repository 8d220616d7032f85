"""Summaries of an EvalResult: the printed table, REPORT_DIR/report.md, report.json and layers.png.

Every file is written to a temporary name in the same directory and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

from fp4cal.eval.result import CAUSAL_LM, FULL_PRECISION, EvalResult
from fp4cal.export.io import write_bytes_atomic

METRIC_LABEL = {"perplexity": "perplexity (held-out)", "mean_cosine": "embedding cosine vs full precision (mean)"}


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize(res: EvalResult) -> dict:
    """Per-method summary and head-to-head counts, computed from the per-layer numbers.

    rows[method]: metric, min_cosine (encoders), median / mean / worst layer output error, worst layer, layers
        won (strictly lowest output error among the methods), median Hessian-weighted error.
    ties: layers where two or more methods share the lowest output error.
    head_to_head[(a, b)] = (layers where a < b, a > b, a == b), for each pair a before b in res.methods.
    Only layers with a finite output error for every method count (expert stacks have none).
    """
    layers = [le for le in res.layers if all(_finite(le.output_error[m]) for m in res.methods)]
    wins = dict.fromkeys(res.methods, 0)
    ties = 0
    for le in layers:
        best = min(le.output_error[m] for m in res.methods)
        winners = [m for m in res.methods if le.output_error[m] == best]
        if len(winners) == 1:
            wins[winners[0]] += 1
        else:
            ties += 1
    rows = {}
    for m in res.methods:
        errs = [le.output_error[m] for le in layers]
        herrs = [le.hessian_error[m] for le in res.layers if _finite(le.hessian_error[m])]
        worst = max(layers, key=lambda le: le.output_error[m]) if layers else None  # noqa: B023
        metric = res.model_metric.get(m, {})
        rows[m] = {
            "metric": metric.get(res.metric_name, float("nan")),
            "min_cosine": metric.get("min_cosine"),
            "median": statistics.median(errs) if errs else float("nan"),
            "mean": statistics.fmean(errs) if errs else float("nan"),
            "worst": worst.output_error[m] if worst else float("nan"),
            "worst_layer": worst.name if worst else None,
            "wins": wins[m],
            "hessian_median": statistics.median(herrs) if herrs else float("nan"),
        }
    pairs = {}
    for i, a in enumerate(res.methods):
        for b in res.methods[i + 1 :]:
            ea = [le.output_error[a] for le in layers]
            eb = [le.output_error[b] for le in layers]
            pairs[(a, b)] = (
                sum(x < y for x, y in zip(ea, eb, strict=True)),
                sum(x > y for x, y in zip(ea, eb, strict=True)),
                sum(x == y for x, y in zip(ea, eb, strict=True)),
            )
    return {"rows": rows, "ties": ties, "compared_layers": len(layers), "head_to_head": pairs}


def gap_closed(res: EvalResult, base: str = "local_hessian") -> dict[str, dict[str, float]]:
    """For every GPTQ label beside ``base``: the share of base's gap to full precision that it closes on the model
    metric ((cos - cos_base) / (1 - cos_base) for encoders; (ppl_base - ppl) / (ppl_base - ppl_fp) for causal
    LMs), and on how many compared layers its layer err is below base's. {} when base or no GPTQ label ran."""
    if base not in res.methods:
        return {}
    name = res.metric_name
    layers = [le for le in res.layers if all(_finite(le.output_error[m]) for m in res.methods)]
    b = res.model_metric.get(base, {}).get(name, float("nan"))
    out = {}
    for m in res.methods:
        if not m.startswith("gptq"):
            continue
        v = res.model_metric.get(m, {}).get(name, float("nan"))
        if name == "mean_cosine":
            closed = (v - b) / (1 - b) if b < 1 else float("nan")
        else:
            fp = res.model_metric.get(FULL_PRECISION, {}).get(name, float("nan"))
            closed = (b - v) / (b - fp) if b != fp else float("nan")
        better = sum(le.output_error[m] < le.output_error[base] for le in layers)
        out[m] = {"gap_closed": closed, "layers_better": better, "layers": len(layers)}
    return out


def _pct(x: float | None, digits: int = 3) -> str:
    return f"{100 * x:.{digits}f} %" if x is not None and _finite(x) else "n/a"


def _sci(x: float | None) -> str:
    return f"{x:.3e}" if x is not None and _finite(x) else "n/a"


def name_of(res: EvalResult) -> str:
    return "embedding cosine" if res.metric_name == "mean_cosine" else "perplexity"


def _metric(x: float | None, name: str) -> str:
    if x is None or not _finite(x):
        return "n/a"
    return f"{x:.4f}" if name == "perplexity" else f"{x:.6f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _summary_table(res: EvalResult, s: dict) -> tuple[list[str], list[list[str]]]:
    name = res.metric_name
    header = ["method", METRIC_LABEL[name]]
    if name == "mean_cosine":
        header.append("min cosine")
    header += ["median layer err", "mean layer err", "worst layer err", "layers won", "median H-weighted err"]
    rows = []
    if res.model_kind == CAUSAL_LM and FULL_PRECISION in res.model_metric:
        fp = res.model_metric[FULL_PRECISION]
        rows.append([FULL_PRECISION, _metric(fp.get(name), name)] + [""] * (len(header) - 2))
    n = s["compared_layers"]
    for m in res.methods:
        r = s["rows"][m]
        row = [m, _metric(r["metric"], name)]
        if name == "mean_cosine":
            row.append(_metric(r["min_cosine"], name))
        row += [_pct(r["median"]), _pct(r["mean"]), _pct(r["worst"]), f"{r['wins']} / {n}", _sci(r["hessian_median"])]
        rows.append(row)
    return header, rows


def format_summary(res: EvalResult, s: dict | None = None) -> str:
    """The summary table as aligned plain text (what the CLI prints)."""
    s = s or summarize(res)
    header, rows = _summary_table(res, s)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"fp4cal eval: {res.model_name}, {res.setup.get('device')}, {res.setup.get('dtype')}"]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    lines += [line(header)] + [line(r) for r in rows]
    if s["ties"]:
        lines.append(f"layers where methods tie for the lowest error: {s['ties']}")
    for (a, b), (better, worse, equal) in s["head_to_head"].items():
        lines.append(f"{b} vs {a}: lower error on {worse} layers, higher on {better}, equal on {equal}")
    lines.append("time: " + " | ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))
    return "\n".join(lines)


def to_json(res: EvalResult, s: dict | None = None) -> dict:
    """A JSON-serializable dict of everything in the report (NaN -> null)."""
    s = s or summarize(res)

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean({
        "model": res.model_name,
        "model_kind": res.model_kind,
        "metric": res.metric_name,
        "methods": res.methods,
        "setup": res.setup,
        "calibration_forwards": res.calibration_forwards,
        "eval_forwards": res.eval_forwards,
        "model_metric": res.model_metric,
        "summary": s["rows"],
        "ties": s["ties"],
        "compared_layers": s["compared_layers"],
        "gptq_vs_local_hessian": gap_closed(res),
        "head_to_head": [{"a": a, "b": b, "a_lower": x, "b_lower": y, "equal": z}
                         for (a, b), (x, y, z) in s["head_to_head"].items()],
        "layers": [
            {"name": le.name, "module": le.module_name, "kind": le.kind, "shape": list(le.shape),
             "tokens": le.tokens, "output_error": le.output_error, "hessian_error": le.hessian_error,
             "method_used": le.method_used}
            for le in res.layers
        ],
        "skipped": res.skipped,
        "fallbacks": {m: {n: wr.fallback for n, wr in r.weights.items() if wr.fallback}
                      for m, r in res.calibration.items()},
        "timings": res.timings,
        "modelopt": res.modelopt,
    })


def to_markdown(res: EvalResult, s: dict | None = None, plot: str | None = "layers.png") -> str:
    """report.md: summary, head-to-head counts, the plot, the per-layer table, phase times."""
    s = s or summarize(res)
    out = [f"# NVFP4 block-scale methods on {res.model_name}", ""]
    st = res.setup
    setup = ", ".join(f"{k}: {v}" for k, v in st.items())
    out += [f"Setup: {setup}.", ""]
    out += ["Weights only (W4A16): every listed weight is NVFP4 fake-quantized with the block scales each method "
            "chose on the calibration split; activations stay in full precision. Errors are measured on the "
            "held-out split.", ""]
    out += ["## Summary", ""]
    header, rows = _summary_table(res, s)
    out += _table(header, rows)
    out += [""]
    if res.metric_name == "perplexity":
        out += ["Perplexity: exp(mean token negative log-likelihood) of the held-out text."]
    else:
        pair = res.model_metric.get(FULL_PRECISION, {}).get("pairwise_cosine")
        out += ["Embedding cosine: cosine similarity between the full-precision and the quantized model's sentence "
                "embeddings (mean pooling over the attention mask), per held-out sequence; mean and minimum. "
                f"For scale: two different held-out sequences have mean cosine {_metric(pair, 'mean_cosine')} in "
                "full precision."]
    out += ["Layer err: relative output error ||X W^T - X What^T||_F / ||X W^T||_F of each quantized layer on its "
            "held-out input activations X (captured on the full-precision model). H-weighted err: "
            "sum_blocks dw^T H dw / sum_blocks w^T H w with the held-out 16x16 block Hessians H. "
            f"Layers won: strictly lowest layer err among the methods, out of {s['compared_layers']} layers"
            + (f" ({s['ties']} ties)." if s["ties"] else "."), ""]
    closed = gap_closed(res)
    if closed:
        out += ["## GPTQ against local_hessian", ""]
        rows = [[m, _pct(c["gap_closed"], 1), f"{c['layers_better']} / {c['layers']}"] for m, c in closed.items()]
        out += _table(["method", f"share of local_hessian's gap to full precision closed ({name_of(res)})",
                       "layers with lower err than local_hessian"], rows)
        out += [""]
    if s["head_to_head"]:
        out += ["## Head to head (layer err)", ""]
        rows = [[f"{b} vs {a}", str(y), str(x), str(z)] for (a, b), (x, y, z) in s["head_to_head"].items()]
        out += _table(["pair", "lower on", "higher on", "equal on"], rows)
        out += [""]
    if plot:
        out += [f"![per-layer relative output error]({plot})", ""]
    out += ["## Per layer", ""]
    header = ["#", "layer", "shape", "held-out tokens"] + [f"err {m}" for m in res.methods] + ["best"]
    header += [f"H-err {m}" for m in res.methods]
    rows = []
    for i, le in enumerate(res.layers):
        errs = {m: le.output_error[m] for m in res.methods}
        finite = {m: e for m, e in errs.items() if _finite(e)}
        best = ""
        if len(finite) == len(errs) and finite:
            lo = min(finite.values())
            winners = [m for m, e in finite.items() if e == lo]
            best = winners[0] if len(winners) == 1 else "tie: " + ", ".join(winners)
        used = [f" ({le.method_used[m]})" if le.method_used[m] != m else "" for m in res.methods]
        rows.append([str(i), le.name, "x".join(map(str, le.shape)), str(le.tokens)]
                    + [_pct(errs[m]) + u for m, u in zip(res.methods, used, strict=True)] + [best]
                    + [_sci(le.hessian_error[m]) for m in res.methods])
    out += _table(header, rows, "rlll" + "r" * len(res.methods) + "l" + "r" * len(res.methods))
    out += [""]
    fallbacks = [(m, n, wr.fallback) for m, r in res.calibration.items() for n, wr in r.weights.items() if wr.fallback]
    if res.skipped or fallbacks:
        out += ["## Left in high precision / fallbacks", ""]
        out += [f"- skipped `{n}`: {why}" for n, why in res.skipped.items()]
        out += [f"- {m}: `{n}`: {why}" for m, n, why in fallbacks]
        out += [""]
    out += ["## Time per phase", ""]
    out += _table(["phase", "seconds"], [[k, f"{v:.2f}"] for k, v in res.timings.items()])
    out += [""]
    if res.modelopt is not None:
        out += ["## ModelOpt cross-check (local_hessian picks)", ""]
        mo = res.modelopt
        if mo.get("status") == "ran":
            out += [f"ModelOpt {mo['version']}: {mo['layers']} layers, {mo['blocks']} blocks; picks differing "
                    f"from fp4cal's (FP8 block-scale codes): {mo['differing']}, of which {mo['ties']} are exact "
                    f"loss ties (worst relative loss gap {mo['worst_rel_gap']:.3g}).", ""]
        else:
            out += [f"{mo['status']}.", ""]
    return "\n".join(out)


def write_report(res: EvalResult, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write report.md, report.json and (when matplotlib imports) layers.png into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(res)
    paths: dict[str, Path] = {}
    png = None
    if plot:
        try:
            from fp4cal.eval.plot import plot_layers

            png = out / "layers.png"
            plot_layers(res, png)
            paths["plot"] = png
        except ImportError as e:
            warnings.warn(f"layers.png not written: matplotlib is not importable ({e})", stacklevel=2)
            png = None
    paths["json"] = out / "report.json"
    write_bytes_atomic(paths["json"], (json.dumps(to_json(res, s), indent=1) + "\n").encode())
    paths["markdown"] = out / "report.md"
    write_bytes_atomic(paths["markdown"], (to_markdown(res, s, png.name if png else None) + "\n").encode())
    return paths
