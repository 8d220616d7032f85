"""Row sweep kernel (the default layout): each thread owns one 16-weight block.

Why: in the tile kernel (sweep_tile.py), the quadratic form goes through a tensor-core product whose operands and
results change layout (shared memory and barriers every candidate), and each block's sums are
cross-thread reductions. With one block per thread, every per-block quantity is thread-local: the
16 x 16 triangular product is 136 fp32 FMAs on registers, sums and maxima are plain arithmetic,
and a program can be as small as one warp (32 blocks), which also shrinks the wait for a tile's slowest
block.

Windows, bounds and tie rules are those of fp4cal.search.kernels' docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.search.kernel_common import _candidate, _first_at_or_below, _round_signed, _scale


@triton.jit
def _rows_loss(w, s, r, fb, HESSIAN: tl.constexpr):
    """Loss of each thread's block at scale s, r [BR]: ||F^T dw||^2 (HESSIAN) or sum dw^2; w: 16-tuple of
    [BR] fp32 (signed); fb: the block column's lower-triangular F (row-major 16 x 16, F[i, k] = 0 for i < k)."""
    d = ()
    for k in tl.static_range(16):
        d = d + (w[k] - _round_signed(w[k], s, r),)
    loss = tl.zeros(s.shape, tl.float32)
    for k in tl.static_range(16):
        if HESSIAN:
            z = d[k] * tl.load(fb + k * 17)
            for i in tl.static_range(k + 1, 16):
                z = tl.fma(d[i], tl.load(fb + i * 16 + k), z)
        else:
            z = d[k]
        loss = tl.fma(z, z, loss)
    return loss


@triton.jit
def _rows_clip_bound(w, mb, six_s, HESSIAN: tl.constexpr):
    """The clipping bound (module docstring), e_k = max(|w_k| - fp32(6 s), 0): max_k mu_k e_k^2 (HESSIAN) or
    sum_k e_k^2."""
    bound = tl.zeros(six_s.shape, tl.float32)
    for k in tl.static_range(16):
        err = tl.maximum(tl.abs(w[k]) - six_s, 0.0)
        if HESSIAN:
            bound = tl.maximum(bound, err * err * tl.load(mb + k))
        else:
            bound = tl.fma(err, err, bound)
    return bound


@triton.jit
def _rows_up_bound(w, mb, nb_, half_s):
    """max(max_k mu_k l_k^2, sum_k nu_k l_k^2), l_k = min(|w_k|, max(s / 2 - |w_k|, 0)) (upward bound)."""
    bmax = tl.zeros(half_s.shape, tl.float32)
    bsum = tl.zeros(half_s.shape, tl.float32)
    for k in tl.static_range(16):
        a = tl.abs(w[k])
        low = tl.minimum(a, tl.maximum(half_s - a, 0.0))
        low2 = low * low
        bmax = tl.maximum(bmax, low2 * tl.load(mb + k))
        bsum = bsum + low2 * tl.load(nb_ + k)
    return tl.maximum(bmax, bsum)


