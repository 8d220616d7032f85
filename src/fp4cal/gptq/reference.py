"""float64 reference of GPTQ rounding onto NVFP4: the truth gptq_round is tested against.

Same procedure as fp4cal.gptq.core (read its docstring), written for reading: working weights in float64,
one column at a time, every error propagated at once (no lazy blocks), and the dynamic scale search spelled
out over the 126 candidates. Each rounding decision is numerics' fp32 rounding of fp32(working value).

Parity: given the fast path's output (``follow``), the reference compares each of its own decisions with the
fast path's. Where they differ, the decision is a float64 tie when the two choices' losses agree within
``tie_rtol`` relative (column: (x - q)^2 per weight; dynamic scale: the group's conditional-Hessian loss);
the reference then adopts the fast path's choice, so both stay on one trajectory, and counts it. Any other
difference is a mismatch (also adopted, so that one mismatch is counted once, not as a cascade).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4cal.gptq.core import GPTQConfig, GPTQOutput, block_scale_values, prepare, round_column, static_block_amax
from fp4cal.gptq.hessian import conditional_block_hessians
from fp4cal.numerics import e2m1_value, global_scale, scale_candidates
from fp4cal.search.reference import block_error, block_loss, candidate_block_scales
from fp4cal.validation import BLOCK


@dataclass
class Parity:
    """Decisions compared with a followed fast-path output: rounding (one per weight) and scale (one per
    row and group, dynamic only) ties and mismatches."""

    code_ties: int = 0
    code_mismatches: int = 0
    scale_ties: int = 0
    scale_mismatches: int = 0


def _tie(loss_a: torch.Tensor, loss_b: torch.Tensor, rtol: float) -> torch.Tensor:
    return (loss_a - loss_b).abs() <= rtol * torch.maximum(loss_a.abs(), loss_b.abs()).clamp_min(1e-300)


def gptq_reference(
    w: torch.Tensor,
    hessian: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
    cfg: GPTQConfig | None = None,
    follow: GPTQOutput | None = None,
    tie_rtol: float = 1e-6,
) -> tuple[GPTQOutput, Parity]:
    """float64 GPTQ of w [cout, cin] with hessian [cin, cin]; arguments as fp4cal.gptq.gptq_round.
    Returns (output, parity counts against ``follow``; all zero when follow is None)."""
    cfg = cfg or GPTQConfig()
    par = Parity()
    g, w0, f, fallback = prepare(w, hessian, global_amax, cfg, backend="reference")
    if fallback is not None:
        return fallback, par
    cout, cin = w0.shape
    u = f.u  # float64 upper, H'^-1 = u^T u
    W = w0.double()
    dynamic = cfg.scales == "local_hessian_dynamic"
    if dynamic:
        hc = conditional_block_hessians(u)  # float64 [nb, 16, 16]
        s_cand = candidate_block_scales(global_scale(g))  # fp32 [126]
        a_cand = scale_candidates(g)
        amax = torch.empty(cout, cin // BLOCK, dtype=torch.float32, device=w.device)
    else:
        amax = static_block_amax(w0, hessian, g, cfg.scales, "reference", f.damp)
    s_b = block_scale_values(amax, g) if not dynamic else torch.empty_like(amax)
    codes = torch.empty(cout, cin, dtype=torch.int32, device=w.device)
    q = torch.empty(cout, cin, dtype=torch.float32, device=w.device)
    for i in range(cin):
        j = i // BLOCK
        if dynamic and i % BLOCK == 0:
            grp = W[:, i : i + BLOCK].float().unsqueeze(1)  # [cout, 1, 16]
            losses = torch.stack(
                [block_loss(block_error(grp, s.expand(cout, 1)), hc[j : j + 1])[:, 0] for s in s_cand], dim=1
            )  # float64 [cout, 126]
            pick = losses.argmin(dim=1)  # first minimum: ties to the smaller candidate, as the search
            if follow is not None:
                theirs = torch.searchsorted(a_cand, follow.block_amax[:, j].contiguous())
                diff = pick != theirs
                tie = diff & _tie(losses.gather(1, pick[:, None])[:, 0], losses.gather(1, theirs[:, None])[:, 0],
                                  tie_rtol)
                par.scale_ties += int(tie.sum())
                par.scale_mismatches += int((diff & ~tie).sum())
                pick = theirs
            amax[:, j] = a_cand[pick]
            s_b[:, j] = s_cand[pick]
        x = W[:, i]
        c, qc = round_column(x, s_b[:, j])
        if follow is not None:
            fc = follow.codes[:, i]
            fq = e2m1_value(fc & 7) * s_b[:, j]  # decoded from the followed code, not taken from its .weight
            fq = torch.where((fc & 8) > 0, -fq, fq)
            diff = c != fc
            tie = diff & _tie((x - qc.double()) ** 2, (x - fq.double()) ** 2, tie_rtol)
            par.code_ties += int(tie.sum())
            par.code_mismatches += int((diff & ~tie).sum())
            c, qc = fc.clone(), fq.clone()
        codes[:, i] = c
        q[:, i] = qc
        err = (x - qc.double()) / u[i, i]
        W[:, i:] -= err[:, None] * u[i, i:][None, :]
    return GPTQOutput(codes, q, amax, f.damp, int(f.dead.sum()), None, cfg.scales), par
