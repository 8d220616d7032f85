"""The CPU path (search/windowed.py: the kernels' windows and bounds in PyTorch) picks exactly what the brute-force
reference picks, on every weight and Hessian family, including rank-deficient and ill-conditioned Hessians."""

from __future__ import annotations

import pytest
import torch

import fp4cal
from fp4cal.search.parity import compare_picks
from fp4cal.search.reference import search_reference
from fp4cal.search.windowed import block_bounds, search_windowed
from fp4cal.validation import check_global_amax
from kernel_cases import ILL_CONDITIONED, make_hessian, make_ill_hessian, make_weight

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _assert_same(w, g_arg, method, h, label):
    g = check_global_amax(g_arg, w)
    got = search_windowed(w, method, g, h)
    ref = search_reference(w, method, g, h)
    rep = compare_picks(w, g, got, ref, h if method == "local_hessian" else None)
    print(f"{label}: {rep.differing} differing of {rep.blocks} blocks, {rep.ties} float64 ties")
    # the same float64 loss function on the same fp32 errors: no tie can resolve differently either
    assert torch.equal(got, ref), f"{label}: {rep.differing} differ ({rep.ties} ties, worst {rep.worst_rel_gap:.3e})"


@pytest.mark.parametrize("kind", ["normal", "heavy", "outliers", "zeros", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_picks_equal_reference(kind, dtype):
    w, g = make_weight(kind, 48, 128, dtype, seed=hash((kind, str(dtype))) % 997)
    _assert_same(w, g, "mse", None, f"mse {kind} {dtype}")


@pytest.mark.parametrize("hkind", ["psd", "diag", "lowrank", "zero", "range", "identity"] + ILL_CONDITIONED)
@pytest.mark.parametrize("wkind", ["normal", "threshold", "outliers"])
def test_hessian_picks_equal_reference(hkind, wkind):
    w, g = make_weight(wkind, 48, 128, torch.float32, seed=3)
    if hkind in ILL_CONDITIONED:
        h = make_ill_hessian(hkind, 128, seed=4)
    else:
        h = make_hessian(hkind, 128, seed=4)
    _assert_same(w, g, "local_hessian", h, f"hessian {hkind} {wkind}")


def test_stack_shared_hessian_and_given_global_amax():
    w = torch.randn(3, 20, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    h = torch.stack([make_ill_hessian(k, 64, seed=s) for s, k in enumerate(("rank1", "deadchan", "collinear"))])
    g = torch.tensor([0.02, 3.0, 50.0])  # below the true amax for two experts: their large blocks saturate
    for hh in (h, h[1]):
        got = search_windowed(w, "local_hessian", g, hh)
        ref = search_reference(w, "local_hessian", g, hh)
        assert got.shape == (3, 20, 4) and torch.equal(got, ref)
    assert torch.equal(search_windowed(w, "mse", g), search_reference(w, "mse", g))


def test_extreme_global_amax_goes_to_the_reference():
    w = torch.randn(8, 32)
    for g in (0.0, 1e-30, 1e30):
        gg = torch.tensor(g)
        assert torch.equal(search_windowed(w, "mse", gg), search_reference(w, "mse", gg))


def test_dispatch_uses_it_on_cpu_and_restores_threads():
    w, g = make_weight("normal", 16, 64, torch.float32, seed=1)
    h = make_hessian("psd", 64, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = fp4cal.search_scales(w, "local_hessian", h)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, fp4cal.search_scales(w, "local_hessian", h, backend="reference"))


@pytest.mark.parametrize("hkind", ["psd", "range", "deadchan", "collinear", "rank2"])
def test_block_bounds_are_lower_bounds(hkind):
    """mu_i <= min{dw^T H dw : dw_i = 1} and dw^T H dw >= sum_i nu_i dw_i^2 for every dw (H - diag(nu) PSD)."""
    h = make_ill_hessian(hkind, 64, seed=5) if hkind in ILL_CONDITIONED else make_hessian(hkind, 64, seed=5)
    mu, nu, sd = block_bounds(h)
    hd = h.double()
    d = torch.diagonal(hd, dim1=-2, dim2=-1)
    assert torch.allclose(sd, d.sqrt(), rtol=1e-5)
    low = torch.linalg.eigvalsh(hd - torch.diag_embed(nu))[..., 0]
    assert bool((low >= -1e-6 * d.amax(-1)).all()), low.min()
    for b in range(h.shape[0]):
        for i in range(16):
            if mu[b, i] > 0:  # min over dw with dw_i = 1: 1 / (H^-1)_ii on the live channels
                live = hd[b].abs().amax(-1) > 0
                sub = hd[b][live][:, live]
                k = int(live[:i].sum())
                exact = 1.0 / torch.linalg.inv(sub)[k, k]
                assert mu[b, i] <= exact * (1 + 1e-9)
    if hkind in ("psd", "range", "deadchan"):
        assert bool((mu.amax(-1) > 0).all())  # dead channels no longer make the whole block singular


@pytest.mark.parametrize("method", ["mse", "local_hessian"])
def test_losses_equal_the_reference_objective(method):
    """The CPU path's losses (chosen: its own best, no second pass; max scales: one more step) equal
    reference_losses, what the calibration reports, on a stack with a dead block and an extreme global amax."""
    from fp4cal.search import search_scales_and_losses
    from fp4cal.search.reference import reference_losses

    w = torch.randn(3, 24, 64) * 0.02
    w[0, 0, :16] = 1e-9  # max scale underflows to 0
    g = torch.tensor([0.01, 0.05, 0.0])  # saturating, normal, and g = 0 (reference fallback)
    h = None
    if method == "local_hessian":
        h = torch.stack([make_ill_hessian("deadblock", 64, seed=s) for s in range(3)])
    amax, losses = search_scales_and_losses(w, method, h, g, backend="torch")
    want = reference_losses(w, g, amax, h).sum(0)
    assert torch.allclose(losses, want, rtol=1e-12, atol=0), (losses, want)
    assert torch.equal(amax, search_reference(w, method, g, h))


@pytest.mark.parametrize("threads", [2, 3])
def test_worker_threads_pick_and_sum_what_the_reference_does(monkeypatch, threads):
    """With torch's thread count above 1 the CPU path searches whole chunks of rows in that many worker threads
    (each with one intra-op thread, at most _MAX_WORKERS of them): the picks are the reference's, the losses its
    objective, and the caller's thread count comes back."""
    import threading
    import time

    import fp4cal.search.windowed as wd
    from fp4cal.search.reference import reference_losses

    monkeypatch.setattr(wd, "_CHUNK_ELEMS", 16 * 128)  # 16 rows per chunk: 5 chunks, rounded up per worker
    monkeypatch.setattr(wd, "_MIN_CHUNK_ELEMS", 16 * 128)  # a worker's chunk may be this small here
    seen = set()
    inner = wd._search_rows

    def spy(*args):
        seen.add((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.02)  # the GIL free for a while: one worker cannot take every chunk before the other starts
        return inner(*args)

    monkeypatch.setattr(wd, "_search_rows", spy)
    w, g_arg = make_weight("outliers", 72, 128, torch.float32, seed=11)
    g = check_global_amax(g_arg, w)
    h = make_ill_hessian("collinear", 128, seed=12)
    want = search_reference(w, "local_hessian", g, h)
    torch.set_num_threads(threads)
    try:
        losses = torch.zeros(1, 2, dtype=torch.float64)
        got = search_windowed(w, "local_hessian", g, h, losses)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(1)
    assert torch.equal(got, want)
    assert torch.allclose(losses, reference_losses(w, g, got, h), rtol=1e-12, atol=0)
    threads_seen = {t for t, _ in seen}
    assert 1 < len(threads_seen) <= min(threads, wd._MAX_WORKERS) and threading.get_ident() not in threads_seen, seen
    assert {n for _, n in seen} == {1}, seen  # one intra-op thread in every worker
