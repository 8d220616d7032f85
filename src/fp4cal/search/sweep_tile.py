"""Tile sweep kernel: a program sweeps BR blocks of one block column as a [BR, 16] tile; the local-Hessian
loss is a [BR, 16] @ [16, 16] tensor-core product with 3xTF32 error compensation (plain TF32 changes picks).

search_triton(layout="tile"). The default row layout (sweep_rows.py) measured faster on H100: here the
product's operands and results change layout through shared memory every candidate, and each block's sums
are cross-thread reductions (BENCHMARKS.md). Windows, bounds and tie rules: fp4cal.search.kernels' docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.search.kernel_common import _candidate, _e2m1_times_scale, _first_at_or_below, _scale


@triton.jit
def _block_loss(a, neg, s, r, f, HESSIAN: tl.constexpr, QUAD: tl.constexpr):
    """(loss [BR], q [BR, 16]) of blocks a [BR, 16] (magnitudes) at per-block scales s, r [BR]."""
    q = _e2m1_times_scale(a, s[:, None], r[:, None])
    d = a - q
    if HESSIAN:
        d = tl.where(neg, -d, d)
        z = tl.dot(d, f, input_precision=QUAD)
        loss = tl.sum(z * z, axis=1)
    else:
        loss = tl.sum(d * d, axis=1)
    return loss, q


@triton.jit
def _step_down(a, neg, m, f, mu, s_ptr, r_ptr, sg, c, active, best, best_idx, HESSIAN: tl.constexpr,
               PRUNE: tl.constexpr, QUAD: tl.constexpr, BOUND: tl.constexpr, FUSED: tl.constexpr):
    """Try candidate c (per block) and move down one; a block whose clipping bound exceeds its best stops."""
    cc = tl.maximum(c, 0)
    s, r = _candidate(s_ptr, r_ptr, cc, sg, FUSED)
    loss, q = _block_loss(a, neg, s, r, f, HESSIAN, QUAD)
    better = active & (loss <= best)  # descending c: '<=' keeps the smaller candidate on ties
    best = tl.where(better, loss, best)
    best_idx = tl.where(better, cc, best_idx)
    c = c - 1
    if PRUNE and BOUND:  # the bound holds for every smaller candidate, so checking it on some steps only is safe
        # at the next candidate c (and below): a >= 6 s clips, q = fp32(6 s) exactly, so the error is written
        # without q, which lets the compiler compute it in the reduction's layout without redoing the rounding
        six_s = 6.0 * _scale(s_ptr, tl.maximum(c, 0), sg, FUSED)[:, None]
        err = tl.where(a >= six_s, a - six_s, 0.0)
        if HESSIAN:
            bound = tl.max(err * err * mu, axis=1)
        else:
            bound = tl.sum(err * err, axis=1)
        active = active & ~(bound > best * 1.0001)
    return best, best_idx, active & (c >= 0), c


@triton.jit
def _step_up(a, neg, f, mu, nu, s_ptr, r_ptr, c, active, best, best_idx, zero_at, NC: tl.constexpr,
             QUAD: tl.constexpr, BOUND: tl.constexpr):
    """Try candidate c (per block) and move up one; a block whose upward bound exceeds its best, or that has
    tried its first all-zero candidate, stops."""
    cc = tl.minimum(c, NC - 1)
    s, r = _candidate(s_ptr, r_ptr, cc, 1.0, False)
    loss, q = _block_loss(a, neg, s, r, f, True, QUAD)
    better = active & (loss < best)  # ascending c: strict '<' keeps the smaller candidate
    best = tl.where(better, loss, best)
    best_idx = tl.where(better, cc, best_idx)
    c = c + 1
    active = active & (c <= zero_at)
    if BOUND:  # the bound holds for every candidate from the next one up: checking on some steps only is safe
        # every error from candidate c up is at least min(a, s_c / 2 - a) (module docstring), written without
        # the rounding (see _step_down)
        half = 0.5 * tl.load(s_ptr + tl.minimum(c, NC - 1))[:, None]
        low = tl.minimum(a, tl.maximum(half - a, 0.0))
        low2 = low * low
        bound = tl.maximum(tl.max(low2 * mu, axis=1), tl.sum(low2 * nu, axis=1))
        active = active & ~(bound > best * 1.0001)
    return best, best_idx, active, c


@triton.jit
def _sweep_kernel(
    w_ptr,
    g_ptr,
    v_ptr,
    s_tab_ptr,
    r_tab_ptr,
    f_ptr,
    mu_ptr,
    nu_ptr,
    nohalf_ptr,
    out_ptr,
    stats_ptr,
    cout,
    nb,
    stride_we,
    stride_wr,
    stride_wc,
    stride_fe,
    stride_oe,
    HESSIAN: tl.constexpr,
    PRUNE: tl.constexpr,
    QUAD: tl.constexpr,
    STATS: tl.constexpr,
    UNROLL: tl.constexpr,
    SPARSE_BOUND: tl.constexpr,
    BR: tl.constexpr,
    NC: tl.constexpr,
    FUSED: tl.constexpr = False,
):
    pid_r = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    rows = pid_r.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.arange(0, 16)
    rmask = rows < cout
    w_off = e * stride_we + rows[:, None] * stride_wr + (j * 16 + cols[None, :]) * stride_wc
    w = tl.load(w_ptr + w_off, mask=rmask[:, None], other=0.0).to(tl.float32)
    a = tl.abs(w)
    neg = w < 0
    m = tl.max(a, axis=1)
    g = tl.load(g_ptr + e)
    if FUSED:  # one launch for small MSE calls: scales computed here from v (s_tab_ptr), values checked here
        sg = tl.div_rn(g, 2688.0)
        s_ptr = s_tab_ptr
        r_ptr = r_tab_ptr
        bad = (w != w) | (tl.abs(w) == float("inf"))
        tl.atomic_max(stats_ptr, 1, mask=tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0)
        first_prog = (pid_r == 0) & (j == 0)
        tl.atomic_max(stats_ptr + 1, 1, mask=first_prog & ((g != g) | (g < 0) | (g == float("inf"))))
        tl.atomic_max(stats_ptr + 2, 1, mask=first_prog & (sg != 0) & ((sg < 8.673617379884035e-19) |
                                                                       (sg > 1.152921504606847e18)))
    else:
        sg = 1.0
        s_ptr = s_tab_ptr + e * NC  # this tensor's candidate tables
        r_ptr = r_tab_ptr + e * NC
    if HESSIAN:
        f = tl.load(f_ptr + e * stride_fe + j * 256 + cols[:, None] * 16 + cols[None, :])
        mu = tl.load(mu_ptr + e * (stride_fe // 16) + j * 16 + cols)[None, :]
        nu = tl.load(nu_ptr + e * (stride_fe // 16) + j * 16 + cols)[None, :]
    else:
        f = tl.zeros([16, 16], tl.float32)
        mu = tl.full([1, 16], 1.0, tl.float32)
        nu = mu
    if PRUNE:
        first = _first_at_or_below(m, s_ptr, r_ptr, 3.0, NC, sg, FUSED)
        nohalf = tl.load(nohalf_ptr + tl.minimum(first, NC - 1))
        top = tl.where(first >= NC, NC - 1, tl.maximum(first - 1, nohalf))
    else:
        top = tl.full(m.shape, NC - 1, tl.int32)
    best = tl.full(m.shape, float("inf"), tl.float32)
    best_idx = tl.zeros(m.shape, tl.int32)

    # Phase 1: from the top down, until the clipping bound ends each block. The tile-wide "any block still
    # active?" test is a block-wide reduction, so it runs once every UNROLL candidates.
    c = top
    active = c >= 0
    n_active = tl.sum(active.to(tl.int32))
    it1 = 0
    it2 = 0
    work = 0
    while n_active > 0:
        it1 += UNROLL
        work += n_active * UNROLL
        for u in tl.static_range(UNROLL):
            best, best_idx, active, c = _step_down(a, neg, m, f, mu, s_ptr, r_ptr, sg, c, active, best, best_idx,
                                                   HESSIAN, PRUNE, QUAD, (u == UNROLL - 1) or not SPARSE_BOUND,
                                                   FUSED)
        n_active = tl.sum(active.to(tl.int32))

    # Phase 2 (local-Hessian only): from the MSE top up, until the zeroed-weight bound ends each block
    # or the first all-zero candidate has been tried.
    if HESSIAN and PRUNE:
        zero_at = tl.minimum(_first_at_or_below(m, s_ptr, r_ptr, 0.25, NC), NC - 1)
        c = top + 1
        active = c <= zero_at
        n_active = tl.sum(active.to(tl.int32))
        while n_active > 0:
            it2 += UNROLL
            work += n_active * UNROLL
            for u in tl.static_range(UNROLL):
                best, best_idx, active, c = _step_up(a, neg, f, mu, nu, s_ptr, r_ptr, c, active, best, best_idx,
                                                     zero_at, NC, QUAD, (u == UNROLL - 1) or not SPARSE_BOUND)
            n_active = tl.sum(active.to(tl.int32))

    # The chosen amax, fp32(g * v / 448) rounded once from float64 as in numerics.scale_candidates.
    v_best = tl.load(v_ptr + best_idx).to(tl.float64)
    amax = ((g.to(tl.float64) * v_best) / 448.0).to(tl.float32)  # float64 '/' is IEEE division
    tl.store(out_ptr + e * stride_oe + rows * nb + j, amax, mask=rmask)
    if STATS and not FUSED:  # per program: phase-1 and phase-2 iterations, block-candidates actually needed
        pid = (e * tl.num_programs(1) + j) * tl.num_programs(0) + pid_r
        tl.store(stats_ptr + pid * 3, it1)
        tl.store(stats_ptr + pid * 3 + 1, it2)
        tl.store(stats_ptr + pid * 3 + 2, work)
