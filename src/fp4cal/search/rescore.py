"""The float64 pass of the exact local-Hessian search: the blocks the sweep recorded, decided as the reference decides.

The sweep (sweep_rows.py, 'Exact picks') records each block whose fp32 order may be wrong: mode 1 when only its
best and its runner-up r1 can truly win, mode 2 when three or more candidates can. This kernel recomputes those
candidates' losses dw^T H dw in float64 from the block's fp32 Hessian, with the same fp32 errors dw as the sweep
and the reference (reference.block_loss), and keeps the smallest, ties to the smaller candidate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.search.kernel_common import FP8_TOP, N_CAND, _errors, _round_signed


@triton.jit
def _halves(x):
    """[BR, 2n] -> (even columns, odd columns), each [BR, n]."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _cols4(x):
    """[BR, 4] -> (x[:, 0], .., x[:, 3]), each [BR]."""
    ev, od = _halves(x)
    e0, e1 = tl.split(ev)
    o0, o1 = tl.split(od)
    return e0, o0, e1, o1


@triton.jit
def _cols16(x):
    """[BR, 16] -> the 16-tuple of its columns, each [BR] (one value per lane: what a lane's own row holds)."""
    ev, od = _halves(x)
    ee, eo = _halves(ev)  # columns 0, 4, 8, 12 and 2, 6, 10, 14
    oe, oo = _halves(od)  # columns 1, 5, 9, 13 and 3, 7, 11, 15
    c0 = _cols4(ee)
    c2 = _cols4(eo)
    c1 = _cols4(oe)
    c3 = _cols4(oo)
    out = ()
    for q in tl.static_range(4):
        out = out + (c0[q], c1[q], c2[q], c3[q])
    return out


@triton.jit
def _row16(p, ok):
    """The 16 consecutive fp32 values at p [BR] of each lane (one tensor load of [BR, 16]), as a 16-tuple of [BR]."""
    return _cols16(tl.load(p[:, None] + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0.0).to(tl.float32))


