"""What calibration produces: per-weight scales and statistics, consumed by export and eval."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class WeightResult:
    """Calibration outcome of one quantized weight.

    name: parameter name in the model, e.g. "model.layers.0.self_attn.q_proj.weight" or, for a stacked
        MoE expert parameter, "model.layers.0.mlp.experts.gate_up_proj".
    module_name: name of the owning module ("model.layers.0.self_attn.q_proj").
    kind: "linear" (weight [cout, cin]) or "experts" (stacked [E, cout, cin]; cin is the last dim).
    shape: the weight's shape as the search saw it ([cout, cin] or [E, cout, cin]).
    method: the method actually used (after any fallback).
    global_amax: fp32 [] or [E]; shared by every member of a fused group.
    block_amax: fp32 [..., cout, cin/16]; block_scale: float8_e4m3fn of the same shape (the stored code).
    input_amax: fp32 [] or [E]: max |x| seen at this weight's input (kept for W4A4 export); None if unseen.
    loss_max / loss_chosen: the search objective summed over blocks, with max scales and with the chosen ones.
    tokens: calibration tokens seen (int), or routed-token count per expert (int64 [E]).
    fused_group: name shared by weights a serving engine fuses (q/k/v, gate/up), else None.
    fallback: why this weight did not get the requested method (None if it did); per-expert reasons
        for expert stacks are listed in expert_fallback.
    transposed: the parameter is stored [E, cin, cout] in the model (e.g. gpt-oss experts); shape, block_amax
        and block_scale above are still in [..., cout, cin] layout, so writers must transpose the parameter.
    codes: packed E2M1 codes, uint8 [..., cout, cin/2] (fp4cal.numerics.quantize's layout), when the rounding
        is not round-to-nearest of the weight with these scales (GPTQ moves codes); None: writers and
        fake-quantization quantize the weight themselves with block_amax / global_amax.
    hessian_fallback_blocks: (local_hessian) blocks searched with the squared error instead, because their
        16x16 Hessian carried no information (e.g. input channels never active in the calibration data).
    """

    name: str
    module_name: str
    kind: str
    shape: tuple[int, ...]
    method: str
    global_amax: torch.Tensor
    block_amax: torch.Tensor
    block_scale: torch.Tensor
    input_amax: torch.Tensor | None = None
    loss_max: float = float("nan")
    loss_chosen: float = float("nan")
    tokens: int | torch.Tensor = 0
    fused_group: str | None = None
    fallback: str | None = None
    expert_fallback: dict[int, str] = field(default_factory=dict)
    transposed: bool = False
    codes: torch.Tensor | None = None
    hessian_fallback_blocks: int = 0


@dataclass
class CalibrationResult:
    """All weights of one calibration run. weights is keyed by parameter name; skipped maps a parameter
    name to the reason it was left in high precision; timings holds seconds per phase."""

    method: str
    weights: dict[str, WeightResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    forward_calls: int = 0
