"""Shared helpers for the export tests: tiny transformers models built offline from configs, and
CalibrationResults made the way fp4cal.calibrate fills them (MSE block scales from the CPU reference
search, fused q/k/v and gate/up sharing one global amax)."""

from __future__ import annotations

import copy
import functools
import os
import re

import torch

from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.numerics import fake_quantize, quantize
from fp4cal.search import search_scales
from tiny_models import tiny_llama as _tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FUSED = (
    (r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj)\.weight$", "qkv"),
    (r"^(.*\.mlp)\.(gate_proj|up_proj)\.weight$", "gate_up"),
)


def tiny_llama(dtype=torch.bfloat16, seed=0, tie=False):
    model = _tiny_llama(seed, layers=1, intermediate=96, dtype=dtype, tie=tie)
    _randomize(model)
    return model.eval()
def tiny_qwen3_moe(dtype=torch.bfloat16, seed=0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _randomize(model)
    return model.eval()


def _randomize(model):
    """Heavy-tailed random weights (so blocks and tensors have different amaxes), norms near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p, dtype=torch.float32))
            else:
                w = torch.randn(p.shape) * torch.exp(0.5 * torch.randn(p.shape))
                p.copy_(0.05 * w)


def quantizable(model) -> list[str]:
    """Linear weights (not lm_head) and stacked expert parameters."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not mod_name.endswith("lm_head"):
            names.append(f"{mod_name}.weight")
    for name, p in model.named_parameters():
        if p.dim() == 3:
            names.append(name)
    return names


def build_result(model, names=None, method="mse", input_amax=True, share_fused=True) -> CalibrationResult:
    params = dict(model.named_parameters())
    names = quantizable(model) if names is None else names
    groups: dict[str, list[str]] = {}
    fused_of = {}
    for name in names:
        for pattern, tag in FUSED:
            m = re.match(pattern, name)
            if m:
                fused_of[name] = f"{m.group(1)}.{tag}"
                groups.setdefault(fused_of[name], []).append(name)
    gen = torch.Generator().manual_seed(1)
    result = CalibrationResult(method=method)
    input_amaxes: dict[str, torch.Tensor] = {}
    for name in names:
        w = params[name].detach()
        lead = w.shape[:-2]
        g = w.float().abs().amax(dim=(-2, -1))
        if share_fused and name in fused_of:
            members = [params[n].detach().float().abs().amax(dim=(-2, -1)) for n in groups[fused_of[name]]]
            g = torch.stack(members).amax(0)
        block_amax = search_scales(w, method, global_amax=g, backend="reference")
        block_scale = quantize(w, block_amax, g).block_scale
        ia = None
        if input_amax:  # members of a fused group read the same input: one amax for the group
            key = fused_of.get(name, name)
            if key not in input_amaxes:
                input_amaxes[key] = 0.5 + 4 * torch.rand(tuple(lead), generator=gen)
            ia = input_amaxes[key].clone()
        module_name = name.rsplit(".", 1)[0]
        result.weights[name] = WeightResult(
            name=name, module_name=module_name, kind="experts" if w.dim() == 3 else "linear", shape=tuple(w.shape),
            method=method, global_amax=g, block_amax=block_amax, block_scale=block_scale, input_amax=ia,
            fused_group=fused_of.get(name),
        )
    return result


def fake_quantized_state(model, result: CalibrationResult, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """name -> fp4cal's dequantized weight (fake_quantize with the result's scales), in ``dtype``."""
    params = dict(model.named_parameters())
    return {
        name: fake_quantize(params[name].detach(), wr.block_amax, wr.global_amax, dtype=dtype)
        for name, wr in result.weights.items()
    }


def fake_quantize_model(model, result: CalibrationResult):
    """The model with its quantized weights replaced in place by fp4cal's fake-quantized weights."""
    state = fake_quantized_state(model, result, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for name, q in state.items():
            model.get_parameter(name).copy_(q)
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so -0.0 != 0.0 and NaNs compare), for bit-for-bit equality."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


@functools.cache
def _case(kind: str):
    model = tiny_llama() if kind == "llama" else tiny_qwen3_moe()
    return model, build_result(model)


def case(kind: str):
    """(model, result) for "llama" or "moe", built once per test session (the MSE search is the slow
    part); callers get their own copy of the model so they may modify it."""
    model, result = _case(kind)
    return copy.deepcopy(model), result
