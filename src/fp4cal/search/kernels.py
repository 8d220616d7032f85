"""Fused Triton kernels for the MSE and local-Hessian scale searches.

Same objective as ``reference.py``, for every 16-weight block of row r and block column j:

    s_g  = fp32(g / 2688),   s_c = fp32(v_c * s_g)       c = 0..125, v_c the finite positive FP8-E4M3 values
    x    = fp32(|w| / s_c)                               exact IEEE quotient (see below)
    q    = fp32(E2M1(x) * s_c),  dw = sign(w) * fp32(|w| - q)
    mse:            loss_c = sum_k dw_k^2
    local_hessian:  loss_c = dw^T H_j dw = || F_j^T dw ||^2      with H_j = F_j F_j^T
    pick            argmin_c loss_c, ties to the smaller c; output fp32(g * v_c / 448)

Rounding without a division. With r_c = fp32(1 / s_c) (one IEEE division per tensor and candidate, in a
small table kernel), Markstein's correction gives the exact quotient in three FMA-pipe ops:

    x0 = fp32(|w| * r_c);   res = fma(-x0, s_c, |w|)  (exact);   x = fma(res, r_c, x0) = fp32(|w| / s_c)

valid when nothing under- or overflows, which the wrapper guarantees by sending tensors with s_g outside
[2^-60, 2^60] to the reference. E2M1 round-to-nearest-even of x is one magic-number add: the E2M1 step
around x is 2^(E-1) with E = clamp(exponent(x), 0, 2), and fp32(fp32(x + 2^(E+22)) - 2^(E+22)) rounds x to
that step with ties to even, which is E2M1's rule; min(., 6) saturates. Floating-point contraction is
disabled at launch so that q and dw are rounded exactly as in the reference.

Candidates that cannot win are skipped, with proofs (each block walks its own contiguous window):
- MSE, top: if every x <= 3 at candidate c and v_c / 2 is also a candidate, the grid of v_c / 2 contains
  the grid of v_c on [0, 3 s_c], so every |dw| is no larger there: c is dominated by a smaller candidate.
- local-Hessian, top: from the first candidate at which every weight rounds to 0 on, all losses equal
  w^T H w, and ties go to the smaller candidate. Going up from the MSE top: at every candidate c' >= c a
  weight is quantized to 0 or to a level >= s_c' / 2 >= s_c / 2, so its error is at least
  l_i = min(|w_i|, max(s_c / 2 - |w_i|, 0)) (fp32 rounding is monotone, so this holds for the fp32 errors).
  Two lower bounds of dw^T H dw for any |dw_i| >= l_i follow: max_i mu_i l_i^2, where
  mu_i = min{dw^T H dw : dw_i = 1} = 1 / (H^-1)_ii, and sum_i nu_i l_i^2, where nu_i = lambda H_ii and
  lambda = 1 - max_i sum_{k != i} |H_ik| / sqrt(H_ii H_kk) (Gershgorin: the smallest eigenvalue of
  D^-1/2 H D^-1/2, D = diag(H), is at least lambda; nu = 0 when lambda <= 0).
- bottom: a weight that clips (|w| >= 6 s_c) has error |w| - 6 s_c, which only grows for smaller
  candidates: sum of those errors^2 (MSE) or max_i mu_i * error_i^2 (Hessian) bounds every smaller
  candidate's loss from below. A block stops when the bound exceeds its best loss (with 1e-4 slack).
  Both walks test their bound at the next candidate they would try (its s), which covers it and every
  candidate beyond.

Launches: _prep_kernel computes the candidate tables, factors the Hessian blocks and scans the values
(finite weights, g >= 0) in one launch; the host copies its flags before queuing the sweep and waits for
those alone, so a call returns while its sweep runs. Small mse calls are one launch instead: the sweep
computes its own candidate scales and checks the values (FUSED), and the host waits for it.

Where the quadratic form runs: each H_j is factored once (float64 Cholesky in _prep_kernel), so the loss is a
sum of squares ||F_j^T dw||^2, 136 fp32 FMAs per block and candidate in sweep_rows.py (one block per thread at a time;
threads of a program take new rows as their blocks finish).

Singular blocks (a live pivot at or below 1e-12 of its diagonal: rank < 16, or near-collinear channels within
fp32 rounding) are factored in the same kernel, with no eigendecomposition and no host round trip: a plain
Cholesky of a semi-definite H in the channel order is unstable (a pivot at the fp32 noise level of H divides
noise by noise), so the block is factored as H + diag(rd), rd_i = REG_DELTA H_ii (2^-14). That matrix is
definite whenever H's fp32 rounding noise is below REG_DELTA (relative to sqrt(H_ii H_kk)), its float64
Cholesky is backward stable, and the factor stays lower triangular in the channel order as the row kernel
needs. The sweep subtracts the known term: loss = ||F^T dw||^2 - sum_i rd_i dw_i^2 = dw^T H dw up to the same
fp32 rounding as a definite block (16 more FMAs, on such blocks only). mu = nu = 0 there (H is singular). If
even H + diag(rd) fails (a pivot at or below 0: an eigenvalue of H below -REG_DELTA max_i H_ii), the block gets
status 2: the host runs check_psd, which raises for a block that is not PSD, and otherwise (a block within its
tolerance) factors it by float64 eigendecomposition with rd = 0 and sweeps again (rare).

Singular blocks of rank r <= RANK_MAX_COLS (15) get a cheaper factor instead: a pivoted float64 Cholesky
stopped when the residual's entries are within RANK_EPS_REL (2^-19) of sqrt(H_ii H_kk), whose r columns G
(G G^T = H up to that residual) are lower trapezoidal with the channels in pivot order (the pivots first, then
the other channels in channel order): F stores G's rows in that order, and the rank record [rank, order, eps] tells
the sweep in which order to load a block's weights, and eps how far G G^T is from H (fp32 bits of an upper bound on
the residual's max |E_ik| / sqrt(H_ii H_kk), at most RANK_EPS_REL; about 3 u on a rank-1 fl(x x^T): the sweep's
error margin takes that, not RANK_EPS_REL: sweep_rows.py, 'Low-rank blocks'). Its product then costs the FMAs of
G's columns (by groups: 16 for rank 1, 100 for rank 8) and no regularisation term, instead of 136 + 32
(sweep_rows.py, 'Low-rank blocks'); rd = 0 there. Every other block's order is the identity.

Blocks whose fp32 order may be wrong are decided in float64 by a second launch over those blocks only
(search_triton(exact=True), the default), and a box bound prunes singular blocks (sweep_rows.py's docstring).
A tile layout with the product on tensor cores (3xTF32) was measured slower on H100 and removed (BENCHMARKS.md,
third session).

Hessian blocks with zero trace are replaced by the identity before factoring (MSE objective; hessian_blocks.py), by
the factor kernel itself, which writes the fp32 Hessian the sweep and the float64 pass read (no host-side tensor
operations per call): its test is an all-zero diagonal (hessian_blocks.fallback_mask's, the reference's and the CPU
path's too), which is zero trace on every block with a non-negative diagonal (every block check_psd accepts); a
block with a negative diagonal entry fails the factor and is refused.
The factor kernel also refuses blocks that are not positive semi-definite: a failed factor sets status 2, and
the host raises hessian_blocks.check_psd's message.
This module: the prep and factor kernels and the host entry point (search_triton, hessian_factor).
"""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl

