"""Issue 16 items of the search: zero-trace Hessian blocks fall back to the mse objective (per block, every backend,
counted), and a Hessian that is not positive semi-definite is refused with a message naming the block."""

from __future__ import annotations

import os

import pytest
import torch

import fp4cal
from fp4cal.search.hessian_blocks import PSD_RTOL, check_psd, fallback_blocks, fallback_mask
from kernel_cases import make_hessian, make_ill_hessian, make_weight

BACKENDS = ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _small():
    w, _ = make_weight("outliers", 16, 64, torch.float32, seed=21)
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_trace_blocks_use_mse_per_block(backend):
    w = _small()
    h = make_ill_hessian("deadblock", 64, seed=22)  # blocks 0 and 2 all zero, 1 and 3 informative
    assert fallback_mask(h).tolist() == [True, False, True, False]
    neg = h.clone()
    neg[0, 0, 0], neg[0, 1, 1] = 1.0, -1.0  # trace 0, not PSD: no fallback (refused, as the factor kernel does)
    assert fallback_mask(neg).tolist() == [False, False, True, False]
    got = fp4cal.search_scales(w, "local_hessian", h, backend=backend)
    mse = fp4cal.search_scales(w, "mse", backend="reference")
    hess = fp4cal.search_scales(w, "local_hessian", h, backend="reference")
    assert torch.equal(got[:, 0::2], mse[:, 0::2])  # no information: the mse pick, not the smallest candidate
    assert torch.equal(got[:, 1::2], hess[:, 1::2])
    smallest = fp4cal.scale_candidates(float(w.abs().max()))[0]
    assert not bool((got[:, 2] == smallest).all())  # what the objective alone would pick (all weights -> 0)
    assert fallback_blocks(h, cout=16) == 2 * 16


def test_fallback_count_for_stacks_and_none():
    h = torch.stack([make_ill_hessian("deadblock", 64, seed=1), make_hessian("psd", 64, seed=2)])
    assert fallback_blocks(h, cout=8) == 2 * 8
    assert fallback_blocks(None, cout=8) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["negdef", "negdiag", "indefinite"])
def test_not_psd_is_refused(case, backend):
    w = _small()
    h = make_hessian("psd", 64, seed=3)
    if case == "negdef":
        h[1] = -h[1]
    elif case == "negdiag":
        h[2, 5, 5] = -0.5 * h[2].diagonal().max()
    else:
        h[3] = h[3] - 2 * h[3].diagonal().mean() * torch.eye(16)
    with pytest.raises(ValueError, match=r"hessian block \(\d,\) .*not positive semi-definite: smallest eigenvalue -"):
        fp4cal.search_scales(w, "local_hessian", h, backend=backend)


def test_real_fp32_hessians_pass_the_psd_check():
    """Second moments accumulated in fp32 (rank-deficient ones included) pass the tolerance, in every family."""
    for kind in ("psd", "range", "lowrank", "zero", "diag"):
        check_psd(make_hessian(kind, 128, seed=5))
    for kind in ("rank1", "rank2", "rank8", "deadchan", "collinear", "deadblock"):
        check_psd(make_ill_hessian(kind, 128, seed=6))
    # and the tolerance is what it says: an eigenvalue just inside passes, one well outside fails
    h = torch.eye(16)[None].clone()
    h[0, 0, 0] = -0.5 * PSD_RTOL
    check_psd(h)
    h[0, 0, 0] = -10 * PSD_RTOL
    with pytest.raises(ValueError, match="block \\(0,\\)"):
        check_psd(h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_within_tolerance_but_negative_pivot_is_accepted(backend):
    """A block inside the PSD tolerance can still give a very negative Cholesky pivot after a tiny one (here
    lambda_min = -3e-8 of the scale, pivot 2 = -3): accepted, factored by eigendecomposition, searched."""
    w = torch.randn(8, 16) * 0.02
    h = torch.eye(16)[None].clone()
    h[0, 0, 0] = 1e-8
    h[0, 0, 1] = h[0, 1, 0] = 2e-4
    check_psd(h)
    got = fp4cal.search_scales(w, "local_hessian", h, backend=backend)
    assert got.shape == (8, 1) and bool(torch.isin(got, fp4cal.scale_candidates(float(w.abs().max()))).all())
