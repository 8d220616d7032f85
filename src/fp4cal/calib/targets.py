"""Which weights of a model get quantized: nn.Linear weights and Hugging Face stacked MoE experts.

A target is one weight tensor the search will see as [cout, cin] (nn.Linear) or [E, cout, cin] (an expert
stack). Everything found but not quantized goes to ``skipped`` with the reason, so a caller can always
tell what was left in high precision and why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fp4cal.validation import BLOCK, FLOAT_DTYPES

# Module names (re.search) left in high precision by default: the output head (its error goes straight into
# the logits) and MoE routers (tiny, and a flipped routing decision costs far more than the bits saved).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"(^|\.)(gate|router)$",
    r"(^|\.)shared_expert_gate$",
)

# Sibling projections that serving engines (vLLM, TensorRT-LLM) merge into one GEMM: such weights must share
# one global amax, or the merged tensor cannot keep every member's exact scales.
FUSED_SIBLINGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("qkv", frozenset({"q_proj", "k_proj", "v_proj"})),
    ("qkv", frozenset({"query", "key", "value"})),
    ("qkv_a", frozenset({"q_a_proj", "kv_a_proj_with_mqa"})),
    ("gate_up", frozenset({"gate_proj", "up_proj"})),
    ("gate_up", frozenset({"w1", "w3"})),
)


@dataclass
class Target:
    """One weight to quantize.

    name: parameter name ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.down_proj").
    module: the owning module; attr: the parameter's attribute on it ("weight", "gate_up_proj", "down_proj").
    kind: "linear" or "experts". role (experts only): "in" when fed by the routed hidden states (gate_up_proj
        or up_proj), "mid" when fed by the expert's own intermediate activations (down_proj).
    transposed: the parameter is stored [E, cin, cout] (gpt-oss style); weight() always returns [.., cout, cin].
    fused_group: shared by weights an engine fuses (see FUSED_SIBLINGS), else None.
    """

    name: str
    module_name: str
    module: nn.Module
    attr: str
    kind: str
    role: str = "in"
    transposed: bool = False
    fused_group: str | None = None

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def weight(self) -> torch.Tensor:
        """The weight as the search sees it: [cout, cin] or [E, cout, cin] (a view, no copy)."""
        w = self.param.detach()
        return w.transpose(-1, -2) if self.transposed else w

    @property
    def cin(self) -> int:
        return int(self.weight().shape[-1])


def is_expert_stack(module: nn.Module) -> bool:
    """True for a module holding stacked expert weights: a 3-D ``down_proj`` parameter."""
    p = getattr(module, "down_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def expert_stack_supported(module: nn.Module) -> bool:
    """Whether capture can follow this module's routing: transformers' ``use_experts_implementation`` classes
    declare their computation through the has_gate / is_transposed / has_bias flags, which the capture wrapper
    reproduces; other classes route in their own code, which a wrapper cannot see into."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias")):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    p = getattr(module, first, None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def _compile(patterns: Sequence[str] | str | None, arg: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{arg} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def _cin_reason(shape: tuple[int, ...], cin: int) -> str | None:
    if cin % BLOCK:
        return (
            f"cin = {cin} (shape {shape}) is not divisible by the NVFP4 block size {BLOCK}; "
            "left in high precision"
        )
    return None


def find_targets(
    model: nn.Module,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
) -> tuple[list[Target], dict[str, str]]:
    """Every quantizable weight of ``model``, and the skipped ones with their reasons.

    exclude: regular expressions (re.search on module names) of modules to leave in high precision.
    include: when given, only modules whose name matches one of these are considered at all (others are
        neither targets nor listed as skipped).
    Returns (targets in module order, {parameter name: reason}).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    excl = _compile(exclude, "exclude")
    incl = _compile(include, "include")
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    seen: dict[int, str] = {}  # id(parameter) -> name, for tied weights

    def add(module_name: str, module: nn.Module, attr: str, kind: str, role: str = "in") -> None:
        pname = f"{module_name}.{attr}" if module_name else attr
        p = getattr(module, attr)
        hit = next((e.pattern for e in excl if e.search(module_name)), None)
        if hit is not None:
            skipped[pname] = f"excluded by pattern {hit!r}"
            return
        if p.dtype not in FLOAT_DTYPES:
            skipped[pname] = f"dtype {p.dtype} is not float32, float16 or bfloat16"
            return
        if id(p) in seen:
            skipped[pname] = f"tied to {seen[id(p)]}, which is quantized once under that name"
            return
        transposed = bool(getattr(module, "is_transposed", False)) if kind == "experts" else False
        t = Target(pname, module_name, module, attr, kind, role, transposed)
        reason = _cin_reason(tuple(t.weight().shape), t.cin)
        if reason:
            skipped[pname] = reason
            return
        seen[id(p)] = pname
        targets.append(t)

    for mname, module in model.named_modules():
        if incl and not any(e.search(mname) for e in incl):
            continue
        if isinstance(module, nn.Linear):
            add(mname, module, "weight", "linear")
        elif is_expert_stack(module):
            if expert_stack_supported(module):
                add(mname, module, "gate_up_proj" if module.has_gate else "up_proj", "experts", "in")
                add(mname, module, "down_proj", "experts", "mid")
            else:
                for attr, p in module.named_parameters(recurse=False):
                    if p.dim() == 3:
                        skipped[f"{mname}.{attr}"] = (
                            f"expert stack in {type(module).__name__}, whose routing fp4cal cannot capture "
                            "(not a transformers use_experts_implementation class); left in high precision"
                        )
    _assign_fused_groups(targets)
    return targets, skipped


def _assign_fused_groups(targets: list[Target]) -> None:
    by_parent: dict[str, dict[str, Target]] = {}
    for t in targets:
        if t.kind != "linear":
            continue
        parent, _, leaf = t.module_name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = t
    for parent, leaves in by_parent.items():
        for label, members in FUSED_SIBLINGS:
            present = [leaves[m] for m in sorted(members) if m in leaves]
            if len(present) >= 2:
                group = f"{parent}.{label}" if parent else label
                for t in present:
                    t.fused_group = group
