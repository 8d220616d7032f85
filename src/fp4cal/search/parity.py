"""Compare two sets of block-scale picks on the same inputs, the way every parity check in fp4cal does.

Two picks of one block agree when they are equal, or when their losses, computed in float64 by the
reference objective, are equal within ``rel_tol`` (a tie: either pick is optimal to that precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4cal.numerics import block_scale, block_scale_code, global_scale, weight_blocks
from fp4cal.search.reference import block_error, block_loss


@dataclass
class ParityReport:
    blocks: int
    differing: int  # blocks whose picks differ
    ties: int  # of those, float64 losses equal within rel_tol
    worst_rel_gap: float  # largest relative loss gap among differing blocks (0 if none)

    @property
    def bad(self) -> int:
        return self.differing - self.ties


def pick_losses(w: torch.Tensor, g: torch.Tensor, amax: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """float64 objective of each block of w [cout, cin] quantized with block amax [cout, nb]: [cout, nb]."""
    s_g = global_scale(g)
    s_b = block_scale(amax, s_g)
    return block_loss(block_error(weight_blocks(w), s_b), hessian)


def compare_picks(
    w: torch.Tensor,
    g: torch.Tensor,
    amax_a: torch.Tensor,
    amax_b: torch.Tensor,
    hessian: torch.Tensor | None = None,
    rel_tol: float = 1e-6,
) -> ParityReport:
    """Parity of two pick sets for one weight w [cout, cin] (hessian [nb,16,16] or None for MSE)."""
    s_g = global_scale(g)
    # Compare the stored FP8 codes: two amax values that round to the same code are the same pick.
    diff = block_scale_code(amax_a, s_g) != block_scale_code(amax_b, s_g)
    n = int(diff.sum())
    if n == 0:
        return ParityReport(amax_a.numel(), 0, 0, 0.0)
    rows = diff.any(dim=1).nonzero().squeeze(1)
    wr, da, db = w[rows], amax_a[rows], amax_b[rows]
    la = pick_losses(wr, g, da, hessian)[diff[rows]]
    lb = pick_losses(wr, g, db, hessian)[diff[rows]]
    gap = (la - lb).abs() / torch.maximum(la.abs(), lb.abs()).clamp_min(1e-300)
    gap = torch.where((la == lb), torch.zeros_like(gap), gap)
    return ParityReport(amax_a.numel(), n, int((gap <= rel_tol).sum()), float(gap.max()))
