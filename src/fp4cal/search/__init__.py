"""Per-block scale search: validation, then dispatch to the fused Triton kernels or the PyTorch paths.

Backends (all pick the same candidate for every block, up to float64 ties):
- 'triton': the fused kernels (kernels.py), for CUDA tensors;
- 'torch': the kernels' windows and bounds vectorised in PyTorch (windowed.py), any device: the CPU path;
- 'reference': the brute force over all 126 candidates (reference.py), the tests' oracle.
Dispatch rule: a CUDA tensor with Triton importable runs 'triton'; anything else runs 'torch'.
``FP4CAL_TRITON=0`` forces 'torch'; ``backend=`` chooses explicitly.

Hessian blocks with zero trace are searched with the squared error (hessian_blocks.py); a Hessian that is not
positive semi-definite is refused.
"""

from __future__ import annotations

import os

import torch

from fp4cal.search.hessian_blocks import check_psd, fallback_blocks
from fp4cal.search.reference import reference_losses, search_reference
from fp4cal.search.windowed import search_windowed
from fp4cal.validation import check_global_amax, check_hessian, check_weight

METHODS = ("max", "mse", "local_hessian")
BACKENDS = ("triton", "torch", "reference")
__all__ = ["BACKENDS", "METHODS", "choose_backend", "fallback_blocks", "search_scales", "search_scales_and_losses",
           "triton_available", "warmup"]


def warmup(methods, dtype: torch.dtype = torch.bfloat16, device="cuda", shapes=None, calibration_only: bool = False):
    """Compile the search kernels a run will need in a background thread; returns a handle whose wait() gives
    the seconds it took (fp4cal.search.precompile.warmup)."""
    from fp4cal.search.precompile import warmup as _warmup

    return _warmup(methods, dtype, device, shapes, calibration_only)


def triton_available() -> bool:
    """True when the triton package imports (its kernels still need a CUDA tensor or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(w: torch.Tensor, method: str) -> str:
    """'triton' or 'torch' for this call, by the dispatch rule above ('reference' for max, which searches nothing)."""
    if method == "max":
        return "reference"
    if os.environ.get("FP4CAL_TRITON", "1") == "0":
        return "torch"
    if w.is_cuda and triton_available():
        return "triton"
    return "torch"


def search_scales(
    w: torch.Tensor,
    method: str,
    hessian: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    backend: str | None = None,
    losses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block best amax for NVFP4 quantization of w.

    w: [cout, cin] or an expert stack [E, cout, cin], float32|float16|bfloat16, cin % 16 == 0.
    method: 'max' (each block's own amax), 'mse' (argmin ||w - q(w)||^2 over the 126 FP8 scale
        candidates) or 'local_hessian' (argmin dw^T H_j dw; a block whose H_j has zero trace uses the squared
        error instead: hessian_blocks.fallback_blocks counts them).
    hessian: [cin/16, 16, 16] (or [E, cin/16, 16, 16]; an expert stack may share one [cin/16, 16, 16]),
        required for local_hessian, on w's device; each block positive semi-definite (ValueError naming the
        block otherwise, tolerance hessian_blocks.PSD_RTOL).
    global_amax: scalar or [E]; default max |w| per tensor.
    backend: None (dispatch rule), 'triton', 'torch' or 'reference'.
    losses: optional float64 [E or 1, 2] zeros, filled with the objective at the 'max' and the chosen scales
        (see search_scales_and_losses).
    Returns fp32 [..., cout, cin/16]: the chosen block amax; fake_quantize(w, it, global_amax) applies it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be None, 'triton', 'torch' or 'reference', got {backend!r}")
    if backend is None:
        backend = choose_backend(w, method) if isinstance(w, torch.Tensor) else "reference"
    if method == "max":
        backend = "reference"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' was asked for but the triton package is not importable")
    # The kernel path scans values (finite, g >= 0) on the device inside its own prep launch and raises the same
    # messages; the host waits for that launch only, not for the sweep (see kernels.search_triton).
    scan = backend != "triton"
    check_weight(w, "w", allow_stack=True, values=scan)
    g = check_global_amax(global_amax, w, values=scan)
    h = check_hessian(hessian, w, values=scan) if method == "local_hessian" else None
    if h is not None and scan:
        check_psd(h)
    if backend == "reference":
        out = search_reference(w, method, g, h)
    elif backend == "torch":
        return search_windowed(w, method, g, h, losses)
    else:
        from fp4cal.search.kernels import search_triton

        return search_triton(w, method, g, h, checked=False, losses=losses)
    if losses is not None:
        losses.copy_(reference_losses(w, g, out, h if method == "local_hessian" else None))
    return out


def search_scales_and_losses(
    w: torch.Tensor,
    method: str,
    hessian: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """search_scales, plus the objective of the result for a report, without a second pass over the weights on
    the kernel path: (block_amax fp32 [..., cout, cin/16], losses float64 [2] on w's device: the summed
    objective at the 'max' scales and at the chosen ones, over all experts of a stack). The objective is the one
    each block was searched with (Hessian-weighted; squared error for mse and for zero-trace blocks). No host
    synchronisation beyond search_scales' own: read the losses when convenient."""
    n_e = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 3 else 1
    dev = w.device if isinstance(w, torch.Tensor) else None
    losses = torch.zeros(n_e, 2, dtype=torch.float64, device=dev)
    amax = search_scales(w, method, hessian, global_amax, backend, losses=losses)
    return amax, losses.sum(0)
