"""Reference scale searches in plain PyTorch (any device): the ground truth the kernels must match.

For every 16-weight block, each objective picks one of the 126 candidates c (candidate amax
g * v_c / 448, v_c the c-th finite positive FP8-E4M3 value), whose block scale is s_c = fp32(v_c * s_g):

    dw_c = w - q_c(w)                         signed, 16 values, rounding exactly as in fp4cal.numerics
    mse:           loss_c = sum_k dw_c[k]^2
    local_hessian: loss_c = dw_c^T H_j dw_c   H_j: the 16x16 Hessian of the block's input channels j

and keeps argmin_c loss_c, ties to the smaller candidate. A block whose H_j has zero trace (no calibration
input ever reached its 16 channels) uses the mse loss instead (fp4cal.search.hessian_blocks). dw is formed in
float32 exactly as a serving engine would dequantize; the loss is summed in float64, so the reference is the
truth to ~1e-15. Rows are processed in chunks with a running best, so extra memory is O(blocks), never 126 x blocks.
"""

from __future__ import annotations

import torch

from fp4cal.numerics import (
    block_max,
    block_scale,
    fp8_e4m3_values,
    global_scale,
    scale_candidates,
    weight_blocks,
)
from fp4cal.search.hessian_blocks import with_fallback
from fp4cal.validation import BLOCK

# Rows per chunk: keeps the float64 temporaries of one candidate around 32 MB.
_CHUNK_ELEMS = 1 << 22


def candidate_block_scales(s_g: torch.Tensor) -> torch.Tensor:
    """s_c = fp32(v_c * s_g) for the 126 candidates; s_g scalar tensor -> fp32 [126]."""
    return fp8_e4m3_values(s_g.device) * s_g.float()


def e2m1_times_scale(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q = fp32(E2M1(fp32(a / s)) * s) for fp32 magnitudes a >= 0 and block scales s (broadcastable; q = 0
    where s == 0): numerics.e2m1_round's rounding, written as the kernels write it (fp4cal.search.kernels):
    with E = clamp(exponent(x), 0, 2), fp32(fp32(x + 2^(E+22)) - 2^(E+22)) rounds x to the E2M1 step 2^(E-1)
    with ties to even; x is first clamped to 8 (any x > 6 saturates to 6 either way; this also keeps inf out).
    Each torch op rounds once (no contraction), so the result is bit-identical to the definition."""
    x = torch.where(s > 0, a / torch.where(s > 0, s, 1.0), 0.0).clamp_max(8.0)
    xb = (x.view(torch.int32) & 0x7F800000).clamp(0x3F800000, 0x40800000)
    magic = (xb + (22 << 23)).view(torch.float32)
    return ((x + magic) - magic).clamp_max(6.0) * s


def block_error(wb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Signed fp32 error w - q(w) of blocks wb [..., 16] quantized with block scales s [...]: [..., 16]."""
    a = wb.abs()
    d = a - e2m1_times_scale(a, s.unsqueeze(-1))
    return torch.where(wb < 0, -d, d)


def block_loss_cols(d: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """float64 [nb, R] loss of float64 signed errors d [nb, R, 16], block-column major: sum d^2, or d^T H_j d
    with hessian float64 [nb, 16, 16] (one bmm: block column j's R rows against H_j)."""
    if hessian is None:
        return (d * d).sum(-1)
    return (torch.bmm(d, hessian) * d).sum(-1)


def block_loss(dw: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """float64 loss of signed errors dw [R, nb, 16]: sum dw^2, or dw^T H_j dw with hessian [nb, 16, 16].

    block_loss_cols on the block-column-major copy. The CPU path (windowed.py) calls that same function on its own
    batches of block columns and rows; the bmm's blocking can round the last bit differently for another batch
    size, which could turn only an exact float64 tie between two candidates (its tests: equal picks everywhere)."""
    d = dw.double()
    if hessian is None:
        return (d * d).sum(-1)
    return block_loss_cols(d.transpose(0, 1).contiguous(), hessian.double()).T


def _search_2d(w: torch.Tensor, g: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Best candidate index (int64 [cout, nb]) for one weight [cout, cin] with global amax g []."""
    cout, cin = w.shape
    nb = cin // BLOCK
    s_c = candidate_block_scales(global_scale(g))
    best_idx = torch.zeros(cout, nb, dtype=torch.int64, device=w.device)
    rows = max(1, _CHUNK_ELEMS // cin)
    for r0 in range(0, cout, rows):
        wb = weight_blocks(w[r0 : r0 + rows])
        best = torch.full(wb.shape[:2], float("inf"), dtype=torch.float64, device=w.device)
        idx = best_idx[r0 : r0 + rows]
        for c in range(s_c.numel()):
            loss = block_loss(block_error(wb, s_c[c].expand(wb.shape[:2])), hessian)
            better = loss < best  # strict: ties keep the smaller candidate
            best = torch.where(better, loss, best)
            idx.masked_fill_(better, c)
    return best_idx


def search_reference(
    w: torch.Tensor, method: str, g: torch.Tensor, hessian: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block best amax, fp32 [..., cout, cin/16], for validated inputs.

    w: [cout, cin] or [E, cout, cin]; g: fp32 [] or [E]; hessian: [nb, 16, 16] or [E, nb, 16, 16]
    (local_hessian only). method: 'max' | 'mse' | 'local_hessian'.
    """
    if method == "max":
        return block_max(w)
    if w.dim() == 3:
        outs = []
        for e in range(w.shape[0]):
            h = None if hessian is None else (hessian[e] if hessian.dim() == 4 else hessian)
            outs.append(search_reference(w[e], method, g[e], h))
        return torch.stack(outs)
    h = with_fallback(hessian) if method == "local_hessian" else None
    idx = _search_2d(w, g, h)
    return scale_candidates(g)[idx]



def reference_losses(
    w: torch.Tensor, g: torch.Tensor, block_amax: torch.Tensor, hessian: torch.Tensor | None
) -> torch.Tensor:
    """float64 [E or 1, 2]: per tensor, the summed objective at its 'max' scales (each block's own amax) and at
    block_amax, as the kernels' LOSSES epilogue adds them (zero-trace Hessian blocks with the mse loss).

    w: [cout, cin] or [E, cout, cin]; g: [] or [E]; block_amax: [..., cout, cin/16]; hessian: None (mse) or
    [nb, 16, 16] / [E, nb, 16, 16]."""
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    a3 = block_amax if block_amax.dim() == 3 else block_amax.unsqueeze(0)
    g1 = g.float().reshape(-1).expand(w3.shape[0])
    out = torch.zeros(w3.shape[0], 2, dtype=torch.float64, device=w.device)
    rows = max(1, _CHUNK_ELEMS // w3.shape[-1])
    for e in range(w3.shape[0]):
        h = None if hessian is None else with_fallback(hessian[e] if hessian.dim() == 4 else hessian)
        s_g = global_scale(g1[e])
        for k, amax in enumerate((block_max(w3[e]), a3[e])):
            s_b = block_scale(amax, s_g)
            for r0 in range(0, w3.shape[1], rows):
                wb = weight_blocks(w3[e, r0 : r0 + rows])
                out[e, k] += block_loss(block_error(wb, s_b[r0 : r0 + rows]), h).sum()
    return out
