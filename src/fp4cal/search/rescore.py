"""The float64 pass of the exact local-Hessian search: the blocks the sweep recorded, decided as the reference decides.

The sweep (sweep_rows.py, 'Exact picks') records each block whose fp32 order may be wrong: mode 1 when only its
best and its runner-up r1 can truly win, mode 2 when three or more candidates can. This kernel recomputes those
candidates' losses dw^T H dw in float64 from the block's fp32 Hessian, with the same fp32 errors dw as the sweep
and the reference (reference.block_loss), and keeps the smallest, ties to the smaller candidate.

fp32 filter (mode 2, symmetric H). A float64 candidate costs several fp32 ones on Hopper (152 conversions to
float64 at 16 a clock and SM), and a mode-2 block's window holds ~80 candidates, of which a handful can win. So
the window is first evaluated in fp32, and only the candidates that a rigorous error bound cannot exclude get
float64 losses.

One block per lane, per group of lanes or per warp (mode 2). A mode-2 block takes a group of gw lanes: its
weights and H are the same in every lane of the group (broadcast loads of one address), and its window [lo, hi]
is spread over the group, member m taking the candidates lo + m, lo + m + gw, ..: ceil(window / gw) fp32 steps, a
group minimum of the upper ends, then the kept candidates in float64 gw at a time (each step the gw consecutive
candidates from the lowest kept one not yet done: member m takes the one that is m mod gw, its own), a group
argmin per step with ties to the smaller candidate, and strict '<' between steps, which come in increasing
candidate order: the reference's pick. The group size is chosen at run time from the count of mode-2 blocks
(search_triton's thresholds, per program): gw = W2 = 32 (a whole warp: ~4-6 steps per block) when few blocks are
in mode 2, where one lane per block would make the pass one lane's chain (~118 fp32 steps and the largest kept
count); gw = 1 (the sweep's layout, which mode 1 keeps) when every lane of every program has a block: the GPU is
then busy whatever the layout, and a lane per block does the least work (a warp per block loads, folds and bounds
the block's H in every lane, and runs its float64 steps with most lanes idle); gw = G2 = 8 between.

The bound. Take a candidate's fp32 errors d (16 values: exact inputs, the same bits as the float64 pass uses) and the
block's fp32 H (symmetric). L = d^T H d = sum_i d_i (H_ii d_i + 2 sum_k>i H_ik d_k) is a sum of elementary terms d_i
H_ik d_k whose absolute values sum to B = |d|^T |H| |d|. _quad32_up evaluates it so that every elementary term passes
through at most 13 roundings (its docstring counts them), each a factor (1 + delta), |delta| <= u = 2^-24 (doubling is
exact): |fl(L) - L| <= gamma_13 B, gamma_13 = 13 u / (1 - 13 u) (the standard bound for sums of products, Higham ch.
3, applied term by term). The float64 losses F (this kernel's and the reference's bmm) are within gamma_32 of
float64, below 2^-47 B, of L. So F lies within (13 u + 2^-23 u) B of fl(L), and with the rounding of fl(L) -+ m (at
most u (|fl(L)| + m), |fl(L)| <= (1 + gamma_13) B) a margin m >= 14.01 u B makes the computed lower end fl(fl(L) - m)
at most F and the upper end fl(fl(L) + m) at least F. B needs no semi-definite H: for any a_i > 0, |H_ik| <= rho a_i
a_k with rho = max_i<=k |H_ik| / (a_i a_k), hence B <= rho S^2, S = sum_i a_i |d_i|. _bound_scale takes a_i = h_i
rsqrt(h_i), h_i = max(H_ii, 2^-120), about sqrt(H_ii), which makes rho about 1 on a computed X^T X (1 up to rounding
on a rank-1 block fl(x x^T), where B = S^2) and huge on a block far from semi-definite (no filter, in effect). The
margin is m = TAU32 rho S^2 + ab, TAU32 = 16 u, with rho, S, S^2 and the products in fp32, each within a few 2^-22
relative of its value (rsqrt's error, rounding), so m >= 15.9 u B. Underflow (|d_i| <= |w_i| (1 + 2u): rounding to the
nearest level never moves further than 0 does): every fp32 result errs by at most 2^-126 beyond its relative error
even where flushed to zero, and an operand flushed to zero changes a product H_ik d_k by less than 2^-126 |d_k|; the
at most ~50 such errors per candidate, times |d_i| at most, sum below 2^-120 (1 + sum_i |w_i|)^2, which the absolute
term ab = 2^-116 (1 + sum_i |w_i|)^2 covers; S starts at S0 = 2^-60, above the at most 16 products a_i |d_i| it could
lose (2^-126 each).

The filter. A candidate is dropped only when its lower end is finite and above the smallest finite upper end of
the window's candidates evaluated so far (its group's steps up to its own, and the sweep's best first when the
group is smaller than a warp): then its float64 loss exceeds that candidate's, so it is neither the window's float64
minimum nor tied with it. Every candidate whose float64 loss equals the window's minimum is kept, and the kept
ones are re-scored in increasing order with strict '<': the pick is the one the unfiltered window gives, ties to
the smaller candidate. Non-finite fp32 values (overflow, a bound of inf or NaN) drop nothing: such an upper end
does not enter the minimum, such a lower end is not above it. The sweep's best is always kept (LOSSES needs its
float64 loss).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.search.kernel_common import FP8_TOP, N_CAND, _errors, _round_signed

# The fp32 filter's margins (module docstring, 'The bound'): relative to rho S^2 (16 u; 14.01 u needed), the floor of
# the a_i^2, the start of S, and the absolute term's factor on (1 + sum |w|)^2 (underflow)
TAU32: tl.constexpr = tl.constexpr(2.0**-20)
A_MIN2: tl.constexpr = tl.constexpr(2.0**-120)
S0: tl.constexpr = tl.constexpr(2.0**-60)
ABS_MARGIN: tl.constexpr = tl.constexpr(2.0**-116)
# Mode 2 (module docstring, 'One block per lane, per group of lanes or per warp'): a warp's lanes, the lanes of a
# group (the middle layout), and the end of the window offsets (a kept mask has 128 bits)
W2: tl.constexpr = tl.constexpr(32)
G2: tl.constexpr = tl.constexpr(8)
OFF_END: tl.constexpr = tl.constexpr(128)


@triton.jit
def _halves(x):
    """[BR, 2n] -> (even columns, odd columns), each [BR, n]."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _grp(x, gw, OP: tl.constexpr):
    """x [W2] reduced over each lane's group of gw consecutive lanes (gw at run time: 1, G2 or W2) and broadcast to
    the group's lanes; OP 0 min, 1 max, 2 sum, 3 xor sum. A branch uniform over the warp: no shuffles for one lane
    a block; both reductions (a few shuffles each) for groups, the size selecting one: the layouts share one copy
    of the code."""
    out = x
    if gw > 1:
        xs = tl.reshape(x, [W2 // G2, G2])
        if OP == 0:
            r8 = tl.min(xs, axis=1)
            r32 = tl.min(x)
        elif OP == 1:
            r8 = tl.max(xs, axis=1)
            r32 = tl.max(x)
        elif OP == 2:
            r8 = tl.sum(xs, axis=1)
            r32 = tl.sum(x)
        else:
            r8 = tl.xor_sum(xs, axis=1)
            r32 = tl.xor_sum(x)
        r8 = tl.reshape(tl.broadcast_to(r8[:, None], [W2 // G2, G2]), [W2])
        out = tl.where(gw == W2, r32, r8)
    return out


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
    16-tuple of [BR] float64. fp32 x fp32 products are exact in float64; the sums round (the reference's bmm
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
def _bound_scale(diag, hb, ok, m, gw, n_rows):
    """Per lane, the fp32 filter's scale (module docstring, 'The bound'): (a, rho). a: 16-tuple of [BR] fp32, a_i =
    h_i q_i with h_i = max(H_ii, 2^-120) and q_i = rsqrt(h_i) (any a_i > 0 serves: its accuracy does not matter,
    only that q_i is 1 / a_i to a few 2^-22; a_i >= 2^-60, q_i <= 2^60); rho [BR]: max_i q_i max_k |H_ik| q_k, the
    largest |H_ik| / (a_i a_k) to a few 2^-22 (finite or inf, never NaN; over both triangles, equal where the filter
    runs). Member m of a group of gw lanes (one block) takes the rows m + gw t, t < n_rows (16 / gw rows, at least
    one; 0 where the filter does not run and rho is not used), and the group's maximum is rho. Rows reloaded from
    H in a runtime loop (small code; hb: each lane's block, row-major): the registers' diag and up would put 2
    operations per entry into what depends on every row load of _fold_h, which Triton's coalescing pass walks once
    per memory operation (compile time)."""
    a = ()
    for i in tl.static_range(16):
        hi = tl.maximum(diag[i], A_MIN2)
        a = a + (hi * tl.rsqrt(hi),)
    kk = tl.arange(0, 16)
    qv = tl.rsqrt(tl.maximum(tl.load(hb[:, None] + 17 * kk[None, :], mask=ok[:, None], other=1.0), A_MIN2))
    rho = tl.zeros(ok.shape, tl.float32)
    for t in range(n_rows):
        ri = (m + gw * t) % 16
        row = tl.load(hb[:, None] + 16 * ri[:, None] + kk[None, :], mask=ok[:, None], other=0.0)
        qi = tl.rsqrt(tl.maximum(tl.load(hb + 17 * ri, mask=ok, other=1.0), A_MIN2))  # bit for bit qv's entry ri
        rho = tl.maximum(rho, tl.max(tl.abs(row) * qv, axis=1) * qi)
    return a, _grp(rho, gw, 1)


@triton.jit
def _abs_margin(w):
    """The fp32 filter's absolute margin for underflow (module docstring, 'The bound'): 2^-116 (1 + sum_i |w_i|)^2
    per lane; w: 16-tuple of [BR] fp32."""
    ws = tl.zeros(w[0].shape, tl.float32)
    for k in tl.static_range(16):
        ws = ws + tl.abs(w[k])
    return ABS_MARGIN * (1.0 + ws) * (1.0 + ws)


@triton.jit
def _quad32_up(d, diag, up, a):
    """(fp32 d^T H d, S) for _bound_scale's margin; d: 16-tuple of [BR] fp32 errors. The loss as _quad64_up sums
    it, in fp32 with a shallow rounding depth (module docstring, 'The bound'): y_i = sum_k>i H_ik d_k in four FMA
    chains (k - i - 1 mod 4, at most 4 long) added as (c0 + c1) + (c2 + c3) (the empty ones left out), t_i =
    fma(H_ii, d_i, 2 y_i), the loss likewise in four chains over i mod 4: at most 4 + 2 + 1 + 4 + 2 = 13 roundings
    per term. S = S0 + sum_i a_i |d_i|."""
    l0 = tl.zeros(d[0].shape, tl.float32)
    l1 = tl.zeros(d[0].shape, tl.float32)
    l2 = tl.zeros(d[0].shape, tl.float32)
    l3 = tl.zeros(d[0].shape, tl.float32)
    sw = tl.full(d[0].shape, S0, tl.float32)
    for i in tl.static_range(16):
        c0 = tl.zeros(d[0].shape, tl.float32)
        c1 = tl.zeros(d[0].shape, tl.float32)
        c2 = tl.zeros(d[0].shape, tl.float32)
        c3 = tl.zeros(d[0].shape, tl.float32)
        for k in tl.static_range(i + 1, 16):
            h = up[15 * i - (i * (i - 1)) // 2 + k - i - 1]
            if (k - i - 1) % 4 == 0:
                c0 = tl.fma(h, d[k], c0)
            elif (k - i - 1) % 4 == 1:
                c1 = tl.fma(h, d[k], c1)
            elif (k - i - 1) % 4 == 2:
                c2 = tl.fma(h, d[k], c2)
            else:
                c3 = tl.fma(h, d[k], c3)
        if i <= 11:  # 4 or more terms: all four chains
            y = (c0 + c1) + (c2 + c3)
        elif i == 12:
            y = (c0 + c1) + c2
        elif i == 13:
            y = c0 + c1
        else:
            y = c0  # row 15: no term, 0
        t = tl.fma(diag[i], d[i], 2.0 * y)
        if i % 4 == 0:
            l0 = tl.fma(d[i], t, l0)
        elif i % 4 == 1:
            l1 = tl.fma(d[i], t, l1)
        elif i % 4 == 2:
            l2 = tl.fma(d[i], t, l2)
        else:
            l3 = tl.fma(d[i], t, l3)
        sw = tl.fma(a[i], tl.abs(d[i]), sw)
    return (l0 + l1) + (l2 + l3), sw


@triton.jit
def _block_at(list_ptr, at, nb, cout, w_ptr, stride_we, stride_wr, stride_wc, h_ptr, stride_fe, ok):
    """The recorded block at list entries at (any shape): (block index, record, e, row, j, wrow, hb)."""
    blk = tl.load(list_ptr + 2 * at, mask=ok, other=0).to(tl.int64)
    rec = tl.load(list_ptr + 2 * at + 1, mask=ok, other=0)
    j = blk % nb
    row = (blk // nb) % cout
    e = blk // nb // cout
    wrow = w_ptr + e * stride_we + row * stride_wr + j * 16 * stride_wc
    hb = h_ptr + e * stride_fe + j * 256
    return blk, rec, e, row, j, wrow, hb


@triton.jit
def _slot_of(t, m, gw):
    """The slot of member m's window offsets (m + gw slot) that lies in [t, t + gw): each member of a group of gw
    lanes holds one offset of any gw consecutive ones. t >= 0, m < gw."""
    return (t - m + (gw - 1)) // gw


@triton.jit
def _pick(loss, has, c, best, best_idx, gw):
    """One step of the candidate walk: the candidates c [W2] with float64 losses loss, all above those of earlier
    steps of their block, update (best, best_idx) [W2] with strict '<' (+inf and NaN never win, as '<' against an
    initial +inf). A group of gw lanes is one block (mode 2: gw > 1, its candidates; mode 1: gw = 1, each lane its
    own block): the step's smallest loss among has in the group, ties to the smaller candidate, then '<' against
    the earlier steps (uniform over the group): the reference's strict '<' in increasing candidate order."""
    eff = tl.where(has & (loss < float("inf")), loss, float("inf"))
    low = _grp(eff, gw, 0)
    at = _grp(tl.where(eff == low, c, 1 << 30), gw, 0)
    better = low < best
    return tl.where(better, low, best), tl.where(better, at, best_idx)


@triton.jit
def _bit_at(k0, k1, k2, k3, off):
    """Whether bit off (0..127; beyond: False) of the 128-bit mask (k0 bits 0..31, .., k3 bits 96..127) is set."""
    word = off >> 5
    v = tl.where(word == 0, k0, tl.where(word == 1, k1, tl.where(word == 2, k2, k3)))
    return (word < 4) & (((v >> (off & 31)) & 1) != 0)


@triton.jit
def _lowest_from(k0, k1, k2, k3, p):
    """The lowest set bit at or above p (>= 0) of the 128-bit mask (k0 bits 0..31, .., k3 bits 96..127), OFF_END if
    none. A word's lowest bit x & -x is exact in fp32, its index the exponent (the sign bit, -2^31: 31 too)."""
    res = tl.full(p.shape, OFF_END, tl.int32)
    ks = (k0, k1, k2, k3)
    for v in tl.static_range(3, -1, -1):  # the top word first: the lowest word that has a bit wins
        sh = p - 32 * v
        x = ks[v] & tl.where(sh <= 0, -1, tl.where(sh >= 32, 0, -1 << tl.minimum(tl.maximum(sh, 0), 31)))
        low = x & (0 - x)
        idx = 32 * v + ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127
        res = tl.where(x != 0, idx, res)
    return res


@triton.jit
def _walk_sym(w, diag, up, hb, ok, m, gw, s_row, r_row, full, c_lo, c_hi, best_old, r1):
    """(best, best_idx, l_old, kept mask words, kept count, warp fp32 steps, warp float64 steps, the block's fp32
    steps, the block's float64 steps), symmetric H held in registers (w, diag, up: each lane's block, _fold_h's).
    full (mode 2): each group of gw lanes one block (gw = 1, G2 or W2), its window spread over the group's members m
    (module docstring, 'One block per lane, per group of lanes or per warp'): the fp32 filter, then the kept
    candidates in float64, gw consecutive ones a step; results uniform over the group but the mask words (4 x
    [W2]: word q bit b = candidate c_lo + 32 q + b, as search_triton's rescore_stats). Otherwise (mode 1, gw = 1)
    one block per lane, best_old and r1 in float64, the smaller first (one step if no lane's differ)."""
    a, rho = _bound_scale(diag, hb, ok, m, gw, tl.where(full, tl.maximum(16 // gw, 1), 0))
    ab = _abs_margin(w)
    rt = rho * TAU32
    n32_blk = tl.where(full, (c_hi - c_lo + gw) // gw, 0)  # windows are at most 126 long: at most 128 / gw steps
    n32 = tl.max(n32_blk)
    # The filter keeps a candidate unless its finite lower end is above the running minimum U of the finite upper
    # ends (U only falls, so a dropped candidate's is above the final one too). U starts at the sweep's best when
    # the group is smaller than a warp (one step more, U small from the start: fewer candidates kept).
    old_in = full & (best_old >= c_lo) & (best_old <= c_hi)
    u_min = tl.full(m.shape, float("inf"), tl.float32)
    k0 = tl.zeros(m.shape, tl.int32)
    k1 = tl.zeros(m.shape, tl.int32)
    k2 = tl.zeros(m.shape, tl.int32)
    k3 = tl.zeros(m.shape, tl.int32)
    n_kept = tl.zeros(m.shape, tl.int32)
    for t in range(tl.where(full & (gw < W2), -1, 0), n32):
        off = m + gw * tl.maximum(t, 0)
        c = tl.where(t < 0, best_old, c_lo + off)
        inwin = (t >= 0) & (c <= c_hi)
        cc = tl.minimum(c, c_hi)
        s = tl.load(s_row + cc)
        r = tl.load(r_row + cc)
        loss, sw = _quad32_up(_errors(w, s, r), diag, up, a)
        mg = tl.fma(rt, sw * sw, ab)
        lower = loss - mg
        upper = loss + mg
        fin = (inwin | ((t < 0) & old_in)) & (tl.abs(upper) < float("inf"))
        u_min = tl.minimum(u_min, _grp(tl.where(fin, upper, float("inf")), gw, 0))
        keep = full & inwin & ((c == best_old) | ~((lower > u_min) & (lower < float("inf"))))
        bit = tl.where(keep, 1 << (off & 31), 0)
        k0 = k0 | tl.where((off >> 5) == 0, bit, 0)
        k1 = k1 | tl.where((off >> 5) == 1, bit, 0)
        k2 = k2 | tl.where((off >> 5) == 2, bit, 0)
        k3 = k3 | tl.where((off >> 5) == 3, bit, 0)
        n_kept += keep.to(tl.int32)
    words = (_grp(k0, gw, 3), _grp(k1, gw, 3), _grp(k2, gw, 3), _grp(k3, gw, 3))  # disjoint bits: xor is or
    n_kept = _grp(n_kept, gw, 2)
    # float64: mode 2 the kept offsets t0 .. t0 + gw - 1 at a step (t0 the group's lowest kept one not done, each
    # member the one of its own), mode 1 the smaller of best_old and r1, then the larger
    c_a = tl.minimum(best_old, r1)
    c_b = tl.maximum(best_old, r1)
    n_pair = tl.max(tl.where(ok & (c_b != c_a), 2, 1))
    best = tl.full(m.shape, float("inf"), tl.float64)
    best_idx = tl.zeros(m.shape, tl.int32) + best_old
    l_old = tl.zeros(m.shape, tl.float64)
    n64 = 0
    n64_blk = tl.zeros(m.shape, tl.int32)
    t0 = _grp(_lowest_from(k0, k1, k2, k3, m * 0), gw, 0)
    while tl.where(full, tl.min(t0) < OFF_END, n64 < n_pair):
        off = m + gw * _slot_of(t0, m, gw)
        has = (full & (t0 < OFF_END) & _bit_at(k0, k1, k2, k3, off)) | (~full & ok & ((n64 == 0) | (c_b != c_a)))
        c = tl.where(has, tl.where(full, c_lo + off, tl.where(n64 == 0, c_a, c_b)), best_old)
        s = tl.load(s_row + c, mask=has, other=1.0)
        r = tl.load(r_row + c, mask=has, other=1.0)
        d32 = _errors(w, s, r)  # the sweep's fp32 errors, bit for bit (contraction is off at launch)
        d = ()
        for i in tl.static_range(16):
            d = d + (d32[i].to(tl.float64),)
        # s >= 0, so its sign bit is 0: a 1.0 the compiler cannot hoist (_quad64_up)
        one = ((s.to(tl.int32, bitcast=True) >> 31) | 0x3F800000).to(tl.float32, bitcast=True)
        loss = _quad64_up(d, diag, up, one)
        best, best_idx = _pick(loss, has, c, best, best_idx, gw)
        l_old += _grp(tl.where(has & (c == best_old), loss, 0.0), gw, 2)  # best_old: in one step, one member
        n64 += 1
        n64_blk += (t0 < OFF_END).to(tl.int32)
        t0 = _grp(_lowest_from(k0, k1, k2, k3, t0 + gw), gw, 0)
    return best, best_idx, l_old, words, n_kept, n32, n64, n32_blk, n64_blk


@triton.jit
def _walk_any(w2, wrow, stride_wc, hb, ok, m, gw, s_row, r_row, full, c_lo, c_hi, best_old, r1):
    """_walk_sym's (best, best_idx, l_old) where some lane's block has an H that is not symmetric: _quad64_any's
    float64 losses from memory, no fp32 filter; mode 2 every candidate of the window, gw a step, mode 1 best_old
    and r1, the smaller first."""
    n_try = tl.where(full, tl.max((c_hi - c_lo + gw) // gw), 2)
    best = tl.full(m.shape, float("inf"), tl.float64)
    best_idx = tl.zeros(m.shape, tl.int32) + best_old
    l_old = tl.zeros(m.shape, tl.float64)
    for t in range(n_try):
        c = tl.where(full, tl.minimum(c_lo + m + gw * t, c_hi),
                     tl.where(t == 0, tl.minimum(best_old, r1), tl.maximum(best_old, r1)))
        has = ok & (~full | (c_lo + m + gw * t <= c_hi))
        s = tl.load(s_row + c, mask=ok, other=1.0)
        r = tl.load(r_row + c, mask=ok, other=1.0)
        loss = _quad64_any(w2, wrow, stride_wc, s, r, hb, ok)
        best, best_idx = _pick(loss, has, c, best, best_idx, gw)
        l_old += _grp(tl.where(has & (c == best_old), loss, 0.0), gw, 2)
    return best, best_idx, l_old


@triton.jit
def _rescore_kernel(w_ptr, g_ptr, v_ptr, s_tab_ptr, r_tab_ptr, h_ptr, cnt_ptr, list_ptr, cap, out_ptr, loss_ptr, cout,
                    nb, stride_we, stride_wr, stride_wc, stride_fe, stride_oe, stats_ptr, group_from,
                    lanes_from, LOSSES: tl.constexpr, STATS: tl.constexpr):
    """The float64 decision of the blocks the local-Hessian sweep recorded (EXACT; module docstring, 'Exact picks'),
    the programs (one warp each) striding over each list (whose lengths only the device knows). Mode 1 (list entries
    0, 1, ...): W2 blocks a step, one per lane, the float64 losses of best and r1, the smaller index first. Mode 2
    (entries cap - 1, cap - 2, ...): a block per warp, per group of G2 lanes (from group_from blocks in mode 2) or
    per lane (from lanes_from), its window [lo, hi] spread over the block's lanes (module docstring, 'One block per
    lane, per group of lanes or per warp'): the fp32 filter, then the float64 losses of the candidates it keeps (those
    outside the window have true losses above the best's: the bounds that skipped them). Strict '<' in increasing
    candidate order, so exact ties keep the smaller candidate as the reference does. A changed pick rewrites the
    block's amax, and (LOSSES) moves the tensor's chosen-scale loss by the float64 difference. STATS: counts and
    masks of mode 2 into stats_ptr (search_triton's rescore_stats).

    A lane's block H is held in registers as the 136 fp32 values of its upper triangle (_fold_h; in mode 2 the same
    in every lane of a group), for all its candidates; each float64 candidate then costs 16 roundings, 152
    conversions to float64 and 152 float64 FMAs (_quad64_up), each fp32 one of the filter 16 roundings and 152 fp32
    FMAs, on registers. A step with a block whose H is not symmetric reads H from memory per candidate instead
    (_quad64_any, exact for any H; no filter). The two modes share one copy of the code (a runtime loop over the
    lists, the layouts chosen by runtime selects): compile time grows with the code's size (Triton's coalescing
    pass: about the memory operations x the kernel's size squared; 300 memory operations in a first version of this
    kernel took minutes)."""
    n1 = tl.load(cnt_ptr)
    n2 = tl.load(cnt_ptr + 1)
    lane = tl.arange(0, W2)
    chain = tl.zeros(lane.shape, tl.int32)  # this program's mode-2 warp steps (STATS)
    for mode in range(1, 3):
        full = mode == 2
        n = tl.where(full, n2, n1)
        first = tl.where(full, cap - 1, 0)
        step = tl.where(full, -1, 1)
        gw = tl.where(full, tl.where(n2 >= lanes_from, 1, tl.where(n2 >= group_from, G2, W2)), 1)  # lanes a block
        m = lane % gw
        per = W2 // gw  # blocks a step
        for base in range(tl.program_id(0) * per, n, tl.num_programs(0) * per):
            i = base + lane // gw
            ok = i < n
            blk, rec, e, row, j, wrow, hb = _block_at(list_ptr, first + step * i, nb, cout, w_ptr, stride_we,
                                                      stride_wr, stride_wc, h_ptr, stride_fe, ok)
            w2 = tl.load(wrow[:, None] + tl.arange(0, 16)[None, :] * stride_wc, mask=ok[:, None],
                         other=0.0).to(tl.float32)
            diag, up, asym = _fold_h(hb, ok)
            best_old = rec & 127
            r1 = (rec >> 7) & 127
            c_lo = (rec >> 14) & 127
            c_hi = (rec >> 21) & 127
            s_row = s_tab_ptr + e * N_CAND
            r_row = r_tab_ptr + e * N_CAND
            if tl.sum((asym & ok).to(tl.int32)) == 0:
                best, best_idx, l_old, words, n_kept, n32, n64, n32_blk, n64_blk = _walk_sym(
                    _cols16(w2), diag, up, hb, ok, m, gw, s_row, r_row, full, c_lo, c_hi, best_old, r1)
                if STATS:
                    one = full & ok & (m == 0)  # the lane that counts a mode-2 block
                    tl.atomic_add(stats_ptr + 0 * lane, 1, mask=one)
                    tl.atomic_add(stats_ptr + 1 + 0 * lane, c_hi - c_lo + 1, mask=one)
                    tl.atomic_add(stats_ptr + 2 + 0 * lane, n_kept, mask=one)
                    tl.atomic_add(stats_ptr + 3 + 0 * lane, n64_blk, mask=one)
                    tl.atomic_add(stats_ptr + 4 + 0 * lane, n32_blk, mask=one)
                    tl.atomic_max(stats_ptr + 6 + 0 * lane, gw, mask=one)
                    chain += tl.where(full, n32 + n64, 0)
                    at_rec = stats_ptr + 8 + 5 * blk
                    tl.store(at_rec, c_lo | (c_hi << 8), mask=one)
                    for q in tl.static_range(4):
                        tl.store(at_rec + 1 + q, words[q], mask=one)
            else:
                best, best_idx, l_old = _walk_any(w2, wrow, stride_wc, hb, ok, m, gw, s_row, r_row, full, c_lo, c_hi,
                                                  best_old, r1)
            # mode 2: a group's member 0 writes the block's result
            changed = ok & (best_idx != best_old) & (~full | (m == 0))
            g = tl.load(g_ptr + e, mask=ok, other=0.0)
            amax = ((g.to(tl.float64) * tl.load(v_ptr + best_idx).to(tl.float64)) / FP8_TOP).to(tl.float32)
            tl.store(out_ptr + e * stride_oe + row * nb + j, amax, mask=changed)
            if LOSSES:
                tl.atomic_add(loss_ptr + e * 2 + 1, best - l_old, mask=changed)
    if STATS:
        tl.atomic_max(stats_ptr + 5 + 0 * lane, chain, mask=lane == 0)