from fp4cal.numerics import N_SCALE_CANDIDATES, fp8_e4m3_values
from fp4cal.search.hessian_blocks import PSD_RTOL, check_psd
from fp4cal.search.kernel_common import (
    GDIV,
    N_CAND,
    RANK_MAX_COLS,
    RANK_RECORD,
    RANK_RECORD_INTS,
    SG_MAX,
    SG_MIN,
)
from fp4cal.search.launch import fast_launch
from fp4cal.search.rescore import _rescore_kernel
from fp4cal.search.sweep_rows import _sweep_rows_kernel
from fp4cal.search.windowed import nohalf_table
from fp4cal.validation import BLOCK, check_finite, check_global_amax_values

_SCAN_ROWS = 16  # weight rows per value-scan program of _prep_kernel
_SCAN_COLS = 128  # columns per load of a value-scan program
_SCAN_LOADS = 4  # loads per value-scan program (independent: issued together)
PSD_TOL: tl.constexpr = tl.constexpr(PSD_RTOL)
# Regularisation of singular blocks, relative to each channel's diagonal (module docstring, 'Singular blocks'):
# above the fp32 rounding noise of a computed X^T X / n (a few 1e-7 of sqrt(H_ii H_kk) per entry), so that
# H + REG_DELTA diag(H) is definite and its Cholesky stable; small enough that every block it admits passes
# check_psd (H + REG_DELTA D > 0 implies an eigenvalue of H above -REG_DELTA max_i H_ii > -PSD_RTOL x its largest
# |entry|).
REG_DELTA = 2.0**-14
REG: tl.constexpr = tl.constexpr(REG_DELTA)
# Low-rank singular blocks (module docstring): at most RANK_MAX columns, residual entries within RANK_EPS of
# sqrt(H_ii H_kk) (the sweep widens its error margin by that much: sweep_rows.py, 'Low-rank blocks'). An fp32
# X^T X / n of r tokens leaves a residual of a few fp32 ulps after r steps, far below 2^-19 = 32 u.
RANK_EPS_REL = 2.0**-19
RANK_MAX: tl.constexpr = tl.constexpr(RANK_MAX_COLS)  # RANK_MAX_COLS: kernel_common (the sweep reads G's columns)
RANK_EPS: tl.constexpr = tl.constexpr(RANK_EPS_REL)
# Launch configuration of the sweep, measured on H100 (BENCHMARKS.md): one warp (32 blocks) per program; the
# interpreter (CPU tensors) runs the same arithmetic in 128-block programs, which it executes several times faster.
# Register cap for the local-Hessian sweep: 255, 8 one-warp programs per SM. With lane refill (eighth session, H200)
# 168 (12 programs per SM, more spills) was 3 % faster on rank-1 blocks and 14-18 % slower on full-rank ones.
_NUM_WARPS_CUDA = 1
_NUM_WARPS_INTERPRETER = 4
_MAXNREG_HESSIAN = 255
# Lane refill (sweep_rows.py): a program's lanes take new rows when _REFILL_LANES of them are idle; programs own up
# to 32 x _ROWS_PER_LANE rows of a block column, and with _FILL_WAVES the chunks shrink until the grid fills the
# whole waves it needs (chunk_rows). Measured on an H200 (bench/tools/sweep_tune.py, eighth session): 4 idle lanes
# 1-5 % faster than 8; on q/o (4096 x 4096) 16 rows per lane 2-4 % faster than 8; on k/v (1024 x 4096) one full
# wave (1024 programs of 8 rows per lane) 11-15 % faster than 2816 programs of 3 rows per lane (BENCHMARKS.md).
_REFILL_LANES = 4
_ROWS_PER_LANE = 16
_UNROLL = 2  # candidates per lane between two tests of the bounds
# The box bound (weak block columns: nu = 0) at every _BOX_EVERY-th test of the bounds (sweep_rows.py). H200, sweep
# alone (bench/tools/kernel_times.py --fp32-only, tenth session), every 2nd / 3rd / 4th test: q/o collinear 1675 /
# 1595 / 1556 us, rank-8 1506 / 1443 / 1419, rank-1 1213 / 1165 / 1146; k/v collinear 456 / 438 / 431 (the walks
# grow by a candidate or two; a test costs a 16 x 16 product and the box's 16 intervals); every 6th / 8th (eleventh
# session): q/o collinear 1541 / 1548 us against 1556, rank-8 1429 / 1435 against 1419: no gain left. With the
# column-wise bound (fourteenth session, exact picks), every 2nd / 3rd / 4th: q/o collinear 1332 / 1274 / 1260 us,
# rank-8 1372 / 1317 / 1294, k/v collinear 359 / 342 / 338
_BOX_EVERY = 4
_FILL_WAVES = True
_PROGRAMS_PER_SM = 8
# mse calls on weights up to this size run as one launch (search_triton's fused): measured on H100, a second
# launch costs 0.05-0.09 ms of host time, more than such a sweep runs on the GPU (0.05 ms for 1024 x 4096).
_FUSED_MAX_WEIGHTS = 1 << 23
# The float64 pass's layout of mode 2 (rescore.py, 'One block per lane, per group of lanes or per warp'): a warp
# per block below _RESCORE_GROUPS_PER_PROGRAM blocks per program, groups of 8 lanes from there, a lane per block
# from _RESCORE_LANES_PER_PROGRAM on (every lane of every program has a block). H200 (BENCHMARKS.md, ninth session),
# rank-1 Hessians: q/o 4096 x 4096 (44,023 blocks in mode 2) a lane per block 348 us, groups of 8 476, a warp per
# block 546; k/v 1024 x 4096 (11,133 blocks: groups) 107 us, a warp per block 143; rank-2 (334-1,356 blocks: a
# warp per block) 19-31 us, 105-110 with a lane per block (the eighth session's pass).
_RESCORE_GROUPS_PER_PROGRAM = 4
_RESCORE_LANES_PER_PROGRAM = 32


