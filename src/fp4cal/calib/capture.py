"""Activation capture: per-input Hessians, activation amax and routed-token counts, in one forward pass.

nn.Linear targets get a forward pre-hook. Linears fed the *same input tensor object* in the same forward
(q/k/v, gate/up) are bound to one InputStats the first time that happens, so their Hessian is accumulated
once and shared. Binding is by tensor identity (a weak reference, so a recycled id() never matches), then
checked at the end: every member of a shared InputStats must have seen exactly the tokens it holds.

Stacked MoE experts cannot be seen by hooks (the routing happens inside one forward), so during capture
the experts module's forward is replaced by an eager loop that computes exactly what transformers'
``use_experts_implementation`` computes (same flags: has_gate, is_transposed, has_bias,
has_post_expert_norm, _apply_gate), and on the way accumulates, per expert, the Hessian of the routed
hidden states (for gate_up_proj / up_proj) and of the expert's own intermediate activations (for
down_proj). The original forward is restored on exit.

Memory: one fp32 [cin/16, 16, 16] sum (16 * cin floats) per distinct input (per expert for stacks);
activations are reduced as they pass and never stored. With full_hessians (GPTQ) the sum is the full
[cin, cin] one instead (float64, cin^2 doubles per distinct input, per expert for stacks); the block
Hessians are then read from its diagonal blocks at the end of the pass, so one capture serves both.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fp4cal.calib.hessian import FullHessianAccumulator, HessianAccumulator
from fp4cal.calib.targets import Target


@dataclass
class InputStats:
    """What one distinct input stream (shared by the linears in ``members``) looked like.

    hessian: sum x x^T per 16-block, or None when Hessians were not asked for. amax: fp32 [] running
    max |x| (None until the first token). tokens: rows seen. full: the full [cin, cin] sum (full_hessians
    only; hessian is then its diagonal blocks, set at the end of the pass).
    """

    name: str
    cin: int
    hessian: HessianAccumulator | None
    amax: torch.Tensor | None = None
    tokens: int = 0
    members: list[str] = field(default_factory=list)
    full: FullHessianAccumulator | None = None


@dataclass
class ExpertStats:
    """Per-expert statistics of one expert stack with E experts.

    counts: int64 [E] routed (token, expert) pairs. in_* describe the routed hidden states (input of
    gate_up_proj / up_proj); mid_* the intermediate activations (input of down_proj). Hessians are lists of
    E accumulators (None when not asked for); amax fp32 [E], 0 for an expert that saw nothing. in_full /
    mid_full: per-expert full [cin, cin] sums (full_hessians only; the block lists are then their diagonal
    blocks, set at the end of the pass).
    """

    name: str
    num_experts: int
    counts: torch.Tensor
    in_hessians: list[HessianAccumulator] | None = None
    mid_hessians: list[HessianAccumulator] | None = None
    in_amax: torch.Tensor | None = None
    mid_amax: torch.Tensor | None = None
    in_full: list[FullHessianAccumulator] | None = None
    mid_full: list[FullHessianAccumulator] | None = None


@dataclass
class CaptureStats:
    """Everything one calibration pass collected.

    inputs: linear module name -> its InputStats (members of a shared input map to the same object).
    experts: expert-stack module name -> ExpertStats. forward_calls: top-level model forwards run.
    """

    inputs: dict[str, InputStats] = field(default_factory=dict)
    experts: dict[str, ExpertStats] = field(default_factory=dict)
    forward_calls: int = 0


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a forward hook's call: the first positional argument, else the keyword 'input', else
    the first keyword argument."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    return next(iter(kwargs.values()))


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 scalar tensor (0 for an empty x), NaN if x holds one: one read of x (aminmax), not the
    |x| copy that x.abs().amax() writes first."""
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, -lo).float()


