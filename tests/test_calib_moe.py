"""MoE expert stacks (transformers >= 5 3-D gate_up_proj / down_proj): routed-token Hessians, counts, fallbacks."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp4cal import dequantize, quantize, search_scales  # noqa: E402
from fp4cal.calib.calibrate import CalibrationWarning, calibrate  # noqa: E402
from fp4cal.calib.capture import ActivationCapture, capture_statistics  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402

E, TOPK = 8, 2


def tiny_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96, num_experts=E,
        num_experts_per_tok=TOPK, max_position_embeddings=64,
    )
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def tiny_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=96, num_local_experts=4, num_experts_per_tok=TOPK, max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def tiny_gpt_oss(seed: int = 0):
    """Experts stored transposed [E, cin, cout], with biases and a custom gate: the wrapper's other flags."""
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def batches(n=2, b=2, t=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (b, t), generator=g) for _ in range(n)]


def block_hessian(x):
    xb = x.reshape(-1, x.shape[-1] // 16, 16).double()
    return torch.einsum("tnk,tnl->nkl", xb, xb) / xb.shape[0]


def mask_expert(model, layer: int, dead: int):
    """Route no token to expert ``dead`` of ``layer``: recompute the router's top-k without it."""
    gate = model.model.layers[layer].mlp.gate

    def hook(mod, args, out):
        logits = out[0].clone()
        logits[:, dead] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, mod.top_k, dim=-1)
        if mod.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(out[1].dtype), idx

    return gate.register_forward_hook(hook)


def test_expert_targets_and_router_exclusion():
    model = tiny_qwen3_moe()
    targets, skipped = find_targets(model)
    experts = [t for t in targets if t.kind == "experts"]
    assert [t.name for t in experts] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    ]
    assert tuple(experts[0].weight().shape) == (E, 64, 64) and tuple(experts[1].weight().shape) == (E, 64, 32)
    assert "lm_head.weight" in skipped
    # the routers hold a 2-D weight but are not nn.Linear: neither targets nor silently dropped linears
    assert not any(".mlp.gate" in t.name for t in targets)


