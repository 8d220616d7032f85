"""fp4cal eval: compare block-scale search methods on held-out data and write a report.

    fp4cal eval [MODEL_DIR] --calib FILE --eval FILE --methods max,mse,local_hessian --out REPORT_DIR \
        --samples 32 --eval-samples 32 --seq-len 128 --device auto

Defaults: the bundled all-MiniLM-L6-v2 and the disjoint calibration / evaluation splits of the bundled Shakespeare.
Data: with no --eval, or --eval equal to --calib, the two splits of that one source are used (disjoint by
construction, see fp4cal.calib.data); with two different sources, each is used whole.
Writes REPORT_DIR/report.md, report.json and layers.png, and prints the summary table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fp4cal.calib.data import read_text_file
from fp4cal.cli.common import CliError, check_min, check_report_dir, parse_device
from fp4cal.cli.model import DTYPES, load_model_for_run

DEFAULT_METHODS = "max,mse,local_hessian"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="Hugging Face model directory (default: bundled MiniLM)")
    p.add_argument("--calib", default=None, help="calibration text file or directory (default: bundled Shakespeare)")
    p.add_argument("--eval", dest="eval_source", default=None, metavar="FILE",
                   help="held-out text file or directory (default: the evaluation split of the --calib source)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="directory for report.md, report.json and layers.png")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (default: the checkpoint's)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also leave modules matching REGEX in high precision (repeatable)")
    p.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="only consider modules matching REGEX (repeatable)")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="MoE experts with fewer routed tokens fall back to mse (default: 16)")
    p.add_argument("--no-modelopt-check", action="store_true",
                   help="skip the ModelOpt cross-check (it runs only on CUDA when ModelOpt imports)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace report.md / report.json / layers.png of an earlier fp4cal report in REPORT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(msg: str, code: int = 2) -> int:
    print(f"fp4cal eval: error: {msg}", file=sys.stderr)
    return code


def _whole(source: str) -> list[str]:
    """Every text of a file or a directory of *.txt (no split)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"directory {source!r} has no *.txt file")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text {source!r} is neither a file nor a directory")
    return [read_text_file(p) for p in files]


def _same(a: str | None, b: str | None) -> bool:
    return b is None or (a is not None and Path(a).resolve() == Path(b).resolve())


def make_batches(tokenizer, calib: str | None, held_out: str | None, samples: int, eval_samples: int,
                 seq_len: int, batch_size: int) -> tuple[list, list, str, str]:
    """(calibration batches, evaluation batches, description of each). One source: its two disjoint splits;
    two different sources: each whole."""
    from fp4cal.calib.data import load_texts, to_batches, token_windows

    if _same(calib, held_out):
        c_texts, e_texts = load_texts(calib, "calib"), load_texts(calib, "eval")
        name = "bundled Shakespeare" if calib is None else calib
        c_desc, e_desc = f"{name}, calibration split", f"{name}, evaluation split (disjoint)"
    else:
        c_texts = load_texts(None, "calib") if calib is None else _whole(calib)
        e_texts = _whole(held_out)
        c_desc = "bundled Shakespeare, calibration split" if calib is None else calib
        e_desc = held_out
    cb = to_batches(token_windows(tokenizer, c_texts, samples, seq_len), batch_size)
    eb = to_batches(token_windows(tokenizer, e_texts, eval_samples, seq_len), batch_size)
    return cb, eb, f"{c_desc}: {samples} x {seq_len} tokens", f"{e_desc}: {eval_samples} x {seq_len} tokens"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # every argument and the report directory are checked before any work
        check_min(args, ("samples", "eval_samples", "seq_len", "batch_size", "min_expert_tokens"))
        parse_device(args.device)
        check_report_dir(args.out, "--out", args.overwrite)
    except CliError as e:
        return _fail(str(e))
    from fp4cal.calib.calibrate import DEFAULT_MIN_EXPERT_TOKENS
    from fp4cal.calib.targets import DEFAULT_EXCLUDE
    from fp4cal.eval import check_methods, evaluate, format_summary, write_report

    try:
        methods = check_methods(args.methods)
    except ValueError as e:
        return _fail(f"--methods: {e}")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        device = parse_device(args.device)
        model, tokenizer, _ = load_model_for_run(args, device)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        return _fail(str(e))
    try:
        cb, eb, c_desc, e_desc = make_batches(tokenizer, args.calib, args.eval_source, args.samples,
                                              args.eval_samples, args.seq_len, args.batch_size)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return _fail(str(e))
    t_load = time.perf_counter() - t0
    label = "all-MiniLM-L6-v2" if args.model_dir is None else Path(args.model_dir).resolve().name
    res = evaluate(
        model,
        cb,
        eb,
        methods,
        exclude=list(DEFAULT_EXCLUDE) + list(args.exclude),
        include=args.include,
        min_expert_tokens=DEFAULT_MIN_EXPERT_TOKENS if args.min_expert_tokens is None else args.min_expert_tokens,
        model_name=f"{label} ({type(model).__name__})",
        progress=not args.no_progress,
        modelopt_check=not args.no_modelopt_check,
    )
    res.setup = {"calibration data": c_desc, "evaluation data": e_desc, **res.setup}
    res.timings = {"load model + data": t_load, **res.timings}
    res.timings["total"] = time.perf_counter() - t0  # up to the report itself, whose files cannot time their writing
    t1 = time.perf_counter()
    paths = write_report(res, args.out)
    from fp4cal.export.io import user_mode

    for path in paths.values():  # the report's atomic writes go through mkstemp (0600): give the umask's mode
        os.chmod(path, user_mode(directory=False))
    print(format_summary(res))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t1:.2f} s")
    return 0
