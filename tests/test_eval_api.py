"""fp4cal.eval API: expert stacks, cached vs recomputed deltas, the Hessian-weighted error formula, restoration."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp4cal.eval import evaluate, hessian_weighted_error  # noqa: E402
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402


def tiny_qwen3_moe():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def tiny_llama():
    return _tiny_llama(0, layers=1)
def token_batches(n, seed, b=2, t=16):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 96, (b, t), generator=g)), "attention_mask": torch.ones_like(ids)}
            for _ in range(n)]


def test_expert_stacks_get_hessian_errors_and_weights_are_restored(torch_single_thread):
    model = tiny_qwen3_moe()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = token_batches(2, 1)
    res = evaluate(model, calib, token_batches(2, 2), "mse,local_hessian", min_expert_tokens=1)
    assert res.calibration_forwards == len(calib) and res.model_kind == "causal_lm"
    stacks = [le for le in res.layers if le.kind == "experts"]
    prefix = "model.layers.0.mlp.experts."
    assert {le.name for le in stacks} == {prefix + "gate_up_proj", prefix + "down_proj"}
    for le in res.layers:
        for m in res.methods:
            assert math.isfinite(le.hessian_error[m]) and 0 < le.hessian_error[m] < 0.1
            # hooks cannot see an expert's routed inputs: no output error for stacks, a real one for linears
            assert math.isnan(le.output_error[m]) == (le.kind == "experts")
    assert stacks[0].tokens == 2 * 2 * 16 * 2  # routed (token, expert) pairs: B * T * top-k per batch
    for m in ("full precision", *res.methods):
        assert math.isfinite(res.model_metric[m]["perplexity"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # fake quantization was undone after each method's pass


def test_cached_and_recomputed_deltas_agree(torch_single_thread):
    model = tiny_llama()
    kw = dict(methods="max,local_hessian", modelopt_check=False)
    a = evaluate(model, token_batches(1, 1), token_batches(2, 2), cache_deltas=True, **kw)
    b = evaluate(model, token_batches(1, 1), token_batches(2, 2), cache_deltas=False, **kw)
    assert [le.output_error for le in a.layers] == [le.output_error for le in b.layers]
    assert a.model_metric == b.model_metric


def test_hessian_weighted_error_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 32, generator=g)
    wq = w + 0.1 * torch.randn(3, 8, 32, generator=g)
    x = torch.randn(3, 50, 32, generator=g, dtype=torch.float64)
    xb = x.reshape(3, 50, 2, 16)
    h = torch.einsum("etnk,etnl->enkl", xb, xb)  # per-expert sums [E, 2, 16, 16]
    db, wb = (w - wq).double().reshape(3, 8, 2, 16), w.double().reshape(3, 8, 2, 16)
    want = torch.einsum("ernk,enkl,ernl->", db, h, db) / torch.einsum("ernk,enkl,ernl->", wb, h, wb)
    assert hessian_weighted_error(w, wq, h.float()) == pytest.approx(float(want), rel=1e-6)
    want0 = torch.einsum("rnk,nkl,rnl->", db[0], h[0], db[0]) / torch.einsum("rnk,nkl,rnl->", wb[0], h[0], wb[0])
    assert hessian_weighted_error(w[0], wq[0], h[0]) == pytest.approx(float(want0), rel=1e-6)
    assert math.isnan(hessian_weighted_error(w[0], wq[0], torch.zeros(2, 16, 16)))
