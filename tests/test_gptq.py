"""fp4cal.gptq: the fast path against the float64 reference, GPTQ's properties, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fp4cal.gptq import GPTQConfig, block_diagonal, gptq_reference, gptq_round, inverse_factor, layer_objective
from fp4cal.numerics import NVFP4Tensor, dequantize, fake_quantize, global_scale, pack_codes, quantize


def correlated(cout: int, cin: int, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [cout, cin], H [cin, cin]) with strongly correlated inputs, as in real layers."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=gen) / math.sqrt(cin)
    x = torch.randn(tokens, cin, generator=gen) @ mix + 0.2 * torch.randn(tokens, cin, generator=gen)
    x = x * torch.linspace(0.2, 3.0, cin)  # uneven channel scales
    w = torch.randn(cout, cin, generator=gen)
    return w, x.T @ x / tokens


ALL_SCALES = ["max", "mse", "local_hessian", "local_hessian_dynamic"]


@pytest.mark.parametrize("scales", ALL_SCALES)
def test_fast_path_matches_float64_reference(scales):
    """Every rounding (and dynamic scale) decision of the fast path equals the reference's, except float64 ties.
    float64 working precision: differences come from the lazy block order only. Block size 32 so that the
    64-column weight crosses a lazy-update boundary."""
    w, h = correlated(24, 64, seed=1)
    cfg = GPTQConfig(scales=scales, block_size=32)
    fast = gptq_round(w, h, cfg=cfg, backend="reference", work_dtype=torch.float64)
    _, par = gptq_reference(w, h, cfg=cfg, follow=fast)
    print(f"{scales}: {par}")  # the counts, reported by pytest -s
    assert par.code_mismatches == 0 and par.scale_mismatches == 0, par
    assert par.code_ties <= 2 and par.scale_ties <= 2, par


@pytest.mark.parametrize("scales", ["local_hessian", "local_hessian_dynamic"])
def test_fp32_fast_path_near_reference(scales):
    """The default fp32 working precision: decisions may differ where fp32 rounding moves a value across a
    rounding midpoint; count them (reported) and check they are rare and the objective is unchanged to 1e-3."""
    w, h = correlated(16, 64, seed=2)
    cfg = GPTQConfig(scales=scales, block_size=32)
    fast = gptq_round(w, h, cfg=cfg, backend="reference")
    ref, _ = gptq_reference(w, h, cfg=cfg)
    _, par = gptq_reference(w, h, cfg=cfg, follow=fast)
    print(f"fp32 {scales}: {par}")
    assert par.code_mismatches + par.scale_mismatches <= 0.01 * w.numel(), par
    lf, lr = layer_objective(w, fast.weight, h), layer_objective(w, ref.weight, h)
    assert abs(lf - lr) <= 1e-3 * lr


def test_reference_parity_detects_a_changed_decision():
    """The parity count is not vacuous: flip one code of the fast output and the reference reports it."""
    w, h = correlated(8, 32, seed=3)
    cfg = GPTQConfig(scales="mse", block_size=16)
    fast = gptq_round(w, h, cfg=cfg, backend="reference", work_dtype=torch.float64)
    fast.codes[3, 5] ^= 1  # a different magnitude code
    _, par = gptq_reference(w, h, cfg=cfg, follow=fast)
    assert par.code_mismatches >= 1


@pytest.mark.parametrize("scales", ALL_SCALES)
def test_gptq_beats_round_to_nearest_on_correlated_data(scales):
    """The layer objective tr(dW H dW^T) of GPTQ is below round-to-nearest with the same scales."""
    w, h = correlated(32, 128, seed=4)
    out = gptq_round(w, h, cfg=GPTQConfig(scales=scales), backend="reference")
    rtn = fake_quantize(w, out.block_amax)
    assert layer_objective(w, out.weight, h) < layer_objective(w, rtn, h)


def test_codes_decode_exactly_and_match_numerics_rounding():
    """Codes decode through numerics.dequantize to exactly .weight; with an identity Hessian (no error
    propagation) GPTQ is round-to-nearest, so codes equal numerics.quantize's."""
    w, h = correlated(16, 64, seed=5)
    out = gptq_round(w, h, backend="reference")
    g = w.abs().amax()
    block_scale = quantize(w, out.block_amax, g).block_scale
    t = NVFP4Tensor(pack_codes(out.codes), block_scale, global_scale(g), torch.float32)
    assert torch.equal(dequantize(t), out.weight)
    eye = torch.eye(64)
    rtn = gptq_round(w, eye, cfg=GPTQConfig(scales="mse"), backend="reference")
    assert torch.equal(pack_codes(rtn.codes), quantize(w, rtn.block_amax, g).codes)