@triton.jit
def _table_row(g_ptr, v_ptr, s_ptr, r_ptr, flag_ptr, e):
    """Tensor e: s_c = fp32(v_c * s_g) and r_c = fp32(1 / s_c) (0 when s_c == 0), s_g = fp32(g / 2688), one
    IEEE division per candidate here instead of one per block and candidate in the sweep. Flags: 1 g not
    finite or negative, 2 s_g outside the range where the division-free rounding is exact (the host then uses
    the reference), SG_MIN = 2^-60 and SG_MAX = 2^60."""
    c = tl.arange(0, 128)
    ok = c < N_CAND
    g = tl.load(g_ptr + e)
    sg = tl.div_rn(g, GDIV)
    s = tl.load(v_ptr + c, mask=ok, other=0.0) * sg
    r = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    tl.store(s_ptr + e * N_CAND + c, s, mask=ok)
    tl.store(r_ptr + e * N_CAND + c, r, mask=ok)
    tl.atomic_max(flag_ptr + 1, 1, mask=(g != g) | (g < 0) | (g == float("inf")))
    tl.atomic_max(flag_ptr + 2, 1, mask=(sg != 0) & ((sg < SG_MIN) | (sg > SG_MAX)))


@triton.jit
def _scan_tile(w_ptr, flag_ptr, p, n_rows, cout, cin, stride_we, stride_wr, stride_wc, SR: tl.constexpr,
               SC: tl.constexpr, SL: tl.constexpr):
    """Flag 0 if any weight of tile p of w (viewed as [E * cout, cin]) is not finite: rows [r * SR, (r + 1) * SR),
    columns [c * SL * SC, (c + 1) * SL * SC) in SL loads of SC, p = r * ceil(cin / (SL * SC)) + c. A program
    scanning whole rows ran 32 dependent loads on 4096-column weights, longer than the Hessian factor it runs
    beside (H200: 31 instead of 21 us for the prep kernel of a 1024 x 4096 weight)."""
    n_ct = (cin + SL * SC - 1) // (SL * SC)
    rr = (p // n_ct) * SR + tl.arange(0, SR).to(tl.int64)
    c0 = (p % n_ct) * (SL * SC)
    e = rr // cout
    base = e * stride_we + (rr - e * cout) * stride_wr
    n_bad = tl.zeros([SR, SC], tl.int32)
    for k in tl.static_range(SL):
        cols = c0 + k * SC + tl.arange(0, SC)
        m = (rr < n_rows)[:, None] & (cols < cin)[None, :]
        x = tl.load(w_ptr + base[:, None] + cols[None, :].to(tl.int64) * stride_wc, mask=m, other=0.0)
        n_bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    tl.atomic_max(flag_ptr, 1, mask=tl.sum(tl.sum(n_bad, axis=1), axis=0) > 0)


@triton.jit
def _prep_kernel(g_ptr, v_ptr, s_ptr, r_ptr, flag_ptr, hin_ptr, h_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr,
                 status_ptr, w_ptr, n_e, n_hb,
                 n_rows, cout, cin, stride_we, stride_wr, stride_wc, FACTOR: tl.constexpr, SCAN: tl.constexpr,
                 SR: tl.constexpr, SC: tl.constexpr, SL: tl.constexpr):
    """Everything the sweep needs, in one launch (host launches are the cost of small calls). Programs
    [0, n_e): candidate tables and global-amax flags; then n_hb programs (FACTOR): one Hessian block each
    (_factor_block, worst status to flag 3); then (SCAN) programs of SR weight rows and SL x SC columns each
    (_scan_tile): flag 0 on a non-finite weight. Flags must be zero on entry."""
    pid = tl.program_id(0)
    if pid < n_e:
        _table_row(g_ptr, v_ptr, s_ptr, r_ptr, flag_ptr, pid.to(tl.int64))
    elif pid < n_e + n_hb:
        if FACTOR:
            _factor_block(hin_ptr, h_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr, status_ptr, flag_ptr + 3,
                          (pid - n_e).to(tl.int64), True)
    else:
        if SCAN:
            _scan_tile(w_ptr, flag_ptr, (pid - n_e - n_hb).to(tl.int64), n_rows, cout, cin, stride_we, stride_wr,
                       stride_wc, SR, SC, SL)


@triton.jit
def _factor_kernel(hin_ptr, h_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr, status_ptr):
    """One 16x16 block per program (_factor_block)."""
    _factor_block(hin_ptr, h_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr, status_ptr, status_ptr,
                  tl.program_id(0).to(tl.int64), False)


@triton.jit
def _cholesky(a, d0, scale, i):
    """float64 Cholesky of the symmetric 16x16 block a (original diagonal d0, largest |entry| scale): (lower,
    singular, indefinite). A pivot at or below 1e-12 of its channel's original diagonal gets a zero column (a dead
    channel, d0 = 0, always does and is not singular); singular: such a pivot on a live channel; indefinite: a
    pivot below -PSD_TOL x scale."""
    lower = tl.zeros([16, 16], tl.float64)
    singular = tl.zeros([1], tl.int32)
    indefinite = tl.zeros([1], tl.int32)
    for k in tl.static_range(16):
        col = tl.sum(tl.where(i[None, :] == k, a, 0.0), axis=1)
        piv = tl.sum(tl.where(i == k, col, 0.0))
        d0k = tl.sum(tl.where(i == k, d0, 0.0))
        ok = piv > 1e-12 * d0k
        singular = singular | ((~ok) & (d0k > 0)).to(tl.int32)
        indefinite = indefinite | (piv < -(scale * PSD_TOL)).to(tl.int32)
        inv = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, piv, 1.0)), 0.0)
        lcol = tl.where(i >= k, col * inv, 0.0)
        lower = tl.where(i[None, :] == k, lcol[:, None], lower)
        a = a - lcol[:, None] * lcol[None, :]
    return lower, tl.sum(singular) > 0, tl.sum(indefinite) > 0


