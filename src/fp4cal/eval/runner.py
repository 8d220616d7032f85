"""evaluate(): calibrate with several scale-search methods from ONE capture pass, then measure each on held-out
data against the full-precision model.

    capture_statistics(model, calib_batches)     one forward pass: Hessians and amax, shared by every method
    solve(targets, stats, method)                 per method: global amax, block-scale search
    reference pass over eval_batches              full-precision model with hooks: per-layer output errors of
                                                  every method, held-out Hessians, the full-precision metric
    one pass per method over eval_batches         weights fake-quantized in place (restored afterwards):
                                                  perplexity (causal LM) or embedding cosine (encoder)

Why one capture pass serves all methods: the statistics a method needs (H_j = E[x_j x_j^T] for local_hessian;
the full H = E[x x^T] for gptq, whose diagonal blocks are the H_j; nothing but the weights for mse and max;
activation amax for all) come from the unquantized model and do not depend on any method's scales, so one pass
collects them once and each solve() reads them.

Methods: 'max', 'mse', 'local_hessian', and GPTQ rounding as 'gptq' (default block scales) or 'gptq:SCALES'
with SCALES one of fp4cal.gptq.SCALES (e.g. 'gptq:local_hessian_dynamic').
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from fp4cal.calib.calibrate import (
    DEFAULT_MIN_EXPERT_TOKENS,
    calibration_forward_kwargs,
    fake_quantize_model,
    quantized_weight,
    solve,
)
from fp4cal.calib.capture import (
    ActivationCapture,
    CaptureStats,
    capture_statistics,
    first_input,
    model_device,
    run_batch,
    sync_device,
)
from fp4cal.calib.result import CalibrationResult
from fp4cal.calib.targets import DEFAULT_EXCLUDE, Target, find_targets
from fp4cal.eval.metrics import OutputError, Perplexity, cosine, hessian_weighted_error, mean_pool
from fp4cal.eval.result import CAUSAL_LM, FULL_PRECISION, EvalResult, LayerEval, model_kind
from fp4cal.gptq import DEFAULT_SCALES, SCALES, GPTQConfig
from fp4cal.search import METHODS

EVAL_METHODS = METHODS + ("gptq",) + tuple(f"gptq:{s}" for s in SCALES)


def gptq_options(label: str) -> GPTQConfig | None:
    """GPTQConfig of an evaluation label 'gptq' / 'gptq:SCALES'; None for the plain scale searches."""
    if label == "gptq":
        return GPTQConfig(DEFAULT_SCALES)
    if label.startswith("gptq:"):
        return GPTQConfig(label.split(":", 1)[1])
    return None


def check_methods(methods: Sequence[str] | str) -> list[str]:
    """Validated, de-duplicated method list (order kept)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    out: list[str] = []
    for m in methods:
        if m not in EVAL_METHODS:
            raise ValueError(f"methods must be taken from {EVAL_METHODS}, got {m!r}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"methods must name at least one of {EVAL_METHODS}, got none")
    return out


def _ids_and_mask(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], None


def _hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


class _MetricPass:
    """The model-level metric of one pass over the eval batches."""

    def __init__(self, kind: str, reference: list[torch.Tensor] | None = None) -> None:
        self.kind = kind
        self.ppl = Perplexity()
        self.reference = reference  # full-precision embeddings per batch (encoders; None on the reference pass)
        self.embeddings: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []

    def add(self, i: int, batch, out) -> None:
        ids, mask = _ids_and_mask(batch)
        if self.kind == CAUSAL_LM:
            self.ppl.add(out.logits, ids, mask)
            return
        emb = mean_pool(_hidden(out), mask).cpu()
        if self.reference is None:
            self.embeddings.append(emb)
        else:
            self.cos.append(cosine(self.reference[i], emb))

    def value(self) -> dict[str, float]:
        if self.kind == CAUSAL_LM:
            return {"perplexity": self.ppl.value(), "tokens": float(self.ppl.tokens)}
        if self.reference is None:
            # For scale: the mean cosine between full-precision embeddings of two different held-out sequences.
            e = torch.nn.functional.normalize(torch.cat(self.embeddings).double(), dim=-1)
            n = e.shape[0]
            pair = float(((e @ e.t()).sum() - n) / (n * (n - 1))) if n > 1 else float("nan")
            return {"pairwise_cosine": pair, "sentences": float(n)}
        c = torch.cat(self.cos)
        return {"mean_cosine": float(c.mean()), "min_cosine": float(c.min()), "sentences": float(c.numel())}


def _quantized(t: Target, wr, w: torch.Tensor) -> torch.Tensor:
    return quantized_weight(w, wr)  # GPTQ codes when set, else round-to-nearest with the chosen scales


def _delta_bytes(targets: list[Target], n_methods: int) -> int:
    return sum(t.weight().numel() * 4 * n_methods for t in targets if t.kind == "linear")


def _should_cache(targets: list[Target], n_methods: int, device: torch.device, cache: bool | None) -> bool:
    """Cache W - What (float32) per linear and method unless that would take more than a third of the free GPU
    memory; on the CPU always (recomputing per batch would cost more than the memory)."""
    if cache is not None:
        return cache
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return _delta_bytes(targets, n_methods) < free / 3


def _reference_pass(
    model: nn.Module,
    targets: list[Target],
    results: dict[str, CalibrationResult],
    eval_batches: list,
    kind: str,
    cache: bool,
) -> tuple[dict[str, OutputError], CaptureStats, _MetricPass]:
    """One pass of the full-precision model over the eval batches: per-layer output errors of every method
    (hooks), held-out Hessians (ActivationCapture, the same one calibration uses), the full-precision metric."""
    device = model_device(model)
    linear = [t for t in targets if t.kind == "linear"]
    errors = {t.name: OutputError() for t in linear}
    cached: dict[str, dict[str, torch.Tensor]] = {}
    if cache:
        for t in linear:
            w = t.weight()
            cached[t.name] = {m: w.float() - _quantized(t, r.weights[t.name], w).float() for m, r in results.items()}

    def deltas(t: Target) -> dict[str, torch.Tensor]:
        if cache:
            return cached[t.name]
        w = t.weight()
        return {m: w.float() - _quantized(t, r.weights[t.name], w).float() for m, r in results.items()}

    def make_hook(t: Target):
        def hook(module, args, kwargs):
            errors[t.name].add(first_input(args, kwargs), t.weight(), deltas(t))

        return hook

    metric = _MetricPass(kind)
    handles = []
    try:
        with torch.no_grad(), ActivationCapture(model, targets, hessians=True) as cap:
            for t in linear:
                handles.append(t.module.register_forward_pre_hook(make_hook(t), with_kwargs=True))
            for i, batch in enumerate(eval_batches):
                metric.add(i, batch, run_batch(model, batch, device))
            cap.check()
    finally:
        for h in handles:
            h.remove()
    return errors, cap.stats, metric


def _heldout_hessian(t: Target, stats: CaptureStats) -> tuple[torch.Tensor | None, int]:
    """(summed held-out block Hessian [cin/16,16,16] or [E, cin/16,16,16], tokens) of a target."""
    if t.kind == "linear":
        slot = stats.inputs.get(t.module_name)
        if slot is None or slot.tokens == 0 or slot.hessian is None:
            return None, 0
        return slot.hessian.sum, int(slot.tokens)
    st = stats.experts.get(t.module_name)
    accs = None if st is None else (st.in_hessians if t.role == "in" else st.mid_hessians)
    if accs is None or int(st.counts.sum()) == 0:
        return None, 0
    return torch.stack([a.sum for a in accs]), int(st.counts.sum())


def _quantized_pass(
    model: nn.Module,
    targets: list[Target],
    result: CalibrationResult,
    eval_batches: list,
    kind: str,
    reference: list[torch.Tensor] | None,
) -> dict[str, float]:
    """The metric with this result's weights fake-quantized in place; the original weights are restored."""
    device = model_device(model)
    saved = {t.name: t.param.detach().to("cpu", copy=True) for t in targets}
    metric = _MetricPass(kind, reference)
    try:
        fake_quantize_model(model, result)
        with torch.no_grad():
            for i, batch in enumerate(eval_batches):
                metric.add(i, batch, run_batch(model, batch, device))
    finally:
        with torch.no_grad():
            for t in targets:
                t.param.copy_(saved[t.name].to(t.param.device))
    return metric.value()


def evaluate(
    model: nn.Module,
    calib_batches: Iterable,
    eval_batches: Iterable,
    methods: Sequence[str] | str = METHODS,
    *,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    model_name: str | None = None,
    progress: bool = False,
    backend: str | None = None,
    cache_deltas: bool | None = None,
    modelopt_check: bool = True,
) -> EvalResult:
    """Calibrate ``model`` with each method and measure the quantized weights on held-out data.

    model: a Hugging Face causal LM (metric: perplexity of eval_batches) or encoder (metric: cosine similarity
        of mean-pooled sentence embeddings, quantized vs full precision), or any nn.Module returning logits /
        hidden states. Its weights are left as they were (fake-quantized only during each method's pass).
    calib_batches: iterated once (one capture pass for all methods). eval_batches: held-out batches, iterated
        1 + len(methods) times; dicts {input_ids [B, T], attention_mask [B, T]} or input_ids tensors.
    methods: subset of EVAL_METHODS ('max', 'mse', 'local_hessian', 'gptq', 'gptq:SCALES'), or a comma-separated
        string.
    exclude / include / min_expert_tokens / backend: as for fp4cal.calibrate.
    cache_deltas: keep W - What (float32) per linear and method during the reference pass (default: on CPU, or
        on CUDA when it takes under a third of the free memory) instead of recomputing it per batch.
    modelopt_check: compare the local_hessian picks with ModelOpt's sweep when it is importable and the model is
        on CUDA (see fp4cal.eval.modelopt_check).
    """
    methods = check_methods(methods)
    eval_batches = list(eval_batches)
    if not eval_batches:
        raise ValueError("eval_batches is empty: evaluation needs at least one held-out batch")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = model_device(model)
    kind = model_kind(model)
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        targets, skipped = find_targets(model, exclude, include)
        if not targets:
            raise ValueError(f"model has no quantizable weight (skipped: {skipped or 'none found'})")
        stats = capture_statistics(
            model,
            calib_batches,
            targets,
            hessians="local_hessian" in methods,
            extra_kwargs=calibration_forward_kwargs(model, targets),
            progress=progress,
            full_hessians=any(gptq_options(m) is not None for m in methods),
        )
        if stats.forward_calls == 0:
            raise ValueError("calib_batches was empty: calibration needs at least one batch")
        sync_device(device)
        t_capture = time.perf_counter() - t0
        timings["calibration forward (one pass, all methods)"] = t_capture
        results: dict[str, CalibrationResult] = {}
        for m in methods:
            t1 = time.perf_counter()
            cfg = gptq_options(m)
            r = solve(targets, stats, "gptq" if cfg else m, min_expert_tokens, progress, backend, gptq=cfg)
            sync_device(device)
            r.skipped = dict(skipped)
            r.timings = {"capture (shared)": t_capture, "search": time.perf_counter() - t1}
            results[m] = r
            timings[f"scale search: {m}"] = r.timings["search"]
        modelopt = None
        if modelopt_check and "local_hessian" in results:
            from fp4cal.eval.modelopt_check import modelopt_cross_check

            t1 = time.perf_counter()
            modelopt = modelopt_cross_check(targets, stats, results["local_hessian"])
            if modelopt.get("status") == "ran":
                timings["ModelOpt cross-check"] = time.perf_counter() - t1
        calib_forwards = stats.forward_calls
        del stats

        t1 = time.perf_counter()
        cache = _should_cache(targets, len(methods), device, cache_deltas)
        errors, held, ref_metric = _reference_pass(model, targets, results, eval_batches, kind, cache)
        sync_device(device)
        timings["held-out forward (full precision: layer errors, Hessians)"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        layers = []
        for t in targets:
            h, tokens = _heldout_hessian(t, held)
            le = LayerEval(t.name, t.module_name, t.kind, tuple(t.weight().shape), tokens)
            w = t.weight()
            for m, r in results.items():
                wr = r.weights[t.name]
                base = "gptq" if gptq_options(m) is not None else m
                le.method_used[m] = m if wr.method == base else wr.method
                le.output_error[m] = errors[t.name].relative()[m] if t.name in errors else float("nan")
                le.hessian_error[m] = hessian_weighted_error(w, _quantized(t, wr, w), h) if h is not None else math.nan
            layers.append(le)
        sync_device(device)
        timings["Hessian-weighted errors"] = time.perf_counter() - t1
        del held, errors

        metric: dict[str, dict[str, float]] = {}
        reference = None
        metric[FULL_PRECISION] = ref_metric.value()
        if kind != CAUSAL_LM:
            reference = ref_metric.embeddings
        for m, r in results.items():
            t1 = time.perf_counter()
            metric[m] = _quantized_pass(model, targets, r, eval_batches, kind, reference)
            sync_device(device)
            timings[f"held-out forward: {m}"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    eval_tokens = sum(int(_ids_and_mask(b)[0].numel()) for b in eval_batches)
    p = next(model.parameters())
    setup = {
        "device": str(device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "calibration batches": calib_forwards,
        "evaluation batches": len(eval_batches),
        "evaluation tokens": eval_tokens,
        "weights quantized": len(targets),
        "reference pass cached W - What": cache,
    }
    return EvalResult(
        model_name=model_name or type(model).__name__,
        model_kind=kind,
        methods=methods,
        layers=layers,
        model_metric=metric,
        calibration=results,
        skipped=dict(skipped),
        timings=timings,
        setup=setup,
        calibration_forwards=calib_forwards,
        eval_forwards=len(eval_batches) * (1 + len(methods)),
        modelopt=modelopt,
    )