def test_dead_channels_zeroed_and_finite():
    """Input channels with a zero Hessian diagonal are zeroed (GPTQ's rule); everything else stays finite and
    still beats round-to-nearest."""
    w, h = correlated(16, 64, seed=6)
    dead = torch.tensor([3, 17, 40])
    h[dead, :] = 0
    h[:, dead] = 0
    out = gptq_round(w, h, backend="reference")
    assert out.dead == 3 and out.fallback is None
    assert torch.equal(out.weight[:, dead], torch.zeros(16, 3))
    assert bool(torch.isfinite(out.weight).all())
    assert layer_objective(w, out.weight, h) < layer_objective(w, fake_quantize(w, out.block_amax), h)


def test_all_zero_hessian_falls_back_to_round_to_nearest():
    w, _ = correlated(8, 32, seed=7)
    out = gptq_round(w, torch.zeros(32, 32), backend="reference")
    assert out.fallback is not None and "zero" in out.fallback
    assert torch.equal(out.weight, fake_quantize(w, out.block_amax))  # not zeroed: rounded to nearest


def test_not_positive_definite_retries_then_falls_back():
    """An indefinite Hessian: damping retries (x10) cannot fix a large negative eigenvalue -> named fallback."""
    w, h = correlated(8, 32, seed=8)
    bad = h - 50 * h.diagonal().mean() * torch.eye(32) * torch.linspace(0, 1, 32)  # negative diagonal entries
    bad.diagonal().abs_()  # keep diag > 0 so channels are not 'dead'
    bad[0, 1] = bad[1, 0] = 1e6
    f = inverse_factor(bad, 0.01)
    assert f.u is None and f.damp == pytest.approx(10.0)
    out = gptq_round(w, bad, backend="reference")
    assert out.fallback is not None and "not positive definite" in out.fallback
    assert bool(torch.isfinite(out.weight).all())


def test_damping_retry_recovers_a_slightly_indefinite_hessian():
    w, h = correlated(8, 32, seed=9)
    evals, vecs = torch.linalg.eigh(h.double())
    evals[0] = -0.02 * evals.mean()  # needs lambda > 0.02: the second try (0.1) works
    bad = (vecs * evals) @ vecs.T
    out = gptq_round(w, bad, backend="reference")
    assert out.fallback is None and out.damp == pytest.approx(0.1)


@pytest.mark.parametrize("damp", [0, -0.1, float("nan"), float("inf"), True, "0.01"])
def test_bad_damping_is_refused(damp):
    with pytest.raises(ValueError, match="gptq_damp"):
        GPTQConfig(damp=damp)


def test_bad_shapes_and_values_are_refused():
    w, h = correlated(8, 32)
    with pytest.raises(ValueError, match="16"):
        gptq_round(torch.randn(8, 40), torch.eye(40))
    with pytest.raises(ValueError, match=r"hessian must have shape"):
        gptq_round(w, torch.eye(16))
    h2 = h.clone()
    h2[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hessian contains non-finite"):
        gptq_round(w, h2)
    with pytest.raises(ValueError, match="gptq_scales"):
        GPTQConfig(scales="minmax")
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=40)


def test_block_diagonal_reads_the_16x16_blocks():
    h = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    b = block_diagonal(h)
    assert b.shape == (4, 16, 16)
    for j in range(4):
        assert torch.equal(b[j], h[16 * j : 16 * j + 16, 16 * j : 16 * j + 16])


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U from the reversed Cholesky (hessian.py's docstring) against the definition: U upper triangular with a
    positive diagonal and U^T U = (H + lambda mean(diag H) I)^-1, dead channels set to 1 first."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    x[:, 5] = 0.0  # a dead channel
    h = x.T @ x / 300
    f = inverse_factor(h, 0.01)
    hd = h.clone()
    hd[5, 5] = 1.0
    damped = hd + 0.01 * torch.diagonal(hd).mean() * torch.eye(64, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert bool(f.dead[5]) and int(f.dead.sum()) == 1
    assert torch.equal(f.u, torch.triu(f.u)) and bool((torch.diagonal(f.u) > 0).all())
    assert torch.allclose(f.u, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(f.u.T @ f.u, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)