@triton.jit
def _low_rank(a, diag0, i):
    """Pivoted float64 Cholesky of the symmetric 16x16 block a, stopped when the residual E = a - G G^T has every
    |E_ik| <= RANK_EPS sqrt(a_ii a_kk) (original diagonal diag0): (G [16, 16] with columns r.. zero, rows in channel
    order; pos: each channel's step as pivot, 16 for the others; r; ok), ok when that happened within RANK_MAX
    columns, and rel, the residual's largest |E_ik| / sqrt(a_ii a_kk) at the stop. Each step takes the largest
    remaining diagonal as pivot p and sets the residual's row and column p to exactly 0 (they are 0 up to float64
    rounding, far below RANK_EPS): G[p, t'] = 0 for every later step t', so G is lower trapezoidal once its rows are
    taken in pivot order (_factor_block stores them so)."""
    live = diag0 > 0
    isd = tl.where(live, 1.0 / tl.sqrt(tl.where(live, diag0, 1.0)), 0.0)
    g = tl.zeros([16, 16], tl.float64)
    pos = tl.full([16], 16, tl.int32)
    r = tl.sum(pos * 0)  # int32 (a loop-carried value)
    rel = tl.max(tl.max(tl.abs(a) * isd[:, None] * isd[None, :], axis=1), axis=0)
    dg = tl.sum(tl.where(i[:, None] == i[None, :], a, 0.0), axis=1)
    piv = tl.max(dg)
    # as many steps as the rank (a rank-1 block: one), not RANK_MAX; stops at a pivot <= 0 (H not PSD, or its
    # residual at the rounding level) and at RANK_MAX columns
    while (rel > RANK_EPS) & (piv > 0.0) & (r < RANK_MAX):
        p = tl.min(tl.where(dg == piv, i, 16))
        col = tl.sum(tl.where(i[None, :] == p, a, 0.0), axis=1) / tl.sqrt(piv)
        g = tl.where(i[None, :] == r, col[:, None], g)
        a = a - col[:, None] * col[None, :]
        a = tl.where((i[:, None] == p) | (i[None, :] == p), 0.0, a)
        pos = tl.where(i == p, r, pos)
        r = r + 1
        rel = tl.max(tl.max(tl.abs(a) * isd[:, None] * isd[None, :], axis=1), axis=0)
        dg = tl.sum(tl.where(i[:, None] == i[None, :], a, 0.0), axis=1)
        piv = tl.max(dg)
    return g, pos, r, rel, rel <= RANK_EPS


