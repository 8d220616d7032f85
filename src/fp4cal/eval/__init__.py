"""Evaluation: compare block-scale search methods on held-out data and write a report.

    res = evaluate(model, calib_batches, eval_batches, methods=("max", "mse", "local_hessian"))
    write_report(res, "report_dir")        # report.md, report.json, layers.png
"""

from fp4cal.eval.metrics import OutputError, Perplexity, block_quadratic, cosine, hessian_weighted_error, mean_pool
from fp4cal.eval.report import format_summary, summarize, to_json, to_markdown, write_report
from fp4cal.eval.result import EvalResult, LayerEval, model_kind
from fp4cal.eval.runner import check_methods, evaluate

__all__ = [
    "EvalResult",
    "LayerEval",
    "OutputError",
    "Perplexity",
    "block_quadratic",
    "check_methods",
    "cosine",
    "evaluate",
    "format_summary",
    "hessian_weighted_error",
    "mean_pool",
    "model_kind",
    "summarize",
    "to_json",
    "to_markdown",
    "write_report",
]