@triton.jit
def _sweep_rows_kernel(w_ptr, g_ptr, v_ptr, s_tab_ptr, r_tab_ptr, f_ptr, mu_ptr, nu_ptr, nohalf_ptr, out_ptr,
                       stats_ptr, cout, nb, stride_we, stride_wr, stride_wc, stride_fe, stride_oe,
                       HESSIAN: tl.constexpr, STATS: tl.constexpr, UNROLL: tl.constexpr, BR: tl.constexpr,
                       NC: tl.constexpr, FUSED: tl.constexpr):
    """One block per thread: same windows, bounds and tie rules as _sweep_kernel (with prune); FUSED as there
    (mse: candidate scales computed here, values checked here, flags in stats_ptr)."""
    pid_r = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    rows = pid_r.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    rmask = rows < cout
    wrow = w_ptr + e * stride_we + rows * stride_wr + j * 16 * stride_wc
    w = ()
    m = tl.zeros([BR], tl.float32)
    for k in tl.static_range(16):
        wk = tl.load(wrow + k * stride_wc, mask=rmask, other=0.0).to(tl.float32)
        w = w + (wk,)
        m = tl.maximum(m, tl.abs(wk))
    g = tl.load(g_ptr + e)
    if FUSED:
        sg = tl.div_rn(g, 2688.0)
        s_ptr = s_tab_ptr
        r_ptr = r_tab_ptr
        bad = tl.zeros([BR], tl.int32)
        for k in tl.static_range(16):
            bad = bad | ((w[k] != w[k]) | (tl.abs(w[k]) == float("inf"))).to(tl.int32)
        tl.atomic_max(stats_ptr, 1, mask=tl.max(bad) > 0)
        first_prog = (pid_r == 0) & (j == 0)
        tl.atomic_max(stats_ptr + 1, 1, mask=first_prog & ((g != g) | (g < 0) | (g == float("inf"))))
        tl.atomic_max(stats_ptr + 2, 1, mask=first_prog & (sg != 0) & ((sg < 8.673617379884035e-19) |
                                                                       (sg > 1.152921504606847e18)))
    else:
        sg = 1.0
        s_ptr = s_tab_ptr + e * NC
        r_ptr = r_tab_ptr + e * NC
    fb = f_ptr + e * stride_fe + j * 256
    mb = mu_ptr + e * (stride_fe // 16) + j * 16
    nb_ = nu_ptr + e * (stride_fe // 16) + j * 16
    first = _first_at_or_below(m, s_ptr, r_ptr, 3.0, NC, sg, FUSED)
    nohalf = tl.load(nohalf_ptr + tl.minimum(first, NC - 1))
    top = tl.where(first >= NC, NC - 1, tl.maximum(first - 1, nohalf))
    best = tl.full([BR], float("inf"), tl.float32)
    best_idx = tl.zeros([BR], tl.int32)

    # Phase 1: down from the MSE top until the clipping bound (at the next candidate) ends each block.
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
            cc = tl.maximum(c, 0)
            s, r = _candidate(s_ptr, r_ptr, cc, sg, FUSED)
            loss = _rows_loss(w, s, r, fb, HESSIAN)
            better = active & (loss <= best)  # descending: '<=' keeps the smaller candidate on ties
            best = tl.where(better, loss, best)
            best_idx = tl.where(better, cc, best_idx)
            c = c - 1
            if u == UNROLL - 1:
                bound = _rows_clip_bound(w, mb, 6.0 * _scale(s_ptr, tl.maximum(c, 0), sg, FUSED), HESSIAN)
                active = active & ~(bound > best * 1.0001)
            active = active & (c >= 0)
        n_active = tl.sum(active.to(tl.int32))

    # Phase 2 (local-Hessian): up from the MSE top until the upward bound ends each block or its first all-zero
    # candidate.
    if HESSIAN:
        zero_at = tl.minimum(_first_at_or_below(m, s_ptr, r_ptr, 0.25, NC), NC - 1)
        c = top + 1
        active = c <= zero_at
    else:
        zero_at = top
        active = tl.zeros([BR], tl.int1)
    n_active = tl.sum(active.to(tl.int32))
    while n_active > 0:
        it2 += UNROLL
        work += n_active * UNROLL
        for u in tl.static_range(UNROLL):
            cc = tl.minimum(c, NC - 1)
            loss = _rows_loss(w, tl.load(s_ptr + cc), tl.load(r_ptr + cc), fb, HESSIAN)
            better = active & (loss < best)  # ascending: strict '<' keeps the smaller candidate
            best = tl.where(better, loss, best)
            best_idx = tl.where(better, cc, best_idx)
            c = c + 1
            active = active & (c <= zero_at)
            if u == UNROLL - 1:
                bound = _rows_up_bound(w, mb, nb_, 0.5 * tl.load(s_ptr + tl.minimum(c, NC - 1)))
                active = active & ~(bound > best * 1.0001)
        n_active = tl.sum(active.to(tl.int32))

    v_best = tl.load(v_ptr + best_idx).to(tl.float64)
    amax = ((g.to(tl.float64) * v_best) / 448.0).to(tl.float32)
    tl.store(out_ptr + e * stride_oe + rows * nb + j, amax, mask=rmask)
    if STATS and not FUSED:
        pid = (e * tl.num_programs(1) + j) * tl.num_programs(0) + pid_r
        tl.store(stats_ptr + pid * 3, it1)
        tl.store(stats_ptr + pid * 3 + 1, it2)
        tl.store(stats_ptr + pid * 3 + 2, work)