@triton.jit
def _factor_block(hin_ptr, h_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr, status_ptr, flag_ptr, pid,
                  FLAG: tl.constexpr):
    """Block pid of the Hessian at hin_ptr (contiguous [.., 16, 16], any float dtype): its fp32 values, the identity
    instead where the diagonal is all zero (the MSE fallback: module docstring), stored at h_ptr (fp32: what the
    sweep and the float64 pass read); then the float64 Cholesky H = L L^T of the symmetrised block, mu_i = 1 /
    (H_AA^-1)_ii on the live channels A (non-zero diagonal; a dead channel's zero row and column do not enter the
    loss, so it neither makes the block singular nor gets a bound: mu_i = 0) and nu_i = lambda H_ii with lambda the
    Gershgorin bound of the module docstring.

    Singular blocks (a live pivot at or below 1e-12 of its diagonal: rank-deficient, or within fp32 rounding of
    it) are factored here too, without an eigendecomposition: by the low-rank factor where its pivoted Cholesky
    reaches the residual within RANK_MAX columns (tried first), otherwise L L^T = H + diag(rd), rd = REG_DELTA *
    diag(H) (module docstring, 'Singular blocks'); mu = nu = 0 (no bound from a singular H). status: 0 plain; 1
    singular (low-rank or regularised); 2 the regularised factor failed too (H has an eigenvalue below -REG_DELTA
    x its largest diagonal, or a pivot below -PSD_TOL x the largest |entry|: the host runs check_psd, which raises
    unless the block is within its tolerance, then factors it by eigendecomposition); 3 non-finite input (before
    the fallback: a zero block's NaN is found too). FLAG: also max the status into flag_ptr."""
    i = tl.arange(0, 16)
    eye = i[:, None] == i[None, :]
    h_in = tl.load(hin_ptr + pid * 256 + i[:, None] * 16 + i[None, :]).to(tl.float32)
    n_bad = tl.sum(tl.sum(((h_in != h_in) | (tl.abs(h_in) == float("inf"))).to(tl.int32), axis=1), axis=0)
    dead = tl.max(tl.abs(tl.sum(tl.where(eye, h_in, 0.0), axis=1))) == 0.0
    h32 = tl.where(dead, tl.where(eye, 1.0, 0.0), h_in)
    tl.store(h_ptr + pid * 256 + i[:, None] * 16 + i[None, :], h32)
    h = h32.to(tl.float64)
    a0 = (h + tl.trans(h)) * 0.5
    diag0 = tl.sum(tl.where(i[:, None] == i[None, :], a0, 0.0), axis=1)
    scale = tl.max(tl.max(tl.abs(a0), axis=1), axis=0)
    lower, singular, indefinite = _cholesky(a0, diag0, scale, i)
    failed = indefinite
    rd = tl.zeros([16], tl.float64)
    rank = tl.where(singular, 0, 0)
    eps = tl.where(singular, 0.0, 0.0)  # fp32 0: not a low-rank block
    f_out = lower
    pos = tl.full([16], 16, tl.int32)  # pivot steps (16: none): the identity row order
    mu = tl.zeros([16], tl.float64)  # no bound from a singular H
    nu = tl.zeros([16], tl.float64)
    # Branches uniform over the program (one block). The kernel's time is its slowest block's chain of reductions
    # (a collinear Hessian with one singular block of 256 took 41 us instead of 21, H200), so each path runs only
    # what it needs: a definite block its Cholesky and the inverse's diagonal for mu (32 steps); a singular one the
    # low-rank factor (r steps), and only where that fails the regularised Cholesky (15 + 16 steps).
    if singular:
        # rank <= RANK_MAX: the sweep's product with G's r trapezoidal columns costs 16 r - r (r - 1) / 2 FMAs and
        # no regularisation term, instead of 136 + 32. Its residual within RANK_EPS of sqrt(H_ii H_kk) makes H +
        # diag(REG * H_ii) definite (Gershgorin on the scaled block: 2^-14 - 16 x 2^-19 > 0), so the regularised
        # factor, which it replaces, cannot fail there.
        g_low, pos_low, r_low, rel_low, low_ok = _low_rank(a0, diag0, i)
        if low_ok:
            # the residual bound the sweep's margin uses: rel, up by 2^-16 relative for its rounding to fp32 and
            # for the row norms of G against sqrt(H_ii) (sd_i >= sqrt((1 - rel) H_ii)), and 2^-44 for the float64
            # rounding left in the pivots' zeroed rows and columns and in the residual's updates
            eps = (rel_low * (1.0 + 2.0**-16) + 2.0**-44).to(tl.float32)
            rank = r_low
            f_out = g_low
            pos = pos_low
            failed = ~low_ok  # false: the regularised factor would not have failed (above)
        else:
            rd = REG * diag0
            f_out, singular_r, indefinite_r = _cholesky(a0 + tl.where(i[:, None] == i[None, :], rd[:, None], 0.0),
                                                        diag0, scale, i)
            failed = singular_r | indefinite_r
    else:
        # X = L'^-1 by forward substitution, row by row (L' = L with 1 on a dead channel's diagonal);
        # (H_AA^-1)_ii = sum_k X_ki^2 for a live channel i.
        x = tl.zeros([16, 16], tl.float64)
        for k in tl.static_range(16):
            lrow = tl.sum(tl.where(i[:, None] == k, lower, 0.0), axis=0)
            lkk = tl.sum(tl.where(i == k, lrow, 0.0))
            acc = tl.sum(lrow[:, None] * x, axis=0)
            row = (tl.where(i == k, 1.0, 0.0) - acc) / tl.where(lkk > 0, lkk, 1.0)
            x = tl.where(i[:, None] == k, row[None, :], x)
        hinv = tl.sum(x * x, axis=0)
        live = diag0 > 0
        mu = tl.where(live, (1.0 - 1e-6) / tl.where(live, hinv, 1.0), 0.0)
        # Gershgorin on D^-1/2 H D^-1/2 (unit diagonal): every eigenvalue is >= 1 - (largest off-diagonal row sum)
        isd = 1.0 / tl.sqrt(tl.where(live, diag0, 1.0))
        corr = tl.abs(a0) * isd[:, None] * isd[None, :]
        radius = tl.max(tl.sum(tl.where(i[:, None] == i[None, :], 0.0, corr), axis=1))
        lam = tl.maximum(1.0 - radius, 0.0) * (1.0 - 1e-6)
        nu = tl.where(live, lam * diag0, 0.0)
    # F's row order: the pivots in pivot order, then the other channels in channel order (the identity unless
    # the block is low-rank). Channel c's row: the number of channels ordered before it.
    key = tl.where(pos < 16, pos, 16 + i)
    row = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    tl.store(f_ptr + pid * 256 + row[:, None] * 16 + i[None, :], f_out.to(tl.float32))
    # the rank record [rank, row order packed 4 bits per position: positions 0-7, 8-15, eps's fp32 bits]; channel c
    # at position row[c] (the nibbles are disjoint, so the sums are ors; int32 wraps the top nibble into the sign bit)
    lo = tl.sum(tl.where(row < 8, i << (4 * (row % 8)), 0))
    hi = tl.sum(tl.where(row >= 8, i << (4 * (row % 8)), 0))
    tl.store(rank_ptr + pid * RANK_RECORD, rank)
    tl.store(rank_ptr + pid * RANK_RECORD + 1, lo)
    tl.store(rank_ptr + pid * RANK_RECORD + 2, hi)
    tl.store(rank_ptr + pid * RANK_RECORD + 3, eps.to(tl.int32, bitcast=True))
    tl.store(mu_ptr + pid * 16 + i, mu.to(tl.float32))
    tl.store(nu_ptr + pid * 16 + i, nu.to(tl.float32))
    tl.store(rd_ptr + pid * 16 + i, rd.to(tl.float32))
    status = tl.where(n_bad > 0, 3, tl.where(failed, 2, tl.where(singular, 1, 0)))
    tl.store(status_ptr + pid, status)
    if FLAG:  # the worst status, for the host's single read of the prep flags
        tl.atomic_max(flag_ptr, status, mask=status > 0)


def _factor_buffers(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h contiguous, the buffers of _factor_block: hc (fp32 h with the zero-trace fallback, written by the kernel),
    F, mu, nu, rd, rank, status)."""
    hin = h.contiguous()
    hc = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    f = torch.empty_like(hc)
    mu = torch.empty(*hc.shape[:-1], dtype=torch.float32, device=h.device)
    nu = torch.empty_like(mu)
    rd = torch.empty_like(mu)
    status = torch.empty(hc.numel() // 256, dtype=torch.int32, device=h.device)
    rank = torch.empty(*hc.shape[:-2], RANK_RECORD_INTS, dtype=torch.int32, device=h.device)
    return hin, hc, f, mu, nu, rd, rank, status


# the rank record's row order of a block that is not low-rank: position k holds channel k (4 bits each; the second
# word as int32)
_IDENTITY_ORDER = (0x76543210, 0xFEDCBA98 - (1 << 32))


def _refactor_by_eigh(hc: torch.Tensor, f: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, rd: torch.Tensor,
                      rank: torch.Tensor, status: torch.Tensor) -> None:
    """Blocks with status 2 (rare: the regularised Cholesky failed on a block within check_psd's tolerance):
    F = V diag(sqrt(max(l, 0))) from the float64 eigendecomposition, mu = nu = rd = rank = 0. hc: the factored fp32
    blocks (fallback applied); raises check_psd's error if one is not PSD."""
    sel = (status == 2).reshape(hc.shape[:-2])
    hs = hc.double()[sel]
    check_psd(hs, "hessian (singular blocks)")
    lam, vec = torch.linalg.eigh((hs + hs.transpose(-1, -2)) / 2)
    fe = vec * lam.clamp_min(0).sqrt().unsqueeze(-2)  # F F^T = H, not triangular
    # F^T = Q R gives F F^T = R^T R: R^T is a lower-triangular factor, which the row kernel's product assumes
    f[sel] = torch.linalg.qr(fe.transpose(-1, -2)).R.transpose(-1, -2).float()
    mu[sel] = 0.0
    nu[sel] = 0.0
    rd[sel] = 0.0
    rank[sel] = torch.tensor([0, *_IDENTITY_ORDER, 0], dtype=torch.int32, device=rank.device)


def factor_order(rank: torch.Tensor) -> torch.Tensor:
    """The channel at each of F's rows, int64 [..., 16], from prepare_factor's rank record int32 [..., 4]."""
    words = rank[..., 1:3].long() & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=rank.device)
    return torch.cat([(words[..., :1] >> shifts) & 15, (words[..., 1:] >> shifts) & 15], dim=-1)


