"""Accuracy metrics of quantized weights: layer output error, Hessian-weighted weight error, perplexity, and
sentence-embedding cosine similarity.

Everything here accumulates over batches: activations are reduced as they pass, never stored.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fp4cal.search.reference import block_loss_cols
from fp4cal.validation import BLOCK

# Rows of a weight per chunk in the block quadratic form: ~4 M float64 temporaries.
_QUAD_CHUNK_ELEMS = 1 << 22


class OutputError:
    """Relative output error ||X W^T - X What^T||_F / ||X W^T||_F of one linear layer, for several What.

    add(x, w, deltas) adds one batch: x [..., cin] (the layer's input), w [cout, cin] (full precision),
    deltas {label: W - What as float32 [cout, cin]}. The products run in float32; the two squared norms are
    summed in float64 on the input's device (no host sync per batch).
    """

    def __init__(self) -> None:
        self.num: dict[str, torch.Tensor] = {}
        self.den: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor, w: torch.Tensor, deltas: dict[str, torch.Tensor]) -> None:
        cin = w.shape[-1]
        x2 = x.detach().reshape(-1, cin).float()
        if x2.shape[0] == 0:
            return
        y = x2 @ w.float().t()
        den = y.square().sum(dtype=torch.float64)
        self.den = den if self.den is None else self.den + den
        for label, d in deltas.items():
            e = (x2 @ d.t()).square().sum(dtype=torch.float64)  # (X W^T - X What^T) = X (W - What)^T
            self.num[label] = e if label not in self.num else self.num[label] + e
        self.tokens += x2.shape[0]

    def relative(self) -> dict[str, float]:
        """{label: relative error}; NaN where the layer saw no token or its output was all zero."""
        den = 0.0 if self.den is None else float(self.den)
        return {k: math.sqrt(float(v) / den) if den > 0 else float("nan") for k, v in self.num.items()}


def block_quadratic(m: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over rows r and 16-blocks j of m[r, j]^T H_j m[r, j], in float64.

    m: [cout, cin] (any float dtype); hessian: [cin/16, 16, 16]. Chunked over rows, so extra memory stays
    O(chunk) whatever the weight's size.
    """
    nb = m.shape[-1] // BLOCK
    h = hessian.to(device=m.device, dtype=torch.float64)
    rows = max(1, _QUAD_CHUNK_ELEMS // m.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=m.device)
    for r0 in range(0, m.shape[0], rows):
        b = m[r0 : r0 + rows].double().reshape(-1, nb, BLOCK).transpose(0, 1)  # [nb, rows, 16]
        total += block_loss_cols(b, h).sum()  # the search's own float64 objective
    return float(total)


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_blocks dw^T H dw / sum_blocks w^T H w, dw = w - w_hat, over a weight or an expert stack.

    w, w_hat: [cout, cin] or [E, cout, cin]; hessian: [cin/16, 16, 16] or [E, cin/16, 16, 16] (per-expert
    sums: experts then weigh by their routed tokens). The scale of H cancels. NaN when the denominator is 0.
    """
    if w.dim() == 3:
        pairs = [(w[e], w_hat[e], hessian[e] if hessian.dim() == 4 else hessian) for e in range(w.shape[0])]
    else:
        pairs = [(w, w_hat, hessian)]
    num = den = 0.0
    for we, qe, he in pairs:
        num += block_quadratic(we.float() - qe.float(), he)
        den += block_quadratic(we, he)
    return num / den if den > 0 else float("nan")


class Perplexity:
    """Token-level perplexity exp(mean NLL) of a causal LM over batches.

    add(logits [B, T, V], input_ids [B, T], attention_mask [B, T] or None): position t predicts token t + 1;
    a pair counts when both positions are attended. Cross-entropy in float32, one sequence at a time (the
    float32 copy of a sequence's logits is the largest temporary); sums in float64.
    """

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        ids = input_ids.to(logits.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        count = 0
        for b in range(logits.shape[0]):
            keep = (mask[b, 1:] * mask[b, :-1]).bool()
            nll = F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
            total += nll[keep].sum(dtype=torch.float64)
            count += int(keep.sum())
        self.nll += float(total)
        self.tokens += count

    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' mean pooling computes them: the mean of the token
    embeddings over attended positions. hidden [B, T, H] -> float32 [B, H]."""
    h = hidden.float()
    if attention_mask is None:
        return h.mean(dim=1)
    m = attention_mask.to(h.device, h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of embeddings [N, H] -> float64 [N]."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)
