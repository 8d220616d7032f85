"""The search objective of a whole weight, for reporting: sum over blocks of dw^T H_j dw (or sum dw^2).

dw = w - q(w) is formed exactly as fp4cal.numerics dequantizes; the sum is float64, in row chunks so that
extra memory stays O(chunk), whatever the weight's size.
"""

from __future__ import annotations

import torch

from fp4cal.numerics import block_scale_code, global_scale, weight_blocks
from fp4cal.search.reference import block_error, block_loss

# Weights per chunk: ~16 MB of float32 temporaries on the CPU; larger on a GPU, where per-op launch overhead
# would otherwise dominate (64 MB per temporary).
_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 24}


def block_scales(block_amax: torch.Tensor, global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 code v as float8_e4m3fn, fp32 block scale s_b = v * s_g), both [..., cout, cin/16].

    block_amax: fp32 [..., cout, cin/16]; global_amax: fp32 [] or [E].
    """
    s_g = global_scale(global_amax).reshape(*global_amax.shape, 1, 1)
    v = block_scale_code(block_amax, s_g)
    return v.to(torch.float8_e4m3fn), v * s_g


def objective(
    w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor | None
) -> float:
    """Summed loss of quantizing w [cout, cin] or [E, cout, cin] with these scales.

    hessian: None (squared error), [cin/16, 16, 16], or [E, cin/16, 16, 16] for a stack.
    """
    return objectives(w, [block_amax], global_amax, hessian)[0]


def objectives(
    w: torch.Tensor, block_amaxes: list[torch.Tensor], global_amax: torch.Tensor, hessian: torch.Tensor | None
) -> list[float]:
    """objective() for several sets of block amax of one weight, in one pass over w and one host sync."""
    if w.dim() == 2:
        w, global_amax = w.unsqueeze(0), global_amax.reshape(1)
        block_amaxes = [b.unsqueeze(0) for b in block_amaxes]
        hessian = None if hessian is None else hessian.unsqueeze(0)
    totals = torch.zeros(len(block_amaxes), dtype=torch.float64, device=w.device)
    for e in range(w.shape[0]):
        h = None if hessian is None else (hessian[e] if hessian.dim() == 4 else hessian)
        s_bs = [block_scales(b[e], global_amax[e])[1] for b in block_amaxes]
        rows = max(1, _CHUNK_ELEMS.get(w.device.type, 1 << 22) // w.shape[-1])
        for r0 in range(0, w.shape[1], rows):
            wb = weight_blocks(w[e, r0 : r0 + rows])
            for k, s_b in enumerate(s_bs):
                totals[k] += block_loss(block_error(wb, s_b[r0 : r0 + rows]), h).sum()
    return totals.tolist()
