"""What evaluate() returns: per-layer held-out errors (LayerEval) and the whole run (EvalResult), and the model kind
that decides the model-level metric. Plain data: the report and the plot read it without the evaluation loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fp4cal.calib.result import CalibrationResult

CAUSAL_LM = "causal_lm"
ENCODER = "encoder"
FULL_PRECISION = "full precision"


@dataclass
class LayerEval:
    """Held-out errors of one quantized weight, per method.

    output_error: ||X W^T - X What^T||_F / ||X W^T||_F over the held-out inputs X of the layer (NaN for expert
        stacks, whose per-expert inputs hooks cannot see, and for a layer no held-out token reached).
    hessian_error: sum_blocks dw^T H dw / sum_blocks w^T H w with the held-out block Hessian H (per-expert
        sums for a stack, so experts weigh by their routed tokens).
    method_used: the method each calibration actually used for this weight (differs after a fallback).
    tokens: held-out tokens that reached the layer (routed (token, expert) pairs for a stack).
    """

    name: str
    module_name: str
    kind: str
    shape: tuple[int, ...]
    tokens: int
    output_error: dict[str, float] = field(default_factory=dict)
    hessian_error: dict[str, float] = field(default_factory=dict)
    method_used: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Everything evaluate() measured.

    model_kind: 'causal_lm' (metric: perplexity) or 'encoder' (metric: cosine similarity of mean-pooled
        sentence embeddings, quantized vs full precision).
    model_metric: {'full precision' or method: {metric name: value}}; for encoders, 'full precision' holds
        'pairwise_cosine', the mean cosine between embeddings of two different held-out sequences (for scale).
    calibration: the CalibrationResult of each method. timings: seconds per phase, in order.
    setup: what was run (device, dtype, batches, tokens; callers may add entries).
    modelopt: outcome of the optional ModelOpt cross-check (a dict with 'status'), None when not asked for.
    """

    model_name: str
    model_kind: str
    methods: list[str]
    layers: list[LayerEval]
    model_metric: dict[str, dict[str, float]]
    calibration: dict[str, CalibrationResult]
    skipped: dict[str, str]
    timings: dict[str, float]
    setup: dict[str, object]
    calibration_forwards: int
    eval_forwards: int
    modelopt: dict | None = None

    @property
    def metric_name(self) -> str:
        return "perplexity" if self.model_kind == CAUSAL_LM else "mean_cosine"


def model_kind(model: nn.Module) -> str:
    """'causal_lm' for a Hugging Face *ForCausalLM (or any model that can generate), else 'encoder'."""
    can_generate = getattr(model, "can_generate", None)
    if type(model).__name__.endswith("ForCausalLM"):
        return CAUSAL_LM
    try:
        if callable(can_generate) and can_generate():
            return CAUSAL_LM
    except Exception:  # noqa: BLE001 - a model whose can_generate() fails is simply not treated as an LM
        pass
    return ENCODER
