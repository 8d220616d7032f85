"""Reference scale search (max / mse / local_hessian) against the float64 brute force of the oracle (``nv``).

The brute force evaluates all 126 candidates for every block with the oracle's own fp32 quantizer and keeps
the first minimum (ties -> the smaller candidate). Results must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp4cal.search.reference as reference
from fp4cal import fake_quantize, scale_candidates, search_scales

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Loss comparisons between two argmins evaluated by the oracle: the reference sums in another order, so two
# losses equal in exact arithmetic may differ by float64 rounding (~1e-16 relative), never more.
RTOL = 1e-12


def _weight(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 1.5) * scale
    return w.to(dtype)


def _hessian(cin, seed, lead=()):
    """Random SPD per-block Hessians X^T X / n, with uneven channel scales and correlated channels."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    mix = torch.randn(*lead, cin, cin, generator=g) * 0.3 + torch.eye(cin)
    x = torch.randn(*lead, n, cin, generator=g) @ mix * torch.exp(torch.randn(*lead, 1, cin, generator=g))
    xb = x.reshape(*lead, n, cin // 16, 16).transpose(-3, -2)  # [..., nb, n, 16]
    return (xb.transpose(-1, -2) @ xb) / n


def _assert_same(got: torch.Tensor, want: np.ndarray):
    assert got.dtype == torch.float32
    want_t = torch.from_numpy(np.array(want, dtype=np.float32))
    assert got.shape == want_t.shape
    if not torch.equal(got, want_t):
        bad = (got != want_t).nonzero()[:5].tolist()
        raise AssertionError(f"{int((got != want_t).sum())} blocks differ; first: "
                             f"{[(i, got[tuple(i)].item(), want_t[tuple(i)].item()) for i in bad]}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["max", "mse", "local_hessian"])
def test_search_matches_brute_force(nv, method, dtype):
    w = _weight((8, 64), seed=1, dtype=dtype)
    h = _hessian(64, seed=2) if method == "local_hessian" else None
    got = search_scales(w, method, hessian=h, backend="reference")
    _assert_same(got, nv.brute_force_search(w, method, None, h))
    assert torch.equal(search_scales(w, method, hessian=h), got)  # default on CPU: the torch path
    # Applying the result quantizes each block with exactly the scale the search evaluated.
    _assert_same(fake_quantize(w, got, dtype=torch.float32), nv.fake_quantize(w, got))


@pytest.mark.parametrize("method", ["mse", "local_hessian"])
def test_search_with_given_global_amax(nv, method):
    w = _weight((6, 32), seed=3)
    h = _hessian(32, seed=4)
    gmax = float(w.abs().max())
    for g in [gmax * 0.4, gmax * 3.0, 1.0]:  # below the true amax: large blocks saturate
        got = search_scales(w, method, hessian=h, global_amax=g)
        _assert_same(got, nv.brute_force_search(w, method, g, h))


def test_search_chunked_rows_match(nv, monkeypatch):
    """Force one row per chunk: the running best must not leak between chunks."""
    w = _weight((5, 48), seed=5)
    h = _hessian(48, seed=6)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 1)
    for method in ("mse", "local_hessian"):
        _assert_same(search_scales(w, method, hessian=h), nv.brute_force_search(w, method, None, h))


def test_hessian_dtypes(nv):
    w = _weight((4, 32), seed=7)
    h = _hessian(32, seed=8)
    for hd in (torch.float64, torch.float16, torch.bfloat16):
        hh = h.to(hd)
        _assert_same(search_scales(w, "local_hessian", hessian=hh), nv.brute_force_search(w, "local_hessian", None,
                                                                                           hh))


def test_identity_hessian_picks_what_mse_picks():
    for seed in range(3):
        w = _weight((16, 64), seed=10 + seed)
        eye = torch.eye(16).expand(4, 16, 16).contiguous()
        assert torch.equal(search_scales(w, "local_hessian", hessian=eye), search_scales(w, "mse"))
        assert torch.equal(search_scales(w, "local_hessian", hessian=eye * 3.5), search_scales(w, "mse"))


def test_loss_ordering(nv):
    """local_hessian minimizes the Hessian-weighted loss, mse the plain one; max is one of the candidates."""
    w = _weight((16, 64), seed=20)
    h = _hessian(64, seed=21)
    a = {m: search_scales(w, m, hessian=h if m == "local_hessian" else None) for m in ("max", "mse", "local_hessian")}
    hl = {m: nv.weighted_loss(w, a[m], None, h) for m in a}
    pl = {m: nv.weighted_loss(w, a[m], None, None) for m in a}
    assert np.all(hl["local_hessian"] <= hl["mse"] * (1 + RTOL))
    assert np.all(hl["local_hessian"] <= hl["max"] * (1 + RTOL))
    assert np.all(pl["mse"] <= pl["max"] * (1 + RTOL))
    # ... and the searches do real work on this data: strictly better in total
    assert hl["local_hessian"].sum() < hl["mse"].sum() < hl["max"].sum()
    assert pl["mse"].sum() < pl["local_hessian"].sum()
    # the objective values of the chosen candidates are the minima over all 126 (brute force)
    brute_h = nv.block_losses(nv.to_np32(w), float(w.abs().max()), h.double().numpy()).min(0)
    np.testing.assert_allclose(hl["local_hessian"], brute_h, rtol=RTOL, atol=0)


def test_ties_go_to_the_smaller_candidate(nv):
    """Exact ties: zero blocks (every candidate loses 0) and a single value every scale in {v : 3/v in E2M1}
    represents exactly; an all-zero Hessian makes every candidate tie."""
    w = torch.zeros(3, 32)
    w[0, 0] = 2688.0  # global amax 2688: s_g = 1, candidate c has block scale v_c
    w[1, 0] = 3.0  # exact with v in {0.5, 0.75, 1, 1.5, 2, 3, 6}: smallest is 0.5 -> block amax 3
    w[2, 17] = -3.0
    cands = scale_candidates(2688.0)
    smallest = cands[0].item()
    assert smallest == nv.candidate_amax(2688.0)[0] == 2688.0 * 2.0**-9 / 448
    for method, h in (("mse", None), ("local_hessian", _hessian(32, seed=30))):
        got = search_scales(w, method, hessian=h)
        assert got[1, 0].item() == 3.0 and got[2, 1].item() == 3.0
        assert got[0, 1].item() == smallest and got[1, 1].item() == smallest  # zero blocks
        _assert_same(got, nv.brute_force_search(w, method, None, h))
    # an all-zero Hessian carries no information: every block falls back to the mse pick (issue 16), instead of
    # every candidate tying and the smallest (all weights -> 0) winning
    w31 = _weight((4, 32), seed=31)
    for backend in ("reference", "torch"):
        got = search_scales(w31, "local_hessian", hessian=torch.zeros(2, 16, 16), backend=backend)
        assert torch.equal(got, search_scales(w31, "mse", backend="reference"))
        assert not torch.all(got == scale_candidates(float(w31.abs().max()))[0])
    assert torch.equal(search_scales(torch.zeros(2, 32), "mse"), torch.zeros(2, 2))  # g = 0: all candidates 0


@pytest.mark.parametrize("method", ["mse", "local_hessian"])
def test_expert_stack(nv, method):
    w = _weight((3, 6, 32), seed=40)
    w[1] *= 50.0
    h = _hessian(32, seed=41, lead=(3,))
    assert h.shape == (3, 2, 16, 16)
    g = torch.tensor([float(w[0].abs().max()), float(w[1].abs().max()) * 0.5, 10.0])
    hh = h if method == "local_hessian" else None
    got = search_scales(w, method, hessian=hh, global_amax=g)
    assert got.shape == (3, 6, 2)
    _assert_same(got, nv.brute_force_search(w, method, g, hh))
    for e in range(3):  # each expert as its own 2-D problem
        he = None if hh is None else hh[e]
        assert torch.equal(got[e], search_scales(w[e], method, hessian=he, global_amax=g[e]))
    _assert_same(search_scales(w, method, hessian=hh), nv.brute_force_search(w, method, None, hh))
    if method == "local_hessian":  # one Hessian shared by all experts
        _assert_same(search_scales(w, method, hessian=h[0]), nv.brute_force_search(w, method, None, h[0]))


def test_max_is_block_amax_for_stacks():
    w = _weight((2, 3, 48), seed=50, dtype=torch.bfloat16)
    got = search_scales(w, "max")
    assert torch.equal(got, w.float().abs().reshape(2, 3, 3, 16).amax(-1))
