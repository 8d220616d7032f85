"""What calibration produces: per-weight scales and statistics, consumed by export and eval."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

FP8_TAG = "float8_e4m3fn"  # marks an FP8 tensor sent as its bytes (WeightResult.to_dict(fp8_as_bytes=True))


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

    def to(self, device: torch.device | str) -> WeightResult:
        """A copy with every tensor field on ``device`` (the others shared)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def without_blocks(self) -> WeightResult:
        """A copy whose per-block tensors (block_amax, block_scale, codes) are meta tensors of the same shapes and
        dtypes: what a summary reads (losses, tokens, fallbacks) without what only a writer needs."""
        blocks = {k: getattr(self, k) for k in ("block_amax", "block_scale", "codes")}
        return replace(self, **{k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in blocks.items()
                                if isinstance(v, torch.Tensor)})

    def to_dict(self, exclude: tuple[str, ...] = (), fp8_as_bytes: bool = False) -> dict:
        """Every field (but those in ``exclude``) as plain Python values and CPU tensors: what torch.save
        (weights_only) and pickling collectives carry portably. shape becomes a list; from_dict reverses it.
        fp8_as_bytes: FP8 tensors (block_scale) as ("float8_e4m3fn", their uint8 view), for
        torch.distributed's object collectives, whose unpickling does not rebuild fp8 storages."""
        out = {}
        for f in fields(self):
            if f.name in exclude:
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                if fp8_as_bytes and v.dtype == torch.float8_e4m3fn:
                    v = (FP8_TAG, v.view(torch.uint8))
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict, device: torch.device | str | None = None) -> WeightResult:
        """The WeightResult of to_dict's output (tensors moved to ``device`` when given; missing optional fields
        take their defaults). Raises ValueError naming an unknown or missing field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"WeightResult.from_dict: unknown field(s) {unknown}")
        kw = {}
        for k, v in data.items():
            if isinstance(v, tuple) and len(v) == 2 and v[0] == FP8_TAG:  # to_dict(fp8_as_bytes=True)
                v = v[1].view(torch.float8_e4m3fn)
            if isinstance(v, torch.Tensor):
                v = v.to(device) if device is not None else v.clone()
            elif k == "shape":
                v = tuple(int(x) for x in v)
            elif k == "expert_fallback":
                v = {int(e): str(r) for e, r in v.items()}
            kw[k] = v
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(f"WeightResult.from_dict: {e}") from None


@dataclass
class CalibrationResult:
    """All weights of one calibration run. weights is keyed by parameter name; skipped maps a parameter
    name to the reason it was left in high precision; timings holds seconds per phase."""

    method: str
    weights: dict[str, WeightResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    forward_calls: int = 0

    def to_dict(self) -> dict:
        """Plain values and CPU tensors (see WeightResult.to_dict); from_dict reverses it."""
        return {
            "method": self.method,
            "weights": {n: wr.to_dict() for n, wr in self.weights.items()},
            "skipped": dict(self.skipped),
            "timings": dict(self.timings),
            "forward_calls": self.forward_calls,
        }

    @classmethod
    def from_dict(cls, data: dict, device: torch.device | str | None = None) -> CalibrationResult:
        """The CalibrationResult of to_dict's output; weight tensors moved to ``device`` when given."""
        return cls(
            method=data["method"],
            weights={n: WeightResult.from_dict(w, device) for n, w in data["weights"].items()},
            skipped=dict(data.get("skipped", {})),
            timings=dict(data.get("timings", {})),
            forward_calls=int(data.get("forward_calls", 0)),
        )