def hessian_factor(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Factor each 16x16 block of h [..., 16, 16] (PSD): returns (F fp32 [..., 16, 16], mu, nu, rd fp32 [..., 16],
    rank int32 [...]), F's rows in channel order.

    rank 0: F is lower triangular and F F^T = H + diag(rd), so dw^T H dw = ||F^T dw||^2 - sum_i rd_i dw_i^2
    (float64 Cholesky in a Triton kernel; rd = 0 except on singular blocks, which are factored regularised:
    module docstring). rank r > 0 (a singular block of rank r <= RANK_MAX_COLS): F's first r columns are G with
    G G^T = H up to entries of RANK_EPS_REL sqrt(H_ii H_kk), the other columns and rd are 0; G is lower
    trapezoidal in the order of its pivots (prepare_factor keeps it so, with the order in its rank record). A
    zero-trace block is factored as the identity (the MSE fallback).
    mu_i = min{dw^T H dw : dw_i = 1} = 1 / (H^-1)_ii, a lower bound used to end sweeps early (0 for singular
    blocks and dead channels), and nu_i = lambda H_ii with H >= diag(nu) (module docstring). Raises on
    non-finite h and on a block that is not PSD.
    """
    _, f, mu, nu, rd, rank, _ = prepare_factor(h)
    rows = torch.argsort(factor_order(rank), dim=-1)  # channel c's row of the stored F
    return f.gather(-2, rows.unsqueeze(-1).expand(f.shape)), mu, nu, rd, rank[..., 0]


def _check_factor_status(worst: int, h, hc, f, mu, nu, rd, rank, status) -> None:
    """Act on the worst factor status: raise for non-finite (3) or non-PSD (2) blocks; refactor the status-2
    blocks that pass check_psd's tolerance. Singular blocks (status 1) need nothing: the kernel factored them."""
    if worst == 3:
        check_finite(h, "hessian")
    if worst == 2:
        # The regularised Cholesky failed: usually not PSD (raise). A block within the eigenvalue tolerance (an
        # eigenvalue between -PSD_RTOL x its largest |entry| and -REG_DELTA x its largest diagonal) is refactored
        # by eigendecomposition instead.
        check_psd(h)
        _refactor_by_eigh(hc, f, mu, nu, rd, rank, status)


_thread_state = threading.local()


def _pinned_flags(dev: torch.device) -> tuple[torch.Tensor, torch.cuda.Event, torch.cuda.Stream, torch.cuda.Event]:
    """A pinned int32 [4] host buffer, the event of its copy, a side stream for the copy and the event it waits
    for, reused by this thread's calls on dev (each call reads its flags before returning, so reuse is safe within a
    thread; allocating them cost ~20 us of host time)."""
    cache = getattr(_thread_state, "flags", None)
    if cache is None:
        cache = _thread_state.flags = {}
    key = dev.index
    if key not in cache:
        cache[key] = (torch.empty(4, dtype=torch.int32, pin_memory=True), torch.cuda.Event(),
                      torch.cuda.Stream(device=dev), torch.cuda.Event())
    return cache[key]


@functools.cache
def _rescore_programs(device: torch.device) -> int:
    """Programs of the float64 pass: on a GPU 8 one-warp programs per SM, as many as its ~255 registers a thread let
    an SM hold (they stride over a list whose length only the device knows; a program with nothing to do exits at
    once), one under the interpreter."""
    if device.type != "cuda":
        return 1
    return 8 * _sm_count(device)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once: every search call sizes its grids with it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (triton.cdiv is a constexpr function: microseconds of host time a call)."""
    return -(-a // b)


def chunk_rows(cout: int, columns: int, resident: int, max_rows: int, fill_waves: bool = True) -> int:
    """Rows per sweep program (a multiple of 32, one warp's lanes): at most max_rows of one block column. columns:
    block columns over all tensors (n_e x cin / 16); resident: programs the GPU runs at once. fill_waves: the grid
    of max_rows chunks needs W = ceil(programs / resident) waves; the chunks shrink (evenly over the column) until
    the grid fills those W waves, never past them: a grid of 1.2 waves runs its last 0.2 on a few SMs after the
    rest are done (k/v 1024 x 4096 on 132 SMs: 1280 programs of 7 rows per lane, now 1024 of 8)."""
    n = _cdiv(cout, max_rows)  # chunks per block column at the most rows
    if fill_waves:
        waves = _cdiv(n * columns, resident)
        n = max(n, min((waves * resident) // columns, _cdiv(cout, 32)))
    return 32 * _cdiv(_cdiv(cout, n), 32)


def _chunk_rows(n_e: int, cout: int, nb: int, device: torch.device) -> int:
    """chunk_rows for a launch on device (sweep_rows.py, 'Lane refill'): a program is one warp, _PROGRAMS_PER_SM of
    them run on an SM at once; the refill evens out the blocks' walks within a program, the waves the programs."""
    if device.type != "cuda":
        return 32 * _NUM_WARPS_INTERPRETER * _ROWS_PER_LANE
    resident = _PROGRAMS_PER_SM * _sm_count(device)
    return chunk_rows(cout, n_e * nb, resident, 32 * _ROWS_PER_LANE, _FILL_WAVES)


def _sweep_grid(n_e: int, cout: int, nb: int, device: torch.device) -> tuple[tuple[int, int, int], int]:
    """The sweep's launch grid (row chunks, block columns, tensors) and its rows per chunk."""
    chunk = _chunk_rows(n_e, cout, nb, device)
    return (_cdiv(cout, chunk), nb, n_e), chunk


def sweep_programs(w: torch.Tensor) -> int:
    """Programs of the sweep launch for weight w ([cout, cin] or [E, cout, cin]): the rows of search_triton's stats."""
    n_e, cout, cin = (1, *w.shape) if w.dim() == 2 else w.shape
    (n_r, nb, n_e), _ = _sweep_grid(n_e, cout, cin // BLOCK, w.device)
    return n_r * nb * n_e


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values fp32 [126], int32 [126]: windowed.nohalf_table), cached per device."""
    return (
        fp8_e4m3_values(device),
        nohalf_table().to(device=device, dtype=torch.int32),
    )


def search_triton(
    w: torch.Tensor,
    method: str,
    g: torch.Tensor,
    hessian: torch.Tensor | None = None,
    factor: tuple[torch.Tensor, ...] | None = None,
    checked: bool = True,
    stats: torch.Tensor | None = None,
    sync: bool = True,
    fused: bool | None = None,
    losses: torch.Tensor | None = None,
    exact: bool = True,
    rescore_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel path of search_scales (see search_scales for shapes).

    Two launches: _prep_kernel (candidate tables, Hessian factors, value checks) and the sweep. The host waits
    once, for the prep kernel's flags only (copied on a side stream, so the sweep starts when the prep kernel
    ends), so the call returns while the sweep still runs and the next call's host work overlaps it. Small mse
    calls are one launch (fused).
    checked=False: w, g and hessian were checked for shape and dtype only; the value checks (finite, g >= 0,
        PSD) run on the device and raise the messages of fp4cal.validation / hessian_blocks.
    factor: prepare_factor(hessian) (one Hessian shared by several weights: q/k/v, gate/up, a layer's experts).
    stats: optional int32 [sweep_programs(w), 4], zeros: per program, the walk's steps, its rows, blocks x candidates
        tried and the blocks recorded for the float64 pass (mode 1 + 65536 x mode 2; sweep_rows.py; benchmark
        diagnostics: steps x 32 / rows is what a warp of 32 blocks paid, in candidates).
    sync=False: return right after the launches, without reading the value flags (benchmarks only: lets a
        CUDA graph capture the call to time the GPU work alone).
    fused: mse only: one launch, the sweep computing its candidate scales and checking the values itself, and
        the host waiting for it (None: for weights of at most 2^23 elements, where the host cost of a second
        launch exceeds the overlap it buys; see BENCHMARKS.md).
    losses: optional float64 [E or 1, 2], zero on entry: the sweep adds each tensor's objective at its 'max' scales
        and at the chosen scales (as reference.reference_losses computes them; a zero-trace block counts with the
        mse loss).
        Not filled when the reference runs instead (s_g out of range): the caller checks search_losses' result.
    exact: local_hessian: decide the blocks whose fp32 order may be wrong in float64 (sweep_rows.py, 'Exact
        picks'): a second small launch over the blocks the sweep recorded, no host wait. False: the fp32 picks
        (benchmarks measure the pass's cost with it).
    rescore_stats: optional int32 [8 + 5 x blocks], zeros (diagnostics of the float64 pass's mode 2, whose fp32
        filter is in rescore.py's docstring): [0] blocks, [1] candidates in their windows, [2] candidates the
        filter kept (re-scored in float64), [3] float64 steps, [4] fp32 steps (steps of the block's lanes, summed
        over the blocks), [5] the longest chain: the most warp steps one program took, [6] the lanes a mode-2 block
        took (32, 8 or 1: _RESCORE_GROUPS_PER_PROGRAM, _RESCORE_LANES_PER_PROGRAM); then per
        block (linear index (e * cout + row) * nb + j) its window [lo, hi] as lo | hi << 8 and the 128-bit mask of
        the kept candidates (4 int32, bit t = lo + t), zeros for blocks not in mode 2.
    Global amax outside the exact range (module docstring) goes to the reference.
    """
    stack = w.dim() == 3
    w3 = w if stack else w.unsqueeze(0)
    n_e, cout, cin = w3.shape
    nb = cin // BLOCK
    dev = w.device
    hess = method == "local_hessian"
    if fused is None:
        fused = not hess and stats is None and w3.numel() <= _FUSED_MAX_WEIGHTS
    if fused and (hess or stats is not None):
        raise ValueError("fused=True is for the mse sweep without stats")
    if g.dtype == torch.float32 and g.numel() == n_e and g.is_contiguous():
        g1 = g  # already one fp32 value per tensor (host time matters on small calls)
    else:
        g1 = g.float().reshape(-1).expand(n_e).contiguous()
    v_tab, nohalf = _tables(dev)
    # 0 bad w, 1 bad g, 2 g out of range, 3 factor status; 4, 5 the blocks recorded for the float64 pass (by mode)
    flags = torch.zeros(6, dtype=torch.int32, device=dev)
    if fused:
        s_tab = r_tab = v_tab  # the sweep computes s and r from the FP8 values
    else:
        tabs = torch.empty(2, n_e, N_SCALE_CANDIDATES, dtype=torch.float32, device=dev)
        s_tab, r_tab = tabs[0], tabs[1]
    n_hb = 0
    if hess:
        if factor is None:
            hin, hc, f, mu, nu, rd, rank, status = _factor_buffers(hessian)
            n_hb = status.numel()
        else:
            hc, f, mu, nu, rd, rank, status = factor
        stride_fe = 0 if f.dim() == 3 else f.stride(0)
    else:
        hc = f = mu = nu = rd = v_tab  # unused placeholder pointers
        rank = nohalf
        status = None
        stride_fe = 0
    n_scan = 0 if checked else _cdiv(n_e * cout, _SCAN_ROWS) * _cdiv(cin, _SCAN_LOADS * _SCAN_COLS)
    # placeholders when nothing is factored here
    factor_bufs = (hin, hc, f, mu, nu, rd, rank, status) if n_hb else (flags,) * 8
    # Everything the sweep needs is built before the prep kernel is queued: host time between the two launches is
    # time the GPU may wait for the sweep once the prep kernel is done (a few 10 us of GPU work, estimated from its
    # sm_90 SASS: bench/tools/compile_sm90.py --prep), which only a small call's public time shows
    out = torch.empty(n_e, cout, nb, dtype=torch.float32, device=dev)
    num_warps = _NUM_WARPS_CUDA if dev.type == "cuda" else _NUM_WARPS_INTERPRETER
    block_rows = 32 * num_warps
    grid, chunk = _sweep_grid(n_e, cout, nb, dev)
    rescore = hess and exact
    if rescore_stats is not None and (rescore_stats.dtype != torch.int32 or rescore_stats.device != dev
                                      or rescore_stats.numel() < 8 + 5 * n_e * cout * nb):
        raise ValueError(f"rescore_stats: {rescore_stats.dtype} [{rescore_stats.numel()}] on {rescore_stats.device}, "
                         f"expected int32 zeros of at least 8 + 5 x {n_e * cout * nb} blocks on {dev}")
    near = flags[4:]
    # the blocks recorded for the float64 pass: room for every block (int32 index and record, 8 bytes a block)
    cap = n_e * cout * nb if rescore else 1
    near_list = torch.empty(2 * cap, dtype=torch.int32, device=dev)
    if rescore and n_e * cout * nb >= 2**31:
        raise ValueError(f"w {tuple(w.shape)}: {n_e * cout * nb} blocks, the exact pass indexes fewer than 2^31")
    args = (w3, g1, v_tab, s_tab, r_tab, f, mu, nu, rd, rank, hc, nohalf, out, out.view(torch.int32),
            flags if stats is None else stats, flags if losses is None else losses, near, near_list, cap, cout, nb,
            chunk, w3.stride(0), w3.stride(1), w3.stride(2), stride_fe, cout * nb)
    opts = dict(HESSIAN=hess, STATS=stats is not None, BR=block_rows, FUSED=fused, LOSSES=losses is not None,
                EXACT=rescore, REFILL=_REFILL_LANES, UNROLL=_UNROLL, BOX_EVERY=_BOX_EVERY,
                num_warps=num_warps,
                enable_fp_fusion=False, **({"maxnreg": _MAXNREG_HESSIAN} if hess and dev.type == "cuda" else {}))

    rescore_grid = (_rescore_programs(dev),)
    rescore_args = (w3, g1, v_tab, s_tab, r_tab, hc, near, near_list, cap, out, flags if losses is None else losses,
                    cout, nb, w3.stride(0), w3.stride(1), w3.stride(2), stride_fe, cout * nb,
                    flags if rescore_stats is None else rescore_stats, _RESCORE_GROUPS_PER_PROGRAM * rescore_grid[0],
                    _RESCORE_LANES_PER_PROGRAM * rescore_grid[0])

    def launch():
        fast_launch(_sweep_rows_kernel, grid, args, **opts)
        if rescore:  # queued behind the sweep; reads the count the sweep left on the device
            # one warp a program: mode 2 spreads a block's window over its 32 lanes (rescore.py)
            fast_launch(_rescore_kernel, rescore_grid, rescore_args, LOSSES=losses is not None,
                        STATS=rescore_stats is not None, num_warps=1, enable_fp_fusion=False)

    flags_head = flags[:4]  # the value flags the host reads
    host_flags = None
    if sync and dev.type == "cuda" and not fused:
        host_flags, ready, side, prep_done = _pinned_flags(dev)
    if not fused:
        fast_launch(_prep_kernel, (n_e + n_hb + n_scan,), (
            g1, v_tab, s_tab, r_tab, flags, *factor_bufs, w3, n_e, n_hb, n_e * cout, cout, cin,
            w3.stride(0), w3.stride(1), w3.stride(2)),
            FACTOR=n_hb > 0, SCAN=n_scan > 0, SR=_SCAN_ROWS, SC=_SCAN_COLS, SL=_SCAN_LOADS,
        )  # fmt: skip
    if sync and dev.type == "cuda" and not fused:
        # the flags' copy on a side stream, after the prep kernel: in the call's own stream it held the sweep back
        # by 8-12 us (H200 timeline, bench/tools/timeline.py: the copy's start latency and its 1.5 us)
        prep_done.record()
        side.wait_event(prep_done)
        with torch.cuda.stream(side):
            host_flags.copy_(flags_head, non_blocking=True)
            ready.record()
    elif sync and not fused:  # interpreter: the prep kernel has run; act on its flags before sweeping
        early = _act_on_flags(flags_head.tolist(), w, g, hessian, method, hc, f, mu, nu, rd, rank, status, losses)
        if early is not None:
            return early
    launch()
    if not sync:
        return out if stack else out[0]
    if host_flags is not None:
        ready.synchronize()  # the one host wait: prep kernel and flag copy, not the sweep
        got = host_flags.tolist()
        early = _act_on_flags(got, w, g, hessian, method, hc, f, mu, nu, rd, rank, status, losses)
        if early is not None:
            return early
        if got[3] == 2:  # rare: a block refactored by eigendecomposition above; sweep again (queued after the first)
            if losses is not None:
                losses.zero_()
            near.zero_()
            launch()
    elif fused:  # one launch: the sweep checked the values itself, and has run
        early = _act_on_flags(flags[:4].tolist(), w, g, hessian, method, hc, f, mu, nu, rd, rank, status, losses)
        if early is not None:
            return early
    return out if stack else out[0]


def _act_on_flags(flags: list[int], w, g, hessian, method, hc, f, mu, nu, rd, rank, status,
                  losses=None) -> torch.Tensor | None:
    """Raise for bad values, refactor singular blocks; return the reference's result when s_g is outside the
    exact range (None otherwise). flags: bad w, bad g, s_g out of range, worst factor status."""
    from fp4cal.search.reference import reference_losses, search_reference

    bad_w, bad_g, out_of_range, fstatus = flags
    if bad_w:
        check_finite(w, "w")
    if bad_g:
        check_global_amax_values(g)
    if fstatus:
        _check_factor_status(fstatus, hessian, hc, f, mu, nu, rd, rank, status)
    if out_of_range:
        out = search_reference(w, method, g, hessian)
        if losses is not None:
            losses.copy_(reference_losses(w, g, out, hessian if method == "local_hessian" else None))
        return out
    return None


def prepare_factor(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The factor of h [..., nb, 16, 16] for search_triton(factor=...): (fp32 h with the fallback applied, F, mu,
    nu, rd, the rank record int32 [..., nb, 4] (rank, F's row order: factor_order, eps: the module docstring),
    status), one launch; values checked (raises like search_scales). For weights sharing one Hessian."""
    hin, hc, f, mu, nu, rd, rank, status = _factor_buffers(h)
    fast_launch(_factor_kernel, (status.numel(),), (hin, hc, f, mu, nu, rd, rank, status))
    _check_factor_status(int(status.max()), h, hc, f, mu, nu, rd, rank, status)
    return hc, f, mu, nu, rd, rank, status
