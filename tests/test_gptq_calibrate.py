"""method='gptq' through calibrate, capture, export and load: full Hessians, sharing, MoE, fallbacks, round trip."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import fp4cal
from fp4cal.calib.calibrate import CalibrationWarning, calibrate, fake_quantize_model
from fp4cal.calib.capture import capture_statistics
from fp4cal.calib.targets import find_targets
from fp4cal.export.io import read_tensors
from fp4cal.gptq import GPTQConfig, layer_objective
from fp4cal.numerics import fake_quantize
from test_export_helpers import bits, tiny_llama, tiny_qwen3_moe

FORMATS = ["compressed-tensors", "modelopt"]


def batches(n=3, b=2, t=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (b, t), generator=g) for _ in range(n)]


def test_full_hessian_capture_shares_inputs_and_gives_the_block_hessians():
    """One capture: q/k/v (and gate/up) share one full Hessian; its diagonal blocks are the block Hessians,
    equal to what a block capture accumulates (up to fp32 rounding of each batch's products)."""
    model = tiny_llama(torch.float32)
    targets, _ = find_targets(model)
    full = capture_statistics(model, batches(), targets, full_hessians=True)
    block = capture_statistics(model, batches(), targets, hessians=True)
    q, k = full.inputs["model.layers.0.self_attn.q_proj"], full.inputs["model.layers.0.self_attn.k_proj"]
    assert q is k and q.full is not None and q.full.n == 3 * 2 * 16
    for name, slot in full.inputs.items():
        assert slot.full.sum64.shape == (slot.cin, slot.cin)
        torch.testing.assert_close(slot.hessian.normalized(), block.inputs[name].hessian.normalized(),
                                   rtol=1e-5, atol=1e-7)


def test_calibrate_gptq_lowers_the_layer_objective_and_fake_quantizes_the_codes():
    model = tiny_llama(torch.float32)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = calibrate(model, batches(), "gptq", backend="reference")
    assert res.method == "gptq"
    for wr in res.weights.values():
        assert wr.method == "gptq" and wr.codes is not None and wr.codes.dtype == torch.uint8
        assert wr.loss_chosen < wr.loss_max  # tr(dW H dW^T): GPTQ below round-to-nearest with max scales
    fake_quantize_model(model, res)
    # fake quantization writes the GPTQ weights, which are not round-to-nearest of the original weights
    moved = 0
    for name, wr in res.weights.items():
        p = model.get_parameter(name).detach()
        rtn = fake_quantize(ref[name], wr.block_amax, wr.global_amax)
        moved += int((p != rtn).sum())
        assert bool(torch.isfinite(p).all())
    assert moved > 0


def test_gptq_objective_matches_a_direct_recomputation():
    """loss_chosen is tr(dW H dW^T) with the calibration Hessian of the layer's input."""
    model = tiny_llama(torch.float32)
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(), targets, full_hessians=True)
    from fp4cal.calib.calibrate import fake_quantize_model as fq_model
    from fp4cal.calib.calibrate import solve

    res = solve(targets, stats, "gptq", backend="reference", gptq=GPTQConfig("max"))
    name = "model.layers.0.mlp.down_proj.weight"
    w = model.get_parameter(name).detach().clone()
    h = stats.inputs["model.layers.0.mlp.down_proj"].full.normalized()
    fq_model(model, res)
    q = model.get_parameter(name).detach()
    assert res.weights[name].loss_chosen == pytest.approx(layer_objective(w, q, h), rel=1e-9)


@pytest.mark.parametrize("scales", ["local_hessian_dynamic", "max"])
def test_calibrate_gptq_scale_options(scales):
    model = tiny_llama(torch.float32)
    res = calibrate(model, batches(2), "gptq", gptq_scales=scales, backend="reference")
    assert all(wr.loss_chosen < wr.loss_max for wr in res.weights.values())


@pytest.mark.parametrize("kw", [{"gptq_damp": 0.0}, {"gptq_damp": float("nan")}, {"gptq_scales": "best"}])
def test_calibrate_gptq_refuses_bad_options(kw):
    with pytest.raises(ValueError, match="gptq_"):
        calibrate(tiny_llama(torch.float32), batches(1), "gptq", **kw)


