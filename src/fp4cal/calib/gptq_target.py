"""method='gptq' for one target: full Hessian from the capture -> fp4cal.gptq.gptq_round -> WeightResult.

    linear:  H = the target's input sum x x^T / n ([cin, cin], shared by q/k/v and gate/up through the capture)
    experts: one H per expert from its routed tokens; an expert with fewer than min_expert_tokens tokens gets
             the identity Hessian, with which GPTQ is exactly round-to-nearest with MSE-optimal scales (as the
             other methods fall back), and expert_fallback says which
    no tokens at all: round-to-nearest with mse scales (fallback named)

Losses (WeightResult.loss_max / loss_chosen): the layer-output objective tr(dW H dW^T) = sum_t ||dW x_t||^2 / n
with the undamped calibration H, for round-to-nearest with max scales and for the GPTQ result (summed over
experts for a stack, fallback experts measured with the identity).
"""

from __future__ import annotations

import torch

from fp4cal.calib.capture import CaptureStats
from fp4cal.calib.objective import block_scales
from fp4cal.calib.result import WeightResult
from fp4cal.calib.targets import Target
from fp4cal.gptq import GPTQConfig, gptq_round, layer_objective
from fp4cal.numerics import fake_quantize, pack_codes


def _linear_hessian(t: Target, stats: CaptureStats) -> tuple[torch.Tensor | None, int]:
    slot = stats.inputs.get(t.module_name)
    if slot is None or slot.tokens == 0 or slot.full is None or slot.full.n == 0:
        return None, 0 if slot is None else slot.tokens
    return slot.full.normalized(), slot.tokens


def solve_gptq_target(
    t: Target,
    stats: CaptureStats,
    global_amax: torch.Tensor,
    cfg: GPTQConfig,
    min_expert_tokens: int,
    backend: str | None = None,
) -> tuple[WeightResult, list[str]]:
    """GPTQ one target (see the module docstring). global_amax: fp32 [] or [E] (cloned by the caller).
    Returns (the result, warning messages for the caller to emit)."""
    w = t.weight()
    if t.transposed:
        w = w.contiguous()
    warn: list[str] = []
    if t.kind == "linear":
        h, tokens = _linear_hessian(t, stats)
        slot = stats.inputs.get(t.module_name)
        input_amax = slot.amax.float().clone() if slot is not None and slot.amax is not None and tokens else None
        if h is None:
            h = torch.eye(w.shape[-1], dtype=torch.float64)
            why = "no calibration tokens reached this layer; rounded to nearest with mse scales"
            cfg = GPTQConfig("mse", cfg.damp, cfg.block_size)
        else:
            why = None
        ws, hs, gs, expert_fallback = [w], [h.to(w.device)], [global_amax], {}
    else:
        st = stats.experts.get(t.module_name)
        E = int(w.shape[0])
        counts = st.counts.clone() if st is not None else torch.zeros(E, dtype=torch.int64)
        tokens = counts
        amax = None if st is None else (st.in_amax if t.role == "in" else st.mid_amax)
        seen = counts.to(amax.device) > 0 if amax is not None else None
        input_amax = None
        if seen is not None and bool(seen.any()):  # unseen experts get the stack's max, as for the other methods
            input_amax = torch.where(seen, amax, amax[seen].max()).float()
        fulls = None if st is None else (st.in_full if t.role == "in" else st.mid_full)
        expert_fallback, hs = {}, []
        for e in range(E):
            n = int(counts[e])
            if fulls is None or n < min_expert_tokens:
                expert_fallback[e] = (f"{n} routed tokens < min_expert_tokens = {min_expert_tokens}; rounded to "
                                      "nearest (identity Hessian: mse scales)")
                hs.append(torch.eye(w.shape[-1], dtype=torch.float64, device=w.device))
            else:
                hs.append(fulls[e].normalized().to(w.device))
        ws, gs, why = list(w), list(global_amax), None
        if len(expert_fallback) == E:
            why = f"no expert had >= min_expert_tokens = {min_expert_tokens} routed tokens; rounded to nearest, mse"
            cfg = GPTQConfig("mse", cfg.damp, cfg.block_size)
            expert_fallback = {}
    outs = [gptq_round(we, he, ge, cfg, backend) for we, he, ge in zip(ws, hs, gs, strict=True)]
    loss_max = sum(layer_objective(we, fake_quantize(we, None, ge, torch.float32), he)
                   for we, he, ge in zip(ws, hs, gs, strict=True))
    loss_chosen = sum(layer_objective(we, o.weight, he) for we, o, he in zip(ws, outs, hs, strict=True))
    method = "gptq"
    if t.kind == "linear":
        if why is None and outs[0].fallback is not None:
            why = outs[0].fallback
        if why is not None:
            method = outs[0].scales_used
            warn.append(f"{t.name}: {why}")
    else:
        if why is not None:
            method = "mse"
            warn.append(f"{t.name}: {why}")
        for e, o in enumerate(outs):
            if o.fallback is not None and e not in expert_fallback:
                expert_fallback[e] = o.fallback
                warn.append(f"{t.name}[expert {e}]: {o.fallback}")
    stack = t.kind == "experts"
    block_amax = torch.stack([o.block_amax for o in outs]) if stack else outs[0].block_amax
    codes = torch.stack([o.codes for o in outs]) if stack else outs[0].codes
    scale, _ = block_scales(block_amax, global_amax)
    return WeightResult(
        name=t.name,
        module_name=t.module_name,
        kind=t.kind,
        shape=tuple(w.shape),
        method=method,
        global_amax=global_amax,
        block_amax=block_amax,
        block_scale=scale,
        input_amax=input_amax,
        loss_max=float(loss_max),
        loss_chosen=float(loss_chosen),
        tokens=tokens,
        fused_group=t.fused_group,
        fallback=why,
        expert_fallback=expert_fallback,
        transposed=t.transposed,
        codes=pack_codes(codes),
    ), warn
