"""Compile the search kernels a run will need, in a background thread, while the run does something else.

Triton compiles a kernel the first time it meets a specialisation (dtype of the weights, constexpr options, and
integer arguments that are 1 or multiples of 16). On a cold cache the local-Hessian sweep takes seconds to
compile; a calibration can start this before its forward pass and wait() for it before the search:

    handle = fp4cal.search.warmup(["local_hessian"], torch.bfloat16, "cuda")
    stats = capture_statistics(...)          # compiles meanwhile
    handle.wait()                            # seconds the warm-up took (0.0x on a warm cache)

Each specialisation is compiled by running the real entry point (search_triton) on a tiny all-zero input, so
whatever the entry point launches gets compiled; a warm Triton cache makes this a few small launches.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

import torch

from fp4cal.validation import BLOCK

# Shapes whose integer arguments cover the specialisations real weights hit: rows a multiple of 16, block columns
# a multiple of 16 (cin = 4096, 12288, ...) or not (cin = 384, 1536, ...).
_WARM_SHAPES = ((32, 16 * BLOCK), (32, 24 * BLOCK))


class WarmupHandle:
    """The running warm-up: wait() joins it and returns its seconds (re-raising its error, if any)."""

    def __init__(self, target) -> None:
        self._seconds: float | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name="fp4cal-warmup", daemon=True)
        self._thread.start()

    def _run(self, target) -> None:
        t0 = time.perf_counter()
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of wait()
            self._error = exc
        self._seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> float:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return float(self._seconds)


def _needs_kernels(device: torch.device) -> bool:
    from fp4cal.search import triton_available

    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def warmup(methods: Iterable[str], dtype: torch.dtype = torch.bfloat16,
           device: torch.device | str = "cuda", shapes: Iterable[tuple[int, int, bool]] | None = None,
           calibration_only: bool = False) -> WarmupHandle:
    """Start compiling, in a background thread, the kernel specialisations that searching weights of ``dtype``
    on ``device`` with ``methods`` ('mse', 'local_hessian'; 'max' needs none) will use: both mse launch forms
    (one-launch and two-launch), the local-Hessian prep, factor and sweep kernels, with and without the losses
    epilogue (search_scales / calibrate), 2-D weights and expert stacks. Returns a WarmupHandle; its wait()
    gives the seconds taken. Nothing to compile (CPU without the Triton interpreter, or triton missing): the
    thread returns at once. shapes: (cout, cin, stacked) of the weights the run will search (only their
    specialisation classes are compiled; default: both classes of _WARM_SHAPES, 2-D and stacked).
    calibration_only: only the variants calibrate() launches (with the losses epilogue): each sweep
    specialisation costs seconds to compile on a cold cache, so a run compiles what it uses and no more."""
    from fp4cal.search import METHODS

    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"warmup: method must be one of {METHODS}, got {m!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"warmup: dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    if shapes is None:
        plan = [(cout, cin, stack) for cout, cin in _WARM_SHAPES for stack in (False, True)]
    else:  # one representative per specialisation class: rows and block columns a multiple of 16 or not
        classes = {(cout % 16 == 0, (cin // BLOCK) % 16 == 0, bool(stack)) for cout, cin, stack in shapes}
        plan = [(32 if rows16 else 24, (16 if nb16 else 24) * BLOCK, stack) for rows16, nb16, stack in sorted(classes)]

    def run() -> None:
        if not _needs_kernels(device):
            return
        from fp4cal.search.kernels import prepare_factor, search_triton

        def losses(shape):  # calibrate() asks the sweep for its losses (LOSSES), a specialisation of its own
            return torch.zeros(shape[0] if len(shape) == 3 else 1, 2, dtype=torch.float64, device=device)

        if device.type == "cuda":
            torch.cuda.set_device(device)
        for cout, cin, stack in plan:
            nb = cin // BLOCK
            g = torch.tensor(1.0, device=device)
            shape = (2, cout, cin) if stack else (cout, cin)
            w = torch.zeros(shape, dtype=dtype, device=device)
            gg = g.expand(2).contiguous() if stack else g
            if "mse" in methods:
                for fused in ((None,) if calibration_only else (True, False)):
                    opts = {} if fused is None else {"fused": fused}
                    if not calibration_only:
                        search_triton(w, "mse", gg, None, checked=False, **opts)
                    search_triton(w, "mse", gg, None, checked=False, losses=losses(shape), **opts)
            if "local_hessian" in methods:
                h = torch.eye(BLOCK, device=device).expand(*shape[:-2], nb, BLOCK, BLOCK).contiguous()
                search_triton(w, "local_hessian", gg, h, checked=False, losses=losses(shape))
                if not calibration_only:
                    search_triton(w, "local_hessian", gg, h, checked=False)
                    search_triton(w, "local_hessian", gg, h, factor=prepare_factor(h))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return WarmupHandle(run)
