"""calibrate(): find the weights, capture their inputs in one forward pass, search their block scales.

    targets = find_targets(model)                       which weights, which are skipped and why
    stats   = capture_statistics(model, batches, ...)   ONE pass: Hessians, input amax, routed tokens
    result  = solve(targets, stats, method)             global amax per fused group, search, losses

Each step is public so that a caller (or a test) can inspect or replace what flows between them.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fp4cal.calib.capture import CaptureStats, capture_statistics, model_device, sync_device
from fp4cal.calib.gptq_target import solve_gptq_target
from fp4cal.calib.objective import block_scales
from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.calib.targets import DEFAULT_EXCLUDE, Target, find_targets
from fp4cal.gptq import GPTQConfig
from fp4cal.numerics import NVFP4Tensor, dequantize, fake_quantize, global_scale
from fp4cal.search import METHODS, search_scales_and_losses
from fp4cal.search.hessian_blocks import fallback_mask
from fp4cal.validation import BLOCK, abs_max

CALIB_METHODS = METHODS + ("gptq",)  # the scale searches, and GPTQ rounding on top of one (fp4cal.gptq)
DEFAULT_MIN_EXPERT_TOKENS = 16  # below 16 rows a 16x16 block Hessian is singular: its argmin is not trustworthy


class CalibrationWarning(UserWarning):
    """A weight did not get what was asked for (fallback, skipped); the message names it."""


def calibration_forward_kwargs(model: nn.Module, targets: list[Target]) -> dict[str, object]:
    """use_cache=False where the forward takes it, and logits_to_keep=1 for a Hugging Face causal LM whose output
    head is not quantized: calibration needs no logits, and the full [batch, seq, vocab] logits are often the
    largest tensor of the forward."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    # no key/value cache: nothing generates after the forward, and the cache of every layer would be written
    kw: dict[str, object] = {"use_cache": False} if "use_cache" in params else {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "logits_to_keep" not in params or head is None:
        return kw
    if any(t.module is head for t in targets):
        return kw
    return {**kw, "logits_to_keep": 1}


def group_global_amax(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Global amax per target name: its own max |w| ([] or [E]), or the max over its fused group."""
    own = {t.name: abs_max(t.weight()) for t in targets}
    groups: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.fused_group is not None:
            g = own[t.name]
            groups[t.fused_group] = g if t.fused_group not in groups else torch.maximum(groups[t.fused_group], g)
    return {t.name: groups[t.fused_group] if t.fused_group else own[t.name] for t in targets}


def _identity_hessian(cin: int, device: torch.device) -> torch.Tensor:
    """[cin/16, 16, 16] identity blocks: local_hessian with it is exactly the MSE objective."""
    return torch.eye(BLOCK, device=device).expand(cin // BLOCK, BLOCK, BLOCK).contiguous()


def _linear_plan(t: Target, stats: CaptureStats, method: str) -> dict:
    slot = stats.inputs.get(t.module_name)
    tokens = slot.tokens if slot is not None else 0
    plan = {"method": method, "hessian": None, "fallback": None, "tokens": tokens, "expert_fallback": {}}
    plan["input_amax"] = slot.amax.float().clone() if slot is not None and tokens > 0 else None
    if method == "local_hessian":
        if tokens == 0 or slot.hessian is None or slot.hessian.n == 0:
            plan["method"] = "mse"
            plan["fallback"] = "no calibration tokens reached this layer; used mse"
        else:
            plan["hessian"] = slot.hessian.normalized()
    return plan


def _experts_plan(t: Target, stats: CaptureStats, method: str, min_tokens: int) -> dict:
    st = stats.experts.get(t.module_name)
    E = int(t.weight().shape[0])
    counts = st.counts.clone() if st is not None else torch.zeros(E, dtype=torch.int64)
    plan = {"method": method, "hessian": None, "fallback": None, "tokens": counts, "expert_fallback": {}}
    amax = None if st is None else (st.in_amax if t.role == "in" else st.mid_amax)
    if amax is not None and bool((counts > 0).any()):
        # An expert that saw no token gets the stack's max, so per-expert input scales never divide by zero.
        seen_max = amax[counts.to(amax.device) > 0].max()
        plan["input_amax"] = torch.where(counts.to(amax.device) > 0, amax, seen_max).float()
    else:
        plan["input_amax"] = None
    if method != "local_hessian":
        return plan
    accs = None if st is None else (st.in_hessians if t.role == "in" else st.mid_hessians)
    device = t.param.device
    hs = []
    for e in range(E):
        n = int(counts[e])
        if accs is None or n == 0:
            plan["expert_fallback"][e] = "no routed tokens; used mse"
        elif n < min_tokens:
            plan["expert_fallback"][e] = f"{n} routed tokens < min_expert_tokens = {min_tokens}; used mse"
        else:
            hs.append(accs[e].normalized().to(device))
            continue
        hs.append(_identity_hessian(t.cin, device))
    if len(plan["expert_fallback"]) == E:
        plan["method"] = "mse"
        plan["fallback"] = f"no expert had >= min_expert_tokens = {min_tokens} routed tokens; used mse"
        plan["expert_fallback"] = {}
    else:
        plan["hessian"] = torch.stack(hs)
    return plan


def solve_target(
    t: Target,
    stats: CaptureStats,
    method: str,
    global_amax: torch.Tensor,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    backend: str | None = None,
    stacklevel: int = 1,
    gptq: GPTQConfig | None = None,
) -> WeightResult:
    """Search one target's block scales (the body of solve's loop; fp4cal.calib.distributed calls it for the
    targets one rank owns). global_amax: this target's fp32 [] or [E] (its fused group's, see
    group_global_amax); it is cloned, so fused members never alias one tensor. Fallback warnings take
    ``stacklevel`` as warnings.warn would in the caller (1: the caller's line). method 'gptq': GPTQ rounding
    with the options ``gptq`` (default GPTQConfig()), see fp4cal.calib.gptq_target."""
    if method == "gptq":
        wr, messages = solve_gptq_target(t, stats, global_amax.clone(), gptq or GPTQConfig(), min_expert_tokens,
                                         backend)
        for msg in messages:
            warnings.warn(msg, CalibrationWarning, stacklevel=stacklevel + 1)
        return wr
    wr, pending = _solve_target(t, stats, method, global_amax, min_expert_tokens, backend, stacklevel + 1)
    _finish_targets([(wr, pending)], stacklevel + 1)
    return wr


def _solve_target(t, stats, method, global_amax, min_expert_tokens, backend, stacklevel):
    """solve_target without reading anything back: (WeightResult whose losses and hessian_fallback_blocks are
    still to be filled, float64 [3] device tensor (loss at max scales, loss chosen, zero-trace blocks))."""
    w = t.weight()
    if t.transposed:
        w = w.contiguous()  # searched as [E, cout, cin]; kernels expect rows contiguous along cin
    g = global_amax.clone()  # members of a fused group get equal values, not one aliased tensor
    if t.kind == "linear":
        plan = _linear_plan(t, stats, method)
    else:
        plan = _experts_plan(t, stats, method, min_expert_tokens)
    if plan["fallback"]:
        warnings.warn(f"{t.name}: {plan['fallback']}", CalibrationWarning, stacklevel=stacklevel + 1)
    if plan["expert_fallback"]:
        listed = ", ".join(f"{e} ({int(plan['tokens'][e])} tokens)" for e in sorted(plan["expert_fallback"]))
        warnings.warn(
            f"{t.name}: experts {listed} had fewer than min_expert_tokens = {min_expert_tokens} routed "
            "tokens and fall back to mse",
            CalibrationWarning,
            stacklevel=stacklevel + 1,
        )
    h = plan["hessian"]
    n_fallback = torch.zeros((), dtype=torch.float64, device=w.device)
    if h is not None:
        h = h.to(w.device)
        # blocks whose Hessian carries no information (zero trace) are searched with mse (issue 16); counted on
        # the device, read with the losses
        n_fallback = fallback_mask(h).sum().double() * w.shape[-2]
    # the losses (objective at max scales and at the chosen ones, with the objective each block was searched
    # with) come from the search itself: on the kernel path its epilogue, no second pass and no host sync here
    block_amax, losses = search_scales_and_losses(w, plan["method"], hessian=h, global_amax=g, backend=backend)
    scale, _ = block_scales(block_amax, g)
    wr = WeightResult(
        name=t.name,
        module_name=t.module_name,
        kind=t.kind,
        shape=tuple(w.shape),
        method=plan["method"],
        global_amax=g,
        block_amax=block_amax,
        block_scale=scale,
        input_amax=plan["input_amax"],
        tokens=plan["tokens"],
        fused_group=t.fused_group,
        fallback=plan["fallback"],
        expert_fallback=plan["expert_fallback"],
        transposed=t.transposed,
    )
    return wr, torch.cat((losses, n_fallback.reshape(1)))


def _finish_targets(done: list, stacklevel: int) -> None:
    """Fill the losses and fallback counts of (WeightResult, pending) pairs with one host read for all."""
    if not done:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, p) in enumerate(done):
        by_device.setdefault(p.device, []).append(i)
    values: list = [None] * len(done)
    for idx in by_device.values():
        for i, row in zip(idx, torch.stack([done[i][1] for i in idx]).tolist(), strict=True):
            values[i] = row
    for (wr, _), (loss_max, loss_chosen, n_fb) in zip(done, values, strict=True):
        wr.loss_max, wr.loss_chosen, wr.hessian_fallback_blocks = loss_max, loss_chosen, int(n_fb)
        if wr.hessian_fallback_blocks:
            warnings.warn(f"{wr.name}: {wr.hessian_fallback_blocks} blocks had zero-trace Hessian blocks (inputs "
                          "never active in calibration); they used mse", CalibrationWarning, stacklevel=stacklevel + 1)


def solve(
    targets: list[Target],
    stats: CaptureStats,
    method: str = "local_hessian",
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    progress: bool = False,
    backend: str | None = None,
    gptq: GPTQConfig | None = None,
) -> CalibrationResult:
    """Search the block scales of every target from captured statistics (method 'gptq': GPTQ rounding with the
    options ``gptq``; needs statistics captured with full_hessians).

    Fused groups share one global amax (max over members). Expert stacks search as [E, cout, cin] with
    [E, cin/16, 16, 16] Hessians; an expert with fewer than ``min_expert_tokens`` routed tokens gets identity
    Hessian blocks, i.e. the MSE objective. loss_max / loss_chosen use the objective that was searched
    (Hessian-weighted for local_hessian, squared error for mse and max; a stack's sum mixes both when some
    experts fell back).
    """
    if method not in CALIB_METHODS:
        raise ValueError(f"method must be one of {CALIB_METHODS}, got {method!r}")
    result = CalibrationResult(method=method, forward_calls=stats.forward_calls)
    amax = group_global_amax(targets)
    it: Iterable[Target] = targets
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(targets, desc=f"{method} scale search", unit="weight")
    done = []
    for t in it:
        # stacklevel 3 from solve (as before solve_target was split out): the caller of solve's caller
        if method == "gptq":  # GPTQ reads its own results back per weight (its losses need the moved codes)
            result.weights[t.name] = solve_target(t, stats, method, amax[t.name], min_expert_tokens, backend, 3, gptq)
            continue
        wr, pending = _solve_target(t, stats, method, amax[t.name], min_expert_tokens, backend, 3)
        result.weights[t.name] = wr
        done.append((wr, pending))
    _finish_targets(done, 3)  # one host read for every weight's losses (the searches ran back to back)
    return result


def fake_quantize_model(model: nn.Module, result: CalibrationResult) -> None:
    """Replace every calibrated weight of ``model`` in place by dequantize(quantize(w)) with the chosen scales
    (in the weight's own dtype); a weight whose result carries codes (GPTQ) gets exactly those codes decoded.
    Weights listed in result.skipped are left untouched."""
    with torch.no_grad():
        for name, wr in result.weights.items():
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise ValueError(f"result weight {name!r} is not a parameter of the model") from None
            w = p.transpose(-1, -2) if wr.transposed else p
            if tuple(w.shape) != tuple(wr.shape):
                raise ValueError(f"{name} has shape {tuple(w.shape)} but was calibrated as {wr.shape}")
            w.copy_(quantized_weight(w.detach(), wr))


def quantized_weight(w: torch.Tensor, wr: WeightResult) -> torch.Tensor:
    """The dequantized weight of ``wr`` in w's dtype and device: its codes decoded when set (GPTQ), else
    w [.., cout, cin] rounded to nearest with wr's block and global amax."""
    if wr.codes is None:
        return fake_quantize(w, wr.block_amax.to(w.device), wr.global_amax.to(w.device), dtype=w.dtype)
    t = NVFP4Tensor(wr.codes.to(w.device), wr.block_scale.to(w.device), global_scale(wr.global_amax.to(w.device)))
    return dequantize(t, w.dtype)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    method: str = "local_hessian",
    *,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    fake_quantize: bool = False,
    progress: bool = False,
    backend: str | None = None,
    gptq_scales: str = "local_hessian",
    gptq_damp: float = 0.01,
) -> CalibrationResult:
    """Calibrate NVFP4 block scales of every nn.Linear and HF expert stack of ``model``.

    model: any nn.Module (kept on its device; put in eval mode during the pass, then restored).
    batches: iterable of model inputs: tensors (e.g. input_ids [B, T]), tuples, or dicts of keyword arguments;
        iterated exactly once (result.forward_calls counts the model forwards).
    method: 'local_hessian' | 'mse' | 'max' | 'gptq'. Activation amax (for W4A4 export) is collected in the same
        pass whatever the method; block Hessians for local_hessian, full [cin, cin] ones for gptq.
    gptq_scales / gptq_damp (method 'gptq'): block scales 'local_hessian' | 'local_hessian_dynamic' | 'mse' |
        'max', and the relative damping lambda > 0 (see fp4cal.gptq and docs/gptq.md).
    exclude / include: module-name regular expressions (see find_targets); lm_head and routers are excluded
        by default. min_expert_tokens: experts with fewer routed tokens fall back to mse.
    fake_quantize: also replace the weights in place by their quantized values (fake_quantize_model).
    progress: tqdm bars over batches and weights. backend: passed to search_scales.
    Returns a CalibrationResult; weights left in high precision are in result.skipped with the reason.
    """
    t0 = time.perf_counter()
    check_calibration_inputs(model, batches)
    cfg = GPTQConfig(gptq_scales, gptq_damp) if method == "gptq" else None  # bad options fail before any work
    targets, skipped = prepare_targets(model, method, min_expert_tokens, exclude, include, stacklevel=2)
    device = model_device(model)
    stats = capture_pass(model, batches, targets, method, progress)
    if stats.forward_calls == 0:
        raise ValueError("batches was empty: calibration needs at least one batch")
    check_hessians(stats)
    sync_device(device)
    t1 = time.perf_counter()
    result = solve(targets, stats, method, min_expert_tokens, progress, backend, gptq=cfg)
    sync_device(device)
    return finish(result, model, skipped, {"capture": t1 - t0, "search": time.perf_counter() - t1},
                  fake_quantize, device, t0)


def check_calibration_inputs(model: nn.Module, batches: Iterable) -> None:
    """calibrate()'s argument checks, before any forward: TypeError / ValueError naming the argument for a model
    that is not an nn.Module or has weights on the meta device (no data), and for batches that are not an
    iterable of batches (None, a number, a str, a bare tensor) or that hold meta tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"model tensor {name!r} is on the meta device (shape {tuple(t.shape)}, no data): load the weights "
                "(e.g. from_pretrained without a meta device_map) before calibrating"
            )
    if isinstance(batches, (str, bytes, torch.Tensor)) or not isinstance(batches, Iterable):
        hint = "; wrap a single batch in a list: [batch]" if isinstance(batches, torch.Tensor) else ""
        raise TypeError(
            "batches must be an iterable of model inputs (e.g. a list of input_ids tensors or of dicts), "
            f"got {type(batches).__name__}{hint}"
        )
    if isinstance(batches, Sequence):  # a generator is checked as it runs (capture)
        for i, batch in enumerate(batches):
            values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) \
                else [batch]
            for v in values:
                if isinstance(v, torch.Tensor) and v.is_meta:
                    raise ValueError(f"batches[{i}] holds a tensor on the meta device (shape {tuple(v.shape)}, "
                                     "no data); calibration needs real inputs")


def check_hessians(stats: CaptureStats) -> None:
    """Raise ValueError naming the layer when an input Hessian is not finite in float32 (activations so large
    that x^T x overflows: e.g. an fp16 model whose activations are near the fp16 limit), before any search."""
    for name, slot in stats.inputs.items():
        acc = getattr(slot, "hessian", None)
        if slot.name != name or acc is None or acc.n == 0:
            continue
        if not bool(torch.isfinite(acc.normalized()).all()):
            raise ValueError(
                f"the input Hessian of layer {name} (shared by {list(slot.members)}) is not finite in float32: its "
                f"activations reach max |x| = {float(slot.amax.max()):.3e}, whose squares overflow; calibrate "
                "with smaller activations (check the data, the model dtype, or exclude this layer)"
            )
    for name, st in stats.experts.items():
        for label, accs in (("routed input", st.in_hessians), ("intermediate activations", st.mid_hessians)):
            bad = [e for e, a in enumerate(accs or []) if a.n and not bool(torch.isfinite(a.normalized()).all())]
            if bad:
                raise ValueError(f"the {label} Hessians of experts {bad} of layer {name} are not finite in float32 "
                                 "(activations too large); check the data or exclude this layer")


def finish(
    result: CalibrationResult,
    model: nn.Module,
    skipped: dict[str, str],
    timings: dict[str, float],
    fake_quantize: bool,
    device: torch.device,
    t0: float,
) -> CalibrationResult:
    """Last steps shared by calibrate() and calibrate_distributed(): record the skipped weights and phase
    times, fake-quantize the model if asked (timed), and the total since t0."""
    result.skipped = skipped
    result.timings = timings
    if fake_quantize:
        t = time.perf_counter()
        fake_quantize_model(model, result)
        sync_device(device)
        result.timings["fake_quantize"] = time.perf_counter() - t
    result.timings["total"] = time.perf_counter() - t0
    return result


def prepare_targets(
    model: nn.Module,
    method: str,
    min_expert_tokens: int,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
    stacklevel: int = 1,
) -> tuple[list[Target], dict[str, str]]:
    """calibrate()'s first step: check the arguments, find the targets, warn about weights skipped for a
    reason other than an exclude pattern (``stacklevel`` as warnings.warn would take it in the caller).
    Raises when the model has nothing to quantize. Shared with fp4cal.calib.distributed."""
    if method not in CALIB_METHODS:
        raise ValueError(f"method must be one of {CALIB_METHODS}, got {method!r}")
    if not isinstance(min_expert_tokens, int) or min_expert_tokens < 1:
        raise ValueError(f"min_expert_tokens must be a positive int, got {min_expert_tokens!r}")
    targets, skipped = find_targets(model, exclude, include)
    for name, reason in skipped.items():
        if not reason.startswith("excluded by pattern"):
            warnings.warn(f"{name}: {reason}", CalibrationWarning, stacklevel=stacklevel + 1)
    if not targets:
        raise ValueError(f"model has no quantizable weight (skipped: {skipped or 'none found'})")
    return targets, skipped


def capture_pass(
    model: nn.Module, batches: Iterable, targets: list[Target], method: str, progress: bool = False
) -> CaptureStats:
    """calibrate()'s capture step: the model in eval mode (restored after), Hessians only for local_hessian,
    logits_to_keep=1 where it applies. Shared with fp4cal.calib.distributed (which passes one rank's shard)."""
    was_training = model.training
    model.eval()
    try:
        return capture_statistics(
            model,
            batches,
            targets,
            hessians=method == "local_hessian",
            extra_kwargs=calibration_forward_kwargs(model, targets),
            progress=progress,
            full_hessians=method == "gptq",
        )
    finally:
        model.train(was_training)
