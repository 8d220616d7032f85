"""Triton helpers of the sweep kernels: the format constants, exact division-free E2M1 rounding, candidate scales.

The math (and why each step is exact) is in fp4cal.search.kernels' docstring. The constants come from
fp4cal.numerics, where the format is defined once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.numerics import E2M1_MAX, FP8_MAX, GLOBAL_DIVISOR, N_SCALE_CANDIDATES

N_CAND: tl.constexpr = tl.constexpr(N_SCALE_CANDIDATES)
E2M1_TOP: tl.constexpr = tl.constexpr(E2M1_MAX)
FP8_TOP: tl.constexpr = tl.constexpr(FP8_MAX)
GDIV: tl.constexpr = tl.constexpr(GLOBAL_DIVISOR)
# s_g range where the division-free rounding is provably exact (no subnormal intermediates): [2^-60, 2^60]
SG_MIN: tl.constexpr = tl.constexpr(2.0**-60)
SG_MAX: tl.constexpr = tl.constexpr(2.0**60)
# Singular blocks of rank r <= RANK_MAX_COLS are factored as r lower-trapezoidal columns G in their pivot order
# (kernels.py, 'Singular blocks'; the sweep loads the weights in that order, sweep_rows.py, 'Low-rank blocks')
RANK_MAX_COLS = 15
# int32 words per block of the factor's rank record (kernels._factor_block): rank, F's row order (two words), eps
RANK_RECORD_INTS = 4
RANK_RECORD: tl.constexpr = tl.constexpr(RANK_RECORD_INTS)


@triton.jit
def _scale(s_ptr, c, sg, FUSED: tl.constexpr):
    """Block scale s_c of index tensor c: from this tensor's table, or (FUSED: s_ptr holds the FP8 values)
    fp32(v_c * s_g), the table's own arithmetic."""
    if FUSED:
        return tl.load(s_ptr + c) * sg
    else:
        return tl.load(s_ptr + c)


@triton.jit
def _candidate(s_ptr, r_ptr, c, sg, FUSED: tl.constexpr):
    """Block scale s_c and r_c = fp32(1 / s_c) of index tensor c (see _scale; r as _table_row computes it)."""
    s = _scale(s_ptr, c, sg, FUSED)
    if FUSED:
        r = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    else:
        r = tl.load(r_ptr + c)
    return s, r


@triton.jit
def _first_at_or_below(m, s_ptr, r_ptr, T: tl.constexpr, sg=1.0, FUSED: tl.constexpr = False):
    """Per block, the first candidate c with fp32(m / s_c) <= T (N_CAND if none); m: [BR] fp32 block maxima.

    fp32(m / s_c) falls as c rises, so a 7-step binary search over the 126 candidates finds it.
    """
    lo = tl.zeros(m.shape, tl.int32)
    hi = tl.full(m.shape, N_CAND, tl.int32)
    for _ in range(7):
        mid = (lo + hi) // 2
        ok = mid < N_CAND
        s, r = _candidate(s_ptr, r_ptr, tl.minimum(mid, N_CAND - 1), sg, FUSED)
        x0 = m * r
        x = tl.fma(tl.fma(-x0, s, m), r, x0)
        below = (x <= T) & ok
        hi = tl.where(below, mid, hi)
        lo = tl.where(below | ~ok, lo, mid + 1)
    return lo


@triton.jit
def _round_signed(w, s, r):
    """q = fp32(sign(w) * E2M1(fp32(|w| / s)) * s), with r = fp32(1 / s) (s == r == 0 gives q = 0).

    Markstein's correction gives the exact quotient x = fp32(w / s) in three FMA-pipe ops; the magic number
    1.5 * 2^(E+22), E = clamp(exponent(x), 0, 2), keeps x + magic in one binade for either sign, so the add
    rounds |x| to the E2M1 step 2^(E-1) with ties to even for both signs; the clamp saturates at 6."""
    x0 = w * r
    res = tl.fma(-x0, s, w)
    x = tl.fma(res, r, x0)
    # saturate first: 6 is a level, so rounding the clamped x gives the clamped level, and |x| <= 6 leaves the
    # exponent at most 2, so it needs only its lower clamp (one instruction fewer per weight than clamping both)
    x = tl.minimum(tl.maximum(x, -E2M1_TOP), E2M1_TOP)
    xb = tl.maximum(x.to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000)  # exponent of |x| clamped to [0, 2]
    magic = (xb + ((22 << 23) | (1 << 22))).to(tl.float32, bitcast=True)
    return ((x + magic) - magic) * s


@triton.jit
def _errors(w, s, r):
    """16-tuple of [BR] fp32 signed errors w - q(w) at scales s, r [BR]."""
    d = ()
    for k in tl.static_range(16):
        d = d + (w[k] - _round_signed(w[k], s, r),)
    return d