@triton.jit
def _fold_h(hb, ok):
    """Each lane's 16 x 16 fp32 H at hb [BR] (row-major), for _quad64_up: (diag, up, asym). diag: the 16 H_ii; up:
    the 120 H_ik, i < k, row-major (entry 15 i - i (i - 1) / 2 + k - i - 1); asym [BR]: true where some
    H_ik != H_ki, where d^T H d is not sum_i d_i (H_ii d_i + 2 sum_k>i H_ik d_k). One [BR, 16] load per row (few
    memory operations: Triton's coalescing pass costs about their number x the kernel's size squared)."""
    diag = ()
    up = ()
    asym = tl.zeros(ok.shape, tl.int1)
    for i in tl.static_range(16):
        row = _row16(hb + 16 * i, ok)  # row i: H_ik, k < i, checked against the earlier rows' H_ki, then dropped
        for k in tl.static_range(i):
            asym = asym | (row[k] != up[15 * k - (k * (k - 1)) // 2 + i - k - 1])
        diag = diag + (row[i],)
        for k in tl.static_range(i + 1, 16):
            up = up + (row[k],)
    return diag, up, asym


@triton.jit
def _quad64_up(d, diag, up, one):
    """float64 d^T H d = sum_i d_i (H_ii d_i + 2 sum_k>i H_ik d_k) from _fold_h's diag and up (H symmetric); d:
    16-tuple of [BR] float64. fp32 x fp32 products are exact in float64; the sums round (the reference's einsum
    rounds too, in another order). one: fp32 1.0 that the compiler cannot see is loop-invariant, multiplied into
    each H value before its conversion (exact) so that the conversion stays in the candidate loop: hoisted out
    (LLVM does that to loop-invariant code), 136 float64 values would not fit in registers and spill."""
    loss = tl.zeros(d[0].shape, tl.float64)
    for i in tl.static_range(16):
        y = tl.zeros(d[0].shape, tl.float64)
        for k in tl.static_range(i + 1, 16):
            y = tl.fma((up[15 * i - (i * (i - 1)) // 2 + k - i - 1] * one).to(tl.float64), d[k], y)
        loss = tl.fma(d[i], tl.fma((diag[i] * one).to(tl.float64), d[i], 2.0 * y), loss)
    return loss


@triton.jit
def _quad64_any(w2, wrow, stride_wc, s, r, hb, ok):
    """float64 d^T H d of the errors of w2 [BR, 16] (fp32, each lane's block, read from wrow [BR]) at scales s, r
    [BR], with each block's H read from memory in [BR, 4, 16] slices of 4 rows (any H: for the steps where _fold_h
    found a block whose H is not symmetric). Few operations: small code, and quick under the interpreter."""
    kk = tl.arange(0, 16)
    q4 = tl.arange(0, 4)
    d = (w2 - _round_signed(w2, s[:, None], r[:, None])).to(tl.float64)  # the same fp32 errors as _errors
    loss = tl.zeros(ok.shape, tl.float64)
    for q in range(4):
        h = tl.load(hb[:, None, None] + (4 * q + q4)[None, :, None] * 16 + kk[None, None, :],
                    mask=ok[:, None, None], other=0.0)
        hd = tl.sum(h.to(tl.float64) * d[:, None, :], axis=2)  # rows 4 q .. 4 q + 3 of H d
        wq = tl.load(wrow[:, None] + (4 * q + q4)[None, :] * stride_wc, mask=ok[:, None], other=0.0).to(tl.float32)
        dq = (wq - _round_signed(wq, s[:, None], r[:, None])).to(tl.float64)
        loss += tl.sum(hd * dq, axis=1)
    return loss


@triton.jit
def _walk64(w2, wrow, stride_wc, w, diag, up, hb, ok, s_row, r_row, full, n_try, c_lo, c_hi, best_old, r1,
            SYM: tl.constexpr):
    """(float64 best loss, its candidate, best_old's float64 loss) per lane over n_try candidates: (full) the window
    c_lo.. c_hi, or the pair (best_old, r1) in increasing order; '<', so ties keep the smaller candidate. w2: the
    lanes' weights [BR, 16], w: the same as a 16-tuple. SYM: every block's H is symmetric, the loss is
    _quad64_up's from the values held in registers; else _quad64_any's from memory (a loop of its own, so that the
    fast one's registers are not shared with it)."""
    best = tl.full(ok.shape, float("inf"), tl.float64)
    best_idx = best_old
    l_old = tl.zeros(ok.shape, tl.float64)
    for t in range(n_try):
        c = tl.where(full, tl.minimum(c_lo + t, c_hi), tl.where(t == 0, tl.minimum(best_old, r1),
                                                                 tl.maximum(best_old, r1)))
        s = tl.load(s_row + c, mask=ok, other=1.0)
        r = tl.load(r_row + c, mask=ok, other=1.0)
        if SYM:
            d32 = _errors(w, s, r)  # the sweep's fp32 errors, bit for bit (contraction is off at launch)
            d = ()
            for k in tl.static_range(16):
                d = d + (d32[k].to(tl.float64),)
            # s >= 0, so its sign bit is 0: a 1.0 the compiler cannot hoist (_quad64_up)
            one = ((s.to(tl.int32, bitcast=True) >> 31) | 0x3F800000).to(tl.float32, bitcast=True)
            loss = _quad64_up(d, diag, up, one)
        else:
            loss = _quad64_any(w2, wrow, stride_wc, s, r, hb, ok)
        better = ok & (loss < best)
        best = tl.where(better, loss, best)
        best_idx = tl.where(better, c, best_idx)
        l_old = tl.where(ok & (c == best_old), loss, l_old)
    return best, best_idx, l_old


@triton.jit
def _rescore_kernel(w_ptr, g_ptr, v_ptr, s_tab_ptr, r_tab_ptr, h_ptr, cnt_ptr, list_ptr, cap, out_ptr, loss_ptr, cout,
                    nb, stride_we, stride_wr, stride_wc, stride_fe, stride_oe, BR: tl.constexpr, LOSSES: tl.constexpr):
    """The float64 decision of the blocks the local-Hessian sweep recorded (EXACT; module docstring, 'Exact
    picks'), BR of them per step (one per lane), the programs striding over each list (whose lengths only the
    device knows): mode 1 (list entries 0, 1, ...), the float64 losses of best and r1, the smaller index first;
    mode 2 (entries cap - 1, cap - 2, ...), every candidate of the window [lo, hi] the block walked, in order
    (those outside it have true losses above the best's: the bounds that skipped them). Strict '<' in increasing
    candidate order, so exact ties keep the smaller candidate as the reference does (a lane whose window is
    shorter than its step's longest re-tries hi: no change). A changed pick rewrites the block's amax, and (LOSSES)
    moves the tensor's chosen-scale loss by the float64 difference.

    One block per lane, as in the sweep: its weights and its H are loaded once and held in registers, H as the 136
    fp32 values of its upper triangle (_fold_h), for all its candidates; each candidate then costs 16 roundings,
    152 conversions to float64 and 152 float64 FMAs (_quad64_up), on registers (the rounding that used to extract
    each error from a [BR, 16] tensor per row of H, and the shuffles of tensor reductions, are gone). A step with a
    block whose H is not symmetric reads H from memory per candidate instead (_quad64_any, exact for any H). The
    two modes share one copy of the code (a runtime loop over the lists): compile time grows with the code's size
    (Triton's coalescing pass: about the memory operations x the kernel's size squared; 300 memory operations in
    a first version of this kernel took minutes)."""
    n1 = tl.load(cnt_ptr)
    n2 = tl.load(cnt_ptr + 1)
    for mode in range(1, 3):
        full = mode == 2
        n = tl.where(full, n2, n1)
        first = tl.where(full, cap - 1, 0)
        step = tl.where(full, -1, 1)
        for base in range(tl.program_id(0) * BR, n, tl.num_programs(0) * BR):
            i = base + tl.arange(0, BR)
            ok = i < n
            at = first + step * i
            blk = tl.load(list_ptr + 2 * at, mask=ok, other=0).to(tl.int64)
            rec = tl.load(list_ptr + 2 * at + 1, mask=ok, other=0)
            j = blk % nb
            row = (blk // nb) % cout
            e = blk // nb // cout
            wrow = w_ptr + e * stride_we + row * stride_wr + j * 16 * stride_wc
            w2 = tl.load(wrow[:, None] + tl.arange(0, 16)[None, :] * stride_wc, mask=ok[:, None],
                         other=0.0).to(tl.float32)
            w = _cols16(w2)
            hb = h_ptr + e * stride_fe + j * 256
            diag, up, asym = _fold_h(hb, ok)
            best_old = rec & 127
            r1 = (rec >> 7) & 127
            c_lo = (rec >> 14) & 127
            c_hi = (rec >> 21) & 127
            n_try = tl.where(full, tl.max(tl.where(ok, c_hi - c_lo + 1, 0)), 2)
            if tl.sum((asym & ok).to(tl.int32)) == 0:
                best, best_idx, l_old = _walk64(w2, wrow, stride_wc, w, diag, up, hb, ok, s_tab_ptr + e * N_CAND,
                                                r_tab_ptr + e * N_CAND, full, n_try, c_lo, c_hi, best_old, r1, True)
            else:
                best, best_idx, l_old = _walk64(w2, wrow, stride_wc, w, diag, up, hb, ok, s_tab_ptr + e * N_CAND,
                                                r_tab_ptr + e * N_CAND, full, n_try, c_lo, c_hi, best_old, r1, False)
            changed = ok & (best_idx != best_old)
            g = tl.load(g_ptr + e, mask=ok, other=0.0)
            amax = ((g.to(tl.float64) * tl.load(v_ptr + best_idx).to(tl.float64)) / FP8_TOP).to(tl.float32)
            tl.store(out_ptr + e * stride_oe + row * nb + j, amax, mask=changed)
            if LOSSES:
                tl.atomic_add(loss_ptr + e * 2 + 1, best - l_old, mask=changed)