def test_moe_experts_get_their_own_hessians_and_fallbacks_are_named():
    model = tiny_qwen3_moe(torch.float32)
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(2), targets, full_hessians=True)
    st = next(iter(stats.experts.values()))
    assert len(st.in_full) == 4 and all(a.sum64.shape == (64, 64) for a in st.in_full)
    assert int(sum(a.n for a in st.in_full)) == int(st.counts.sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = calibrate(model, batches(2), "gptq", min_expert_tokens=10_000, backend="reference", gptq_scales="max")
    stack = res.weights["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.method == "mse" and "min_expert_tokens" in stack.fallback
    assert any(issubclass(w.category, CalibrationWarning) and "experts.gate_up_proj" in str(w.message)
               for w in caught)
    res = calibrate(model, batches(2), "gptq", min_expert_tokens=int(st.counts.min()) + 1, backend="reference",
                    gptq_scales="max")
    stack = res.weights["model.layers.0.mlp.experts.down_proj"]
    low = [e for e in range(4) if int(st.counts[e]) <= int(st.counts.min())]
    assert stack.method == "gptq" and sorted(stack.expert_fallback) == low
    assert stack.codes.shape == (4, 64, 16)


@functools.cache
def _calibrated(kind: str):
    model = (tiny_llama if kind == "llama" else tiny_qwen3_moe)(torch.float32)
    # local_hessian_dynamic: the group scales are re-searched inside GPTQ; max keeps the MoE case quick
    scales = "local_hessian_dynamic" if kind == "llama" else "max"
    return model, calibrate(model, batches(2), "gptq", min_expert_tokens=1, backend="reference", gptq_scales=scales)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_checkpoint_round_trips_exactly(tmp_path, fmt):
    """A gptq checkpoint loads back (fp4cal.load) to exactly the GPTQ weights, dense and MoE."""
    for kind in ("llama", "moe"):
        model, res = _calibrated(kind)
        out = fp4cal.export(res, model, tmp_path / kind, format=fmt)
        want = {n: p.detach().clone() for n, p in model.named_parameters()}
        fq = copy.deepcopy(model)
        fake_quantize_model(fq, res)
        loaded = fp4cal.load(out, dtype=torch.float32)
        for name in want:
            expect = fq.get_parameter(name).detach()
            assert torch.equal(bits(loaded.get_parameter(name).detach()), bits(expect)), (kind, name)
        rtn = fake_quantize(want["model.layers.0.self_attn.o_proj.weight"],
                            res.weights["model.layers.0.self_attn.o_proj.weight"].block_amax,
                            res.weights["model.layers.0.self_attn.o_proj.weight"].global_amax)
        assert not torch.equal(rtn, fq.get_parameter("model.layers.0.self_attn.o_proj.weight").detach())


def test_zero_activations_and_indefinite_hessian_still_write_finite_checkpoints(tmp_path):
    """Bad input: a layer whose every calibration token is zero, and a Hessian no damping retry can factor:
    named fallbacks (warned), and the checkpoint written afterwards holds only finite values."""
    model = tiny_llama(torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()  # down_proj's inputs: act(gate) * 0 = all zero
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(2), targets, full_hessians=True)
    slot = stats.inputs["model.layers.0.self_attn.o_proj"]
    s = slot.full.sum64
    s -= 100 * s.diagonal().mean() * torch.diag(torch.linspace(0, 1, s.shape[0], dtype=torch.float64))
    s.diagonal().abs_()
    s[0, 1] = s[1, 0] = 1e9
    from fp4cal.calib.calibrate import solve

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = solve(targets, stats, "gptq", backend="reference", gptq=GPTQConfig("max"))
    down = res.weights["model.layers.0.mlp.down_proj.weight"]
    o = res.weights["model.layers.0.self_attn.o_proj.weight"]
    assert down.fallback is not None and "zero" in down.fallback and down.method == "mse"
    assert o.fallback is not None and "not positive definite" in o.fallback and o.method == "max"
    messages = " ".join(str(w.message) for w in caught)
    assert "down_proj" in messages and "o_proj" in messages
    out = fp4cal.export(res, model, tmp_path / "ckpt")
    tensors, _ = read_tensors(out)
    for name, t in tensors.items():
        if t.dtype.is_floating_point:
            assert bool(torch.isfinite(t.float()).all()), name
    loaded = fp4cal.load(out, dtype=torch.float32)
    assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())