def _check_finite_amax(amax: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(
            f"activations at the input of {name} contain non-finite values (NaN or Inf); calibration needs "
            "finite activations: check the model's dtype (fp16 overflow?) and the calibration data"
        )


class ActivationCapture:
    """Context manager: while active, every forward of ``model`` feeds the statistics of ``targets``.

    hessians: accumulate per-block Hessians (needed by local_hessian only); activation amax and token counts
    are always collected. full_hessians: accumulate full [cin, cin] Hessians instead (GPTQ); the block ones
    are read from them by block_views() (capture_statistics calls it).
    """

    def __init__(self, model: nn.Module, targets: list[Target], hessians: bool = True,
                 full_hessians: bool = False) -> None:
        self.model = model
        self.targets = targets
        self.hessians = hessians and not full_hessians
        self.full = full_hessians
        self.stats = CaptureStats()
        self._member_tokens: dict[str, int] = {}
        self._recent: dict[int, tuple[weakref.ref, InputStats]] = {}
        self._handles: list = []
        self._patched: list[tuple[nn.Module, object]] = []

    # -- context -------------------------------------------------------------------------------------
    def __enter__(self) -> ActivationCapture:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
            self._handles.append(self.model.register_forward_hook(self._after_model_forward))
            stacks: dict[str, nn.Module] = {}
            for t in self.targets:
                if t.kind == "linear":
                    hook = self._linear_hook(t)
                    self._handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    stacks[t.module_name] = t.module
            for name, module in stacks.items():
                self._patch_experts(name, module)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore patched forwards (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, saved in self._patched:
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        self._patched.clear()
        self._recent.clear()

    def _on_model_forward(self, module, args) -> None:
        self.stats.forward_calls += 1
        self._recent.clear()

    def _after_model_forward(self, module, args, output) -> None:
        self._recent.clear()

    # -- linear layers -------------------------------------------------------------------------------
    def _linear_hook(self, t: Target):
        name = t.module_name

        def hook(module, args, kwargs):
            # the tensor object itself, not a detach()ed copy: sharing is detected by its identity
            self._observe_linear(name, t.cin, first_input(args, kwargs))

        return hook

    def _observe_linear(self, name: str, cin: int, x: torch.Tensor) -> None:
        inputs = self.stats.inputs
        slot = inputs.get(name)
        hit = self._recent.get(id(x))
        shared = hit[1] if hit is not None and hit[0]() is x else None
        if slot is None:
            if shared is not None and shared.cin == cin:
                slot = shared  # same tensor object as an input already seen: share its statistics
            else:
                acc = HessianAccumulator(cin, x.device, name) if self.hessians else None
                full = FullHessianAccumulator(cin, x.device, name) if self.full else None
                slot = InputStats(name, cin, acc, full=full)
            slot.members.append(name)
            inputs[name] = slot
        n = x.numel() // cin if x.shape[-1] == cin else 0
        self._member_tokens[name] = self._member_tokens.get(name, 0) + n
        if shared is slot:
            return  # already accumulated for another member of this input
        self._recent[id(x)] = (weakref.ref(x), slot)
        x = x.detach()
        # no per-batch finiteness test (a host sync per input and batch): a non-finite activation makes this
        # input's amax non-finite, which check() reports once, naming the layer
        if slot.hessian is not None:
            slot.hessian.add(x, check=False)
        if slot.full is not None:
            slot.full.add(x, check=False)
        a = _abs_max(x)
        slot.amax = a if slot.amax is None else torch.maximum(slot.amax, a)
        slot.tokens += n

    # -- expert stacks -------------------------------------------------------------------------------
    def _patch_experts(self, name: str, module: nn.Module) -> None:
        first = module.gate_up_proj if module.has_gate else module.up_proj
        E = int(first.shape[0])
        st = ExpertStats(name, E, torch.zeros(E, dtype=torch.int64))
        self.stats.experts[name] = st
        sig = inspect.signature(type(module).forward)
        capture = self

        def forward(mod, *args, **kwargs):
            bound = sig.bind(mod, *args, **kwargs)
            bound.apply_defaults()
            hs, idx, wts = list(bound.arguments.values())[1:4]
            return capture._experts_forward(mod, st, hs, idx, wts)

        saved = module.__dict__.get("forward")
        module.forward = types.MethodType(forward, module)
        self._patched.append((module, saved))

    def _experts_forward(
        self, m: nn.Module, st: ExpertStats, hs: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor
    ) -> torch.Tensor:
        """Eager experts forward (hs [T, H], idx [T, K] int, wts [T, K]) with per-expert capture.

        Leading dimensions beyond one token axis are flattened and restored."""
        lead = hs.shape[:-1]
        if hs.dim() != 2:
            hs, idx, wts = hs.reshape(-1, hs.shape[-1]), idx.reshape(-1, idx.shape[-1]), wts.reshape(-1, wts.shape[-1])
        E = st.num_experts
        K = idx.shape[-1]
        first = m.gate_up_proj if m.has_gate else m.up_proj
        first_bias = getattr(m, ("gate_up_proj" if m.has_gate else "up_proj") + "_bias", None) if m.has_bias else None
        down_bias = m.down_proj_bias if m.has_bias else None
        out = torch.zeros_like(hs)
        flat = idx.reshape(-1)
        # Sort (token, slot) pairs by expert once; ids >= E are expert-parallel sentinels and are dropped.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp(max=E), minlength=E + 1)[:E].cpu()
        st.counts += counts
        starts = torch.cumsum(counts, 0) - counts
        x_dev = hs.device
        if self.hessians and st.in_hessians is None:
            cin_in, cin_mid = hs.shape[-1], m.down_proj.shape[1 if m.is_transposed else 2]
            st.in_hessians = [HessianAccumulator(cin_in, x_dev, f"{st.name}[{e}] input") for e in range(E)]
            st.mid_hessians = [HessianAccumulator(cin_mid, x_dev, f"{st.name}[{e}] intermediate") for e in range(E)]
        if self.full and st.in_full is None:
            cin_in, cin_mid = hs.shape[-1], m.down_proj.shape[1 if m.is_transposed else 2]
            st.in_full = [FullHessianAccumulator(cin_in, x_dev, f"{st.name}[{e}] input") for e in range(E)]
            st.mid_full = [FullHessianAccumulator(cin_mid, x_dev, f"{st.name}[{e}] intermediate") for e in range(E)]
        if st.in_amax is None:
            st.in_amax = torch.zeros(E, dtype=torch.float32, device=x_dev)
            st.mid_amax = torch.zeros(E, dtype=torch.float32, device=x_dev)
        for e in counts.nonzero().flatten().tolist():
            sel = order[int(starts[e]) : int(starts[e]) + int(counts[e])]
            tok, pos = sel // K, sel % K
            x = hs[tok]
            y = self._expert_linear(x, first[e], None if first_bias is None else first_bias[e], m.is_transposed)
            h = m._apply_gate(y) if m.has_gate else m.act_fn(y)
            if st.in_hessians is not None:  # finiteness: checked once at the end through the amax (as above)
                st.in_hessians[e].add(x, check=False)
                st.mid_hessians[e].add(h, check=False)
            if st.in_full is not None:
                st.in_full[e].add(x, check=False)
                st.mid_full[e].add(h, check=False)
            st.in_amax[e] = torch.maximum(st.in_amax[e], _abs_max(x))
            st.mid_amax[e] = torch.maximum(st.mid_amax[e], _abs_max(h))
            y = self._expert_linear(h, m.down_proj[e], None if down_bias is None else down_bias[e], m.is_transposed)
            if getattr(m, "has_post_expert_norm", False):
                y = m.post_expert_norm(y)
            y = y * wts[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.reshape(*lead, out.shape[-1])

    @staticmethod
    def _expert_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        y = x @ w if transposed else nn.functional.linear(x, w)
        return y if b is None else y + b

    # -- results -------------------------------------------------------------------------------------
    def block_views(self) -> None:
        """With full_hessians: set every block Hessian from its full one's diagonal blocks (idempotent)."""
        for slot in self.stats.inputs.values():
            if slot.full is not None:
                slot.hessian = slot.full.blocks()
        for st in self.stats.experts.values():
            if st.in_full is not None:
                st.in_hessians = [a.blocks() for a in st.in_full]
                st.mid_hessians = [a.blocks() for a in st.mid_full]

    def check(self) -> None:
        """Raise on non-finite activations (naming the layer) or an inconsistent shared input."""
        for name, slot in self.stats.inputs.items():
            if slot.name == name and slot.amax is not None:
                _check_finite_amax(slot.amax, name)
            if self._member_tokens.get(name, 0) != slot.tokens:
                raise RuntimeError(
                    f"{name} shares its input statistics with {slot.members}, but saw "
                    f"{self._member_tokens.get(name, 0)} tokens where the shared input holds {slot.tokens}: "
                    "the modules were fed the same tensor in one forward and different tensors in another"
                )
        for name, st in self.stats.experts.items():
            for label, amax in (("routed input", st.in_amax), ("intermediate activations", st.mid_amax)):
                if amax is not None and not bool(torch.isfinite(amax).all()):
                    bad = (~torch.isfinite(amax)).nonzero().flatten().tolist()
                    _check_finite_amax(amax, f"{name} ({label} of experts {bad})")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (cpu for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sync_device(device: torch.device) -> None:
    """Wait for device's queued work (a CUDA device; nothing to wait for on the CPU): phase timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(model: nn.Module, batch, device: torch.device, extra: Mapping[str, object] | None = None):
    """One forward of ``model`` on ``batch``: a tensor (passed positionally), a tuple/list of tensors, or a
    mapping of keyword arguments (e.g. input_ids, attention_mask). Tensors are moved to ``device``."""

    def mv(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(batch, Mapping):
        kwargs = {k: mv(v) for k, v in batch.items()}
        for k, v in (extra or {}).items():
            kwargs.setdefault(k, v)
        return model(**kwargs)
    if isinstance(batch, torch.Tensor):
        return model(mv(batch), **dict(extra or {}))
    if isinstance(batch, (tuple, list)):
        return model(*[mv(v) for v in batch], **dict(extra or {}))
    raise TypeError(
        f"each calibration batch must be a tensor, a tuple of tensors or a dict of model inputs, "
        f"got {type(batch).__name__}"
    )


def capture_statistics(
    model: nn.Module,
    batches: Iterable,
    targets: list[Target],
    hessians: bool = True,
    extra_kwargs: Mapping[str, object] | None = None,
    progress: bool = False,
    full_hessians: bool = False,
) -> CaptureStats:
    """Run every batch through ``model`` once with capture on; return the statistics.

    extra_kwargs: keyword arguments added to every forward (e.g. logits_to_keep=1). progress: tqdm bar.
    full_hessians: full [cin, cin] Hessians (GPTQ), block Hessians read from them.
    """
    device = model_device(model)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        it = tqdm(batches, total=total, desc="calibration forward", unit="batch")
    with torch.no_grad(), ActivationCapture(model, targets, hessians, full_hessians) as cap:
        for batch in it:
            run_batch(model, batch, device, extra_kwargs)
        cap.check()
        cap.block_views()
    return cap.stats
