"""The sweep's box bound (sweep_rows._box_bound) against brute force: at every test scale s_c it must be at most the
float64 loss of every candidate at or below c, since it ends a block's downward walk there (sweep_rows.py, 'The box
bound'). Triton interpreter on CPU, the compiled kernel on a GPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fp4cal.numerics import global_scale
from fp4cal.search import kernels
from fp4cal.search.hessian_blocks import with_fallback
from fp4cal.search.kernel_common import RANK_RECORD
from fp4cal.search.reference import block_error, candidate_block_scales
from fp4cal.search.sweep_rows import _box_bound, _load_block, _load_tri, _row_norms
from fp4cal.validation import check_global_amax
from kernel_cases import make_hessian, make_ill_hessian, make_weight


@triton.jit
def _box_probe(w_ptr, f_ptr, rank_ptr, rd_ptr, s_ptr, out_ptr, cout, cin, n_cand, c_step, BR: tl.constexpr):
    """out[c, row, j] = _box_bound of row's block j at s_c, set up as the sweep sets it up (F, its row order, sd,
    rd), for c = 0, c_step, 2 c_step, .. < n_cand; one block column per program, rows 0..BR-1."""
    j = tl.program_id(0).to(tl.int64)
    nb = cin // 16
    rows = tl.arange(0, BR).to(tl.int64)
    ok = rows < cout
    fv = _load_tri(f_ptr + j * 256)
    rp = rank_ptr + j * RANK_RECORD
    lr = tl.load(rp)
    w, _ = _load_block(w_ptr + rows * cin + j * 16, ok, 1, tl.load(rp + 1), tl.load(rp + 2), True)
    sd = _row_norms(fv)
    rd = ()
    for k in tl.static_range(16):
        rd = rd + (tl.load(rd_ptr + j * 16 + k),)
    for c in range(0, n_cand, c_step):
        s = tl.zeros([BR], tl.float32) + tl.load(s_ptr + c)
        b = _box_bound(w, s, fv, sd, rd, lr)
        tl.store(out_ptr + (c * cout + rows) * nb + j, b, mask=ok)


@pytest.mark.parametrize("hkind", ["collinear", "rank8", "rank2", "rank1", "psd"])
def test_box_bound_below_every_lower_candidate(hkind, device_for_kernels):
    dev = device_for_kernels
    cout, cin = 32, 64 if dev == "cuda" else 32
    c_step = 1 if dev == "cuda" else 2  # every scale on a GPU, every other one in the interpreter (CI's time)
    w, g = make_weight("outliers", cout, cin, torch.float32, seed=7)
    g = check_global_amax(g, w)
    h = make_ill_hessian(hkind, cin, seed=3) if hkind != "psd" else make_hessian("psd", cin, seed=3)
    hc, f, mu, nu, rd, rank, status = kernels.prepare_factor(h.to(dev))
    s = candidate_block_scales(global_scale(g))
    n_cand = s.numel()
    out = torch.full((n_cand, cout, cin // 16), -float("inf"), dtype=torch.float32, device=dev)  # -inf: not probed
    _box_probe[(cin // 16,)](w.to(dev), f, rank, rd, s.to(dev), out, cout, cin, n_cand, c_step, BR=32)
    bound = out.cpu().double()

    nb = cin // 16
    wb = w.reshape(cout, nb, 16)
    hd = with_fallback(h).double()
    loss = torch.stack([
        (torch.einsum("rnk,nkl->rnl", d, hd) * d).sum(-1)
        for d in (block_error(wb, s[c].expand(cout, nb)).double() for c in range(n_cand))
    ])  # [n_cand, rows, nb], float64 from the fp32 H, as the reference scores
    below_min = torch.cummin(loss, 0).values  # min over c' <= c
    over = bound > below_min
    assert not bool(over.any()), (
        f"{hkind}: the box bound exceeds a lower candidate's float64 loss at {int(over.sum())} (row, block, c); "
        f"worst ratio {float((bound / below_min.clamp_min(1e-300))[over].max()):.6g}")

    # the bound is not vacuous: on nearly every block whose best candidate has an octave of candidates below it, some
    # scale's bound exceeds the block's best loss (where it ends the block's downward walk)
    best, best_idx = loss.min(0)
    room = best_idx >= 8
    ends = (bound > best).any(0) & room
    probed = int((bound > -float("inf")).sum())
    print(f"{hkind}: bound > 0 at {int((bound > 0).sum())} of {probed} (block, scale) probed, above the best at some "
          f"scale on {int(ends.sum())} of {int(room.sum())} blocks with room; rank record {rank[:, 0].tolist()}")
    assert int(room.sum()) > 0 and int(ends.sum()) >= 0.9 * int(room.sum()), hkind
