"""calibrate(): result wiring, shared global amax, fake quantization, fallbacks and skips."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp4cal import dequantize, quantize, search_scales  # noqa: E402
from fp4cal.calib.calibrate import CalibrationWarning, calibrate, fake_quantize_model, solve  # noqa: E402
from fp4cal.calib.capture import capture_statistics  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402


def tiny_llama(seed: int = 0):
    return _tiny_llama(seed)
def batches(n=2, b=2, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (b, t), generator=g) for _ in range(n)]


class CountingLlama(torch.nn.Module):
    """Counts forwards independently of the capture's own counter."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return self.inner(input_ids)


@pytest.mark.parametrize("method", ["local_hessian", "mse", "max"])
def test_one_forward_per_batch_and_every_weight_reported(method):
    model = CountingLlama(tiny_llama())
    data = batches(n=3)
    result = calibrate(model, data, method)
    assert model.calls == len(data) == result.forward_calls
    assert len(result.weights) == 14 and set(result.skipped) == {"inner.lm_head.weight"}
    for wr in result.weights.values():
        assert wr.method == method and wr.fallback is None
        assert wr.tokens == sum(b.numel() for b in data)
        # activation amax is collected in the same pass for every method (W4A4 export)
        assert wr.input_amax is not None and float(wr.input_amax) > 0
        assert wr.loss_chosen <= wr.loss_max * (1 + 1e-12)
        if method == "max":
            assert wr.loss_chosen == wr.loss_max
    assert set(result.timings) >= {"capture", "search", "total"}


def test_scales_and_fake_quantized_weights_match_numerics():
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = calibrate(model, batches(), "local_hessian", fake_quantize=True)
    for name, wr in result.weights.items():
        w = original[name]
        q = quantize(w, wr.block_amax, wr.global_amax)
        assert torch.equal(q.block_scale.view(torch.uint8), wr.block_scale.view(torch.uint8))
        assert torch.equal(model.get_parameter(name).detach(), dequantize(q, dtype=w.dtype)), name
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])  # skipped: untouched
    assert torch.equal(model.model.layers[0].input_layernorm.weight, original["model.layers.0.input_layernorm.weight"])


def test_fused_groups_share_one_global_amax():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = 3.0  # k has the largest |w| of q/k/v
    result = calibrate(model, batches(n=1), "mse")
    p = "model.layers.0."
    qkv = [result.weights[p + f"self_attn.{s}_proj.weight"] for s in "qkv"]
    assert {wr.fused_group for wr in qkv} == {p + "self_attn.qkv"}
    for wr in qkv:
        assert float(wr.global_amax) == 3.0
    gate, up = (result.weights[p + f"mlp.{s}_proj.weight"] for s in ("gate", "up"))
    g = max(model.get_parameter(wr.name).detach().abs().max() for wr in (gate, up))
    assert float(gate.global_amax) == float(up.global_amax) == float(g)
    o = result.weights[p + "self_attn.o_proj.weight"]
    assert o.fused_group is None and float(o.global_amax) == float(model.get_parameter(o.name).detach().abs().max())
    # the search itself used the shared amax
    w = model.get_parameter(qkv[0].name).detach()
    torch.testing.assert_close(qkv[0].block_amax, search_scales(w, "mse", global_amax=qkv[0].global_amax))


def test_identity_hessians_give_the_mse_scales():
    model = tiny_llama()
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(), targets)
    for slot in {id(s): s for s in stats.inputs.values()}.values():
        acc = slot.hessian
        acc.sum = torch.eye(16).expand_as(acc.sum).contiguous() * acc.n
    lh = solve(targets, stats, "local_hessian")
    mse = solve(targets, stats, "mse")
    for name, wr in lh.weights.items():
        assert wr.method == "local_hessian"
        assert torch.equal(wr.block_amax, mse.weights[name].block_amax), name
        assert wr.loss_chosen == pytest.approx(mse.weights[name].loss_chosen, rel=1e-12)


def test_real_hessians_change_some_scales_and_lower_their_objective():
    model = tiny_llama()
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(), targets)
    lh = solve(targets, stats, "local_hessian")
    mse = solve(targets, stats, "mse")
    changed = sum(int((lh.weights[n].block_amax != mse.weights[n].block_amax).sum()) for n in lh.weights)
    assert changed > 0
    for name, wr in lh.weights.items():
        h = stats.inputs[wr.module_name].hessian.normalized()
        w = model.get_parameter(name).detach()
        from fp4cal.search.reference import reference_losses

        at_mse = float(reference_losses(w, wr.global_amax, mse.weights[name].block_amax, h)[0, 1])
        assert wr.loss_chosen <= at_mse * (1 + 1e-12)


class Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = torch.nn.Linear(32, 32)
        self.odd = torch.nn.Linear(32, 24)
        self.odd_in = torch.nn.Linear(24, 32)  # cin = 24: not divisible by 16
        self.unused = torch.nn.Linear(32, 32)  # never called

    def forward(self, x):
        return self.odd_in(self.odd(self.ok(x)))


def test_indivisible_cin_is_skipped_with_a_warning_and_unseen_layers_fall_back():
    model = Odd()
    before = model.odd_in.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibrate(model, [torch.randn(8, 32)], "local_hessian", fake_quantize=True)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    assert "odd_in.weight" in result.skipped and "not divisible" in result.skipped["odd_in.weight"]
    assert any(m.startswith("odd_in.weight") and "24" in m for m in msgs)
    assert torch.equal(model.odd_in.weight, before)
    assert set(result.weights) == {"ok.weight", "odd.weight", "unused.weight"}
    un = result.weights["unused.weight"]
    assert un.method == "mse" and "no calibration tokens" in un.fallback and un.tokens == 0 and un.input_amax is None
    assert any(m.startswith("unused.weight") for m in msgs)


def test_exclusion_patterns_are_configurable():
    model = tiny_llama()
    result = calibrate(model, batches(n=1), "max", exclude=[r"\.mlp\."])
    assert not any(".mlp." in n for n in result.weights)
    assert "lm_head.weight" in result.weights  # default patterns replaced
    assert all("excluded by pattern" in r for r in result.skipped.values())
    only = calibrate(model, batches(n=1), "max", include=[r"layers\.1\.self_attn"])
    assert set(only.weights) == {f"model.layers.1.self_attn.{s}_proj.weight" for s in "qkvo"}


def test_bad_arguments_are_rejected():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(model, batches(n=1), "minmax")
    with pytest.raises(ValueError, match="batches was empty"):
        calibrate(model, [], "max")
    with pytest.raises(TypeError, match="batch"):
        calibrate(model, [3], "max")
    with pytest.raises(ValueError, match="min_expert_tokens"):
        calibrate(model, batches(n=1), "max", min_expert_tokens=0)


def test_causal_lm_calibration_skips_the_unused_logits():
    """lm_head is not quantized, so the calibration forward asks for the last position's logits only."""
    model = tiny_llama()
    rows = []
    h = model.lm_head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    calibrate(model, batches(n=1, t=12), "max")
    h.remove()
    assert rows == [1]
    rows.clear()
    h = model.lm_head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    result = calibrate(model, batches(n=1, t=12), "max", exclude=[])  # lm_head quantized: it needs every row
    h.remove()
    assert rows == [12] and result.weights["lm_head.weight"].tokens == 24


def test_training_mode_is_restored_and_dropout_is_off_during_capture():
    model = tiny_llama()
    model.train()
    modes = []
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    calibrate(model, batches(n=1), "max")
    h.remove()
    assert modes == [False] and model.training


def test_fake_quantize_model_rejects_a_mismatched_result():
    model = tiny_llama()
    result = calibrate(model, batches(n=1), "max")
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=96))
    with pytest.raises(ValueError, match="calibrated as"):
        fake_quantize_model(other, result)


def test_zero_trace_hessian_blocks_fall_back_to_mse_and_are_counted():
    """Issue 16: input channels never active in calibration give all-zero Hessian blocks; those blocks get the mse
    pick (not the smallest candidate), the count lands in WeightResult.hessian_fallback_blocks, with a warning."""
    model = tiny_llama()
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(), targets)
    slots = {id(s): s for s in stats.inputs.values()}
    for slot in slots.values():  # channels 16..31 never active: Hessian block column 1 all zero
        acc = slot.hessian.sum
        acc[1] = 0.0
        slot.hessian.sum = acc
    with pytest.warns(CalibrationWarning, match="zero-trace Hessian blocks"):
        lh = solve(targets, stats, "local_hessian")
    mse = solve(targets, stats, "mse")
    for name, wr in lh.weights.items():
        cout = wr.shape[-2]
        assert wr.hessian_fallback_blocks == cout, name  # one block column of cout blocks
        assert torch.equal(wr.block_amax[:, 1], mse.weights[name].block_amax[:, 1]), name
        assert wr.loss_chosen <= wr.loss_max * (1 + 1e-12)
    assert all(wr.hessian_fallback_blocks == 0 for wr in mse.weights.values())