@pytest.mark.parametrize(
    "build", [tiny_qwen3_moe, tiny_mixtral, tiny_gpt_oss], ids=["qwen3_moe", "mixtral", "gpt_oss_transposed"]
)
def test_capture_wrapper_computes_the_same_outputs(build):
    model = build()
    targets, _ = find_targets(model)
    x = batches(n=1)[0]
    with torch.no_grad():
        ref = model(x).logits
        with ActivationCapture(model, targets) as cap:
            out = model(x).logits
        after = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    for st in cap.stats.experts.values():  # the wrapper really ran: every (token, k) pair was routed
        assert int(st.counts.sum()) == x.numel() * TOPK
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_per_expert_hessians_from_routed_tokens():
    model = tiny_qwen3_moe()
    targets, _ = find_targets(model)
    experts = model.model.layers[1].mlp.experts
    seen = []
    h = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    stats = capture_statistics(model, batches(), targets)
    h.remove()
    st = stats.experts["model.layers.1.mlp.experts"]
    hs = torch.cat([s[0] for s in seen])
    idx = torch.cat([s[1] for s in seen])
    for e in range(E):
        tok = (idx == e).any(-1).nonzero().flatten()
        assert int(st.counts[e]) == tok.numel()
        if tok.numel() == 0:
            continue
        x = hs[tok]
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        mid = experts.act_fn(gate) * up
        torch.testing.assert_close(st.in_hessians[e].normalized().double(), block_hessian(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.mid_hessians[e].normalized().double(), block_hessian(mid), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(st.in_amax[e], x.abs().amax())


def test_never_routed_expert_falls_back_and_is_reported():
    model = tiny_qwen3_moe()
    dead = 5
    handle = mask_expert(model, 0, dead)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibrate(model, batches(), "local_hessian", min_expert_tokens=1)
    handle.remove()
    msgs = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    for p in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{p}"
        wr = result.weights[name]
        assert wr.kind == "experts" and wr.method == "local_hessian" and wr.fallback is None
        assert isinstance(wr.tokens, torch.Tensor) and wr.tokens.shape == (E,)
        assert int(wr.tokens[dead]) == 0 and int(wr.tokens.sum()) == 2 * 2 * 16 * TOPK
        assert set(wr.expert_fallback) == {dead} and "no routed tokens" in wr.expert_fallback[dead]
        assert any(name in m and f"{dead} (0 tokens)" in m for m in msgs)
        w = model.get_parameter(name).detach()
        want = search_scales(w[dead], "mse", global_amax=wr.global_amax[dead])
        torch.testing.assert_close(wr.block_amax[dead], want, rtol=0, atol=0)
        assert torch.isfinite(wr.input_amax).all() and (wr.input_amax > 0).all()
    # the other layer saw every expert: no fallback there
    assert result.weights["model.layers.1.mlp.experts.down_proj"].expert_fallback == {}


def test_expert_stack_search_uses_each_experts_hessian():
    model = tiny_qwen3_moe()
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(), targets)
    from fp4cal.calib.calibrate import solve

    with pytest.warns(CalibrationWarning, match="fewer than min_expert_tokens = 12"):
        result = solve(targets, stats, "local_hessian", min_expert_tokens=12)
    name = "model.layers.1.mlp.experts.down_proj"
    wr = result.weights[name]
    st = stats.experts["model.layers.1.mlp.experts"]
    w = model.get_parameter(name).detach()
    assert wr.block_amax.shape == (E, 64, 2) and wr.block_scale.dtype == torch.float8_e4m3fn
    for e in range(E):
        n = int(st.counts[e])
        if n >= 12:
            want = search_scales(w[e], "local_hessian", st.mid_hessians[e].normalized(), wr.global_amax[e])
            assert e not in wr.expert_fallback
        else:
            want = search_scales(w[e], "mse", global_amax=wr.global_amax[e])
            assert f"{n} routed tokens" in wr.expert_fallback[e]
        torch.testing.assert_close(wr.block_amax[e], want, rtol=0, atol=0)
    torch.testing.assert_close(wr.global_amax, w.abs().amax(dim=(-2, -1)))


def test_transposed_experts_are_searched_in_cout_cin_layout():
    model = tiny_gpt_oss()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = calibrate(model, batches(n=1), "local_hessian", fake_quantize=True, min_expert_tokens=1)
    wr = result.weights["model.layers.0.mlp.experts.down_proj"]
    p = model.get_parameter(wr.name)
    assert wr.transposed and tuple(p.shape) == (4, 32, 64) and wr.shape == (4, 64, 32)
    assert wr.block_amax.shape == (4, 64, 2)
    w = before[wr.name].transpose(-1, -2)
    q = quantize(w, wr.block_amax, wr.global_amax)
    assert torch.equal(p.detach(), dequantize(q, dtype=w.dtype).transpose(-1, -2))
    # gpt-oss's router is its own module class, not nn.Linear: never a target
    assert not any("router" in n for n in result.weights)


def test_wrapper_accepts_batched_leading_dims():
    model = tiny_qwen3_moe()
    targets, _ = find_targets(model)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 64, generator=g)
    idx = torch.randint(0, E, (2, 5, TOPK), generator=g)
    wts = torch.rand(2, 5, TOPK, generator=g)
    with torch.no_grad():
        ref = experts(hs.reshape(10, 64), idx.reshape(10, TOPK), wts.reshape(10, TOPK))
        with ActivationCapture(model, targets) as cap:
            out = experts(hs, idx, wts)
    assert out.shape == (2, 5, 64)
    torch.testing.assert_close(out.reshape(10, 64), ref, rtol=1e-5, atol=1e-6)
    assert int(cap.stats.experts["model.layers.0.mlp.experts"].counts.sum()) == 10 * TOPK
