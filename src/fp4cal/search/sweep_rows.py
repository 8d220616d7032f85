"""The sweep kernel: each thread walks one 16-weight block at a time, a program (one warp) a chunk of rows of one
block column, each thread taking the chunk's next row when a few threads are idle ('lane refill', the kernel's
docstring).

Every per-block quantity is thread-local: the 16 x 16 triangular product F^T dw is 136 fp32 FMAs on registers,
sums and maxima are plain arithmetic, and all threads of a program share the block column's factor F_j, so the
branches below that depend on F_j are uniform. The float64 decision of the blocks recorded here is rescore.py's.

Windows, bounds and tie rules are those of fp4cal.search.kernels' docstring; this file adds, for
ill-conditioned Hessians (issue 13):
- Exact picks. The fp32 loss L = ||F^T dw||^2 is within TAU * S^2 of the true dw^T H dw, S = sum_i sd_i |dw_i|,
  sd_i = ||F_i,:|| = sqrt(H_ii) (rounding of F to fp32: 2u S^2; the 16-term products and the sum of squares:
  3 gamma_16 S^2; u = 2^-24; TAU = 2^-18 = 64u covers both with room). So every candidate's true loss lies in
  [L - m, L + m] (m its margin), and only candidates whose lower end L - m is at or below the best's upper end
  best + m_best can truly beat or tie the best (a rank-1 block's true loss can be tiny next to ||dw||^2 ||H||,
  where fp32 cannot order them). The walk keeps a runner-up record per block, no float64: the two smallest lower
  ends among the candidates tried other than the best, and the first one's index (the candidate that loses a
  comparison enters it, the old best when a new one wins). At the end a block whose smallest is within the
  best's upper end is recorded (mode 1: only best and the runner-up can win; mode 2: three or more can), and
  rescore._rescore_kernel, a second launch over the recorded blocks only, decides in float64 from the fp32 Hessian
  itself, as the reference does (mode 1: two losses; mode 2: the candidates of the window the block walked that
  an fp32 filter with its own error bound keeps, rescore.py).
  Candidates the bounds skipped have true losses above the best's (the bounds bound the true loss and are
  compared with best + m_best), so the float64 choice is the brute force's. CPU simulation of the walk (bench
  weights, 512 x 2048): recorded blocks about 1 in 100 on well-conditioned Hessians, 1 in 10 on rank-1 blocks
  (a third of them with 3+ close candidates), where the fp32 picks alone were wrong on 23 of 32768 blocks.
- The box bound for the downward walk, which needs no definite H (mu = 0 on singular blocks, where the
  clipping bound is 0): at every candidate at or below scale s each signed error lies in an interval (a weight
  with |w| >= 6 s clips, its error grows from |w| - 6 s towards |w|; any other error lies in [-min(s, |w|), |w|]),
  so with m the interval centres and rho their half widths, column by column of F (dw^T F F^T dw = sum_t (F[:, t]
  . dw)^2, |F[:, t] . dw| >= |F[:, t] . m| - |F[:, t]| . rho): ||F^T dw||^2 >= sum_t max(|F[:, t] . m| - |F[:, t]| .
  rho, 0)^2. The column form is the strong one on near-collinear channel pairs: a column of F is then nearly one
  pair, and its radius holds two channels' half widths, where the norm form, ||F^T m|| - sum_i rho_i ||F_i,:||,
  holds all sixteen (H200, k/v collinear: 52.6 -> 41.4 candidates per block). fp32: rho is padded by 1e-5 (|w| +
  s) >= 10 gamma_16 (|m| + rho), which covers the rounding of both column sums, and the sum of squares is scaled by
  1 - 1e-5.
- One product: a full-rank block's F is a low-rank G of 16 columns, so the walk's products (the candidate's loss
  and the box bound) run one code path, _columns, for every kind of block. With a separate triangular product
  for full-rank blocks the walk loop's code did not stay in the instruction cache: the column-form box bound
  then cost what its shorter walks saved (thirteenth session: 1.1 of 3.66 cycles per issued instruction were
  instruction-fetch stalls); with one path it pays (fourteenth session, H200 sweep: collinear -25 %, rank-8 -10
  to -14 %, rank-1 +2 to +3 %, well-conditioned +1 to +2 %; Nsight Compute, k/v collinear: instruction-fetch
  stalls 0.33 -> 0.14 per issued instruction; BENCHMARKS.md).
- Singular blocks: F F^T = H + diag(rd) (kernels.py's docstring), so the loss is ||F^T dw||^2 - sum rd_k dw_k^2;
  the subtracted term is at most REG_DELTA S^2 and computed to fp32 rounding, so TAU still bounds the error. sd
  (row norms of F) grows by a factor sqrt(1 + REG_DELTA), which keeps it an upper bound. The box bound bounds
  ||F^T dw|| and then subtracts sum rd_k w_k^2 >= sum rd_k dw_k^2 (every |dw_k| <= |w_k| at or below s).
- Low-rank blocks (singular, rank r <= kernel_common.RANK_MAX_COLS = 15): F holds G with G G^T = P (H - E) P^T,
  |E_ik| <= RANK_EPS sqrt(H_ii H_kk) (RANK_EPS = 2^-19), G lower trapezoidal (columns r.. zero) in the order P of
  the factor's pivots, which the rank record carries (kernels.py, 'Singular blocks'). The walk loads each block's
  weights in that order (dw in that order too: every per-channel quantity of the walk, sd included, comes from F's
  rows), so the loss is ||G^T dw||^2: the FMAs of G's columns up to the end of r's group in _columns (16 for rank
  1, 100 for rank 8) instead of 136 and the regularisation's 32, r uniform per program; |dw^T E dw| <= RANK_EPS
  S_H^2, S_H with sqrt(H_kk); the row norms sd of G are at least sqrt(1 - RANK_EPS) sqrt(H_kk), so the box bound's
  error term uses tau = 2 TAU, which covers TAU + RANK_EPS (1 + RANK_EPS) with room.
  The margin of a low-rank block's loss takes the block's own residual and is first order in the loss: a rank-1
  block's best losses are far below ||dw||^2 ||H|| (that is why fp32 cannot order them), where TAU S^2 is loose, and
  its residual is about 3 u, not RANK_EPS = 32 u (an fp32 x x^T; the rank record's eps, kernels.py). With y = G*^T
  dw (G* the float64 factor, G = fl32(G*)), the computed product ŷ errs by ||ŷ - y|| <= (gamma_16 + u (1 + u))
  sum_i |dw_i| ||G_i,:|| <= 17.1 u (1 + 17 u) S <= e = 2^-19 S (FMA chains of at most 16 terms per column; S is
  computed from sd >= ||G_i,:||). With L̂ = fl(||ŷ||^2), within gamma_16 ||ŷ||^2 of ||ŷ||^2, and 2 e ||ŷ|| <= e^2 / k
  + k ||ŷ||^2 for any k > 0 (k = 2^-14): |L̂ - ||y||^2| <= e (2 ||ŷ|| + e) + 16 u L̂ (1 + 17 u) <= (2^-24 + 2^-38)
  S^2 + (2^-14 + 2^-20) L̂ (1 + 17 u). ||y||^2 = dw^T (H - E) dw, |dw^T E dw| <= rel S_H^2 <= rel (1 + 2^-16) S^2
  (sqrt(H_kk) <= ||G*_k,:|| / sqrt(1 - rel)), rel the residual's largest |E_ik| / sqrt(H_ii H_kk) (at most
  RANK_EPS); the float64 loss the reference computes is within 2^-46 S^2 of dw^T H dw. So the margin m = (eps +
  LOW_ABS) S^2 + LOW_REL L̂, LOW_ABS = 2^-23, LOW_REL = 2^-13, eps >= rel (1 + 2^-16) from the rank record, bounds
  the error with room for m's own fp32 roundings (one FMA more per candidate, in every block's code: the same
  term with LOW_REL = 0 on a full-rank block). A sqrt(L̂) form (m = e (2.001 sqrt(L̂) + e) + ..), tighter by a
  little, made the sweep 2-4 % slower on well-conditioned Hessians and 4-6 % on the collinear family (a third of
  whose walk steps are in low-rank programs of rank 8-15) through the code it added (H200, 3 device calls); this
  form costs 0-1 % and 1-2.6 % there (and shortens rank-1 walks by 4 %: the bounds compare with a tighter best +
  margin). The full-rank margin TAU S^2 is kept: there the recorded blocks are close in fp32 whatever the margin
  (CPU count over all 126 candidates, bench weight 256 x 1024: 0.78 % of the blocks close to their best with TAU
  S^2 on a well-conditioned H, 0.73 % with a first-order margin), while on rank-1 blocks this margin leaves 1.7 %
  with one close candidate and 0.8 % with two or more, instead of 8.3 % and 4.0 % (rank-2: 0.46 % and 0.04 %,
  instead of 0.71 % and 0.12 %).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4cal.search.kernel_common import (
    E2M1_TOP,
    FP8_TOP,
    GDIV,
    N_CAND,
    RANK_RECORD,
    SG_MAX,
    SG_MIN,
    _candidate,
    _errors,
    _first_at_or_below,
    _scale,
)

TAU: tl.constexpr = tl.constexpr(2.0**-18)  # fp32 loss error bound, in units of S^2 (module docstring)
# Low-rank blocks' margin (module docstring, 'Low-rank blocks'): (eps + LOW_ABS) S^2 + LOW_REL L, eps the block's
# residual bound from its rank record
LOW_REL: tl.constexpr = tl.constexpr(2.0**-13)
LOW_ABS: tl.constexpr = tl.constexpr(2.0**-23)
# A bound must exceed the best by this factor (fp32 bound arithmetic), and exceed 0: on a singular block the loss
# ||F^T dw||^2 - sum rd dw^2 can be slightly negative (H's fp32 rounding noise), while a trivial bound is 0.
SLACK: tl.constexpr = tl.constexpr(1.0001)
# The clipping and upward bounds run on a block column only if nu > 0 or some mu_k >= MU_USEFUL H_kk (the kernel's
# 'clip')
MU_USEFUL: tl.constexpr = tl.constexpr(2.0**-10)


@triton.jit
def _load_tri(fb):
    """The 136 entries F[i, k], i >= k, of the block column's lower-triangular F (row-major 16 x 16 at fb), in
    _quad's order: loaded once per program, so the product reads registers, not memory, per candidate."""
    fv = ()
    for k in tl.static_range(16):
        for i in tl.static_range(k, 16):
            fv = fv + (tl.load(fb + i * 16 + k),)
    return fv


@triton.jit
def _row_norms(fv):
    """sd_k = ||F_k,:|| (1 + 1e-6), an upper bound on F's row norms (= sqrt(H_kk) up to rounding), shared by the
    program's blocks; fv: _load_tri's entries of the lower-triangular F (trapezoidal for a low-rank G)."""
    sd = ()
    for k in tl.static_range(16):
        acc = 0.0
        for i in tl.static_range(k + 1):
            fki = fv[16 * i - (i * (i - 1)) // 2 + k - i]
            acc = acc + fki * fki
        sd = sd + (tl.sqrt(acc) * (1.0 + 1e-6),)
    return sd


@triton.jit
def _col(d, rho, fv, t: tl.constexpr, acc, BOX: tl.constexpr, SPLIT: tl.constexpr = False):
    """acc + c^2 for column t of F (fv: _load_tri's lower triangle, F[k, t] for k >= t): c = F[:, t] . d, or (BOX)
    c = max(|F[:, t] . d| - |F[:, t]| . rho, 0), the column's share of the box bound (d the box's centres, rho its
    half widths). One chain of 16 - t FMAs per sum (the other columns' chains of its group run beside it); SPLIT:
    four chains of four, for the product's columns 0-3, whose groups in _columns hold one or two columns: too few
    chains to cover the FMA latency (the candidate's loss is on the walk's critical path; H200: 1-2 % on every
    family against one chain there, 3 more additions a column)."""
    if SPLIT:
        zs = ()
        for q in tl.static_range(4):
            z = tl.zeros(d[0].shape, tl.float32)
            for k in tl.static_range(4 * q, 4 * q + 4):
                if k >= t:
                    z = tl.fma(d[k], fv[16 * t - (t * (t - 1)) // 2 + k - t], z)
            zs = zs + (z,)
        c = (zs[0] + zs[1]) + (zs[2] + zs[3])
    else:
        # F[k, t] is fv[16 t - t (t - 1) / 2 + k - t]: the columns before t hold 16 - t' entries each (inline, so
        # the index stays a compile-time constant)
        f = fv[16 * t - (t * (t - 1)) // 2]
        c = d[t] * f
        if BOX:
            r = rho[t] * tl.abs(f)
        for k in tl.static_range(t + 1, 16):
            f = fv[16 * t - (t * (t - 1)) // 2 + k - t]
            c = tl.fma(d[k], f, c)
            if BOX:
                r = tl.fma(rho[k], tl.abs(f), r)
        if BOX:
            c = tl.maximum(tl.abs(c) - r, 0.0)
    return tl.fma(c, c, acc)


@triton.jit
def _columns(d, rho, fv, n, BOX: tl.constexpr):
    """The sum of _col's terms over the first n columns of F (n uniform per program: 16 on a full-rank block, the
    rank of a low-rank one, whose G is stored with columns n.. zero), in groups: column 0, 1, 2-3, 4-7, 8-11,
    12-15, each group computed whole (a zero column adds an exact 0), so a test per group and no divergence (each
    group is a basic block of its own: its chains are what hides the FMA latency, hence SPLIT on 0-3). A
    rank-r product costs the FMAs of the columns up to its group's end (16 for rank 1, 100 for rank 8, 136 for a
    full-rank block)."""
    acc = _col(d, rho, fv, 0, tl.zeros(d[0].shape, tl.float32), BOX, not BOX)
    if n > 1:
        acc = _col(d, rho, fv, 1, acc, BOX, not BOX)
        if n > 2:
            acc = _col(d, rho, fv, 2, acc, BOX, not BOX)
            acc = _col(d, rho, fv, 3, acc, BOX, not BOX)
            if n > 4:
                for t in tl.static_range(4, 8):
                    acc = _col(d, rho, fv, t, acc, BOX)
                if n > 8:
                    for t in tl.static_range(8, 12):
                        acc = _col(d, rho, fv, t, acc, BOX)
                    if n > 12:
                        for t in tl.static_range(12, 16):
                            acc = _col(d, rho, fv, t, acc, BOX)
    return acc


@triton.jit
def _quad(d, fv, lr):
    """||F^T d||^2 in fp32 ([BR]); d: 16-tuple of [BR] in F's row order; fv: _load_tri's entries; lr: the block
    column's rank record (0: F is a full triangular factor; r > 0: a low-rank G of r columns). One code path for
    both kinds: the walk loop's code then stays in the instruction cache (module docstring, 'One product')."""
    return _columns(d, (), fv, tl.where(lr > 0, lr, 16), False)


@triton.jit
def _reg_term(d, rd):
    """sum_k rd_k d_k^2 ([BR] fp32): the regularisation of a singular block's factor (F F^T = H + diag(rd))."""
    t0 = tl.zeros(d[0].shape, tl.float32)
    t1 = tl.zeros(d[0].shape, tl.float32)
    for k in tl.static_range(8):  # two chains of 8 (critical path)
        t0 = tl.fma(d[2 * k] * d[2 * k], rd[2 * k], t0)
        t1 = tl.fma(d[2 * k + 1] * d[2 * k + 1], rd[2 * k + 1], t1)
    return t0 + t1


@triton.jit
def _quad64(d, hb):
    """float64 d^T H d of the fp32 errors d (16-tuple of [BR]) with the block column's fp32 Hessian at hb."""
    loss = tl.zeros(d[0].shape, tl.float64)
    for i in tl.static_range(16):
        z = tl.zeros(d[0].shape, tl.float64)
        for k in tl.static_range(16):
            z = z + tl.load(hb + i * 16 + k).to(tl.float64) * d[k].to(tl.float64)
        loss = loss + d[i].to(tl.float64) * z
    return loss


@triton.jit
def _weighted_l1(d, sd):
    """S = sum_k sd_k |d_k| ([BR] fp32); sd: 16-tuple of scalars. Four chains of four (the margin is on the walk's
    critical path)."""
    ts = ()
    for q in tl.static_range(4):
        t = tl.abs(d[4 * q]) * sd[4 * q]
        for k in tl.static_range(4 * q + 1, 4 * q + 4):
            t = tl.fma(tl.abs(d[k]), sd[k], t)
        ts = ts + (t,)
    return (ts[0] + ts[1]) + (ts[2] + ts[3])


@triton.jit
def _consider(w, cc, s, r, active, down, best, bmar, best_idx, low1, low2, r1, fv, sd, rd, reg, lr, tau, lrel,
              HESSIAN: tl.constexpr):
    """Try candidate cc (per block) at scale s, r; returns the updated (best, bmar, best_idx, low1, low2, r1).

    best: fp32 loss of the best so far; bmar: its error margin (tau S^2 + lrel loss: TAU S^2 on a full-rank block,
    first order on a low-rank one, module docstring). down [BR]: the lane's walk goes down, so '<=' keeps the
    smaller candidate on ties; up: strict '<'. HESSIAN: the runner-up record (module docstring, 'Exact picks'):
    low1 <= low2 the two smallest lower ends loss - margin of the candidates tried that are not the best, r1 the
    index of the first; the candidate that loses this comparison (the old best when cc wins) enters it."""
    d = _errors(w, s, r)
    if HESSIAN:
        loss = _quad(d, fv, lr)
        if reg:  # uniform: the block column's factor is regularised (singular H; rd = 0 on a low-rank block)
            loss = loss - _reg_term(d, rd)
        sw = _weighted_l1(d, sd)
        # tau S^2 + lrel loss: lrel = 0 on a full-rank block; on a low-rank one the first-order margin (module
        # docstring, 'Low-rank blocks'), tau = eps + LOW_ABS
        mar = tl.fma(loss, lrel, sw * sw * tau)
    else:
        loss = tl.zeros(s.shape, tl.float32)
        for k in tl.static_range(16):
            loss = tl.fma(d[k], d[k], loss)
    better = active & ((loss < best) | (down & (loss == best)))
    if HESSIAN:
        lo_in = tl.where(better, best - bmar, loss - mar)
        ix_in = tl.where(better, best_idx, cc)
        first = active & (lo_in < low1)
        second = active & (lo_in < low2) & ~first
        low2 = tl.where(first, low1, tl.where(second, lo_in, low2))
        low1 = tl.where(first, lo_in, low1)
        r1 = tl.where(first, ix_in, r1)
        bmar = tl.where(better, mar, bmar)
    best = tl.where(better, loss, best)
    best_idx = tl.where(better, cc, best_idx)
    return best, bmar, best_idx, low1, low2, r1


@triton.jit
def _clip_bound(w, mb, nbp, six_s, HESSIAN: tl.constexpr):
    """The clipping bound, e_k = max(|w_k| - fp32(6 s), 0): max(max_k mu_k e_k^2, sum_k nu_k e_k^2) (HESSIAN)
    or sum_k e_k^2 (two chains of 8 FMAs: the critical path)."""
    bmax = tl.zeros(six_s.shape, tl.float32)
    bs0 = tl.zeros(six_s.shape, tl.float32)
    bs1 = tl.zeros(six_s.shape, tl.float32)
    for k in tl.static_range(16):
        err = tl.maximum(tl.abs(w[k]) - six_s, 0.0)
        if HESSIAN:
            bmax = tl.maximum(bmax, err * err * tl.load(mb + k))
            if k % 2 == 0:
                bs0 = tl.fma(err * err, tl.load(nbp + k), bs0)
            else:
                bs1 = tl.fma(err * err, tl.load(nbp + k), bs1)
        else:
            if k % 2 == 0:
                bs0 = tl.fma(err, err, bs0)
            else:
                bs1 = tl.fma(err, err, bs1)
    return tl.maximum(bmax, bs0 + bs1)


@triton.jit
def _box_bound(w, s, fv, sd, rd, lr):
    """The box bound (module docstring) of every candidate at or below scale s [BR], for the true loss: the sum
    over F's columns of max(|F[:, t] . m| - |F[:, t]| . rho, 0)^2, rho padded by 1e-5 (|w| + s) for the fp32 error
    of both sums and the result by 1e-5 for that of the squares; less the fp32 error of F itself (tau * (sum sd
    |w|)^2, tau = TAU, 2 TAU on a low-rank block: module docstring, 'Low-rank blocks') and the regularisation of
    a singular block's factor, sum rd_k w_k^2 >= sum rd_k dw_k^2 (|dw_k| <= |w_k| there)."""
    tau = tl.where(lr > 0, 2.0 * TAU, TAU)
    six = s * E2M1_TOP
    m = ()
    rho = ()
    big = tl.zeros(s.shape, tl.float32)
    for k in tl.static_range(16):
        a = tl.abs(w[k])
        lo = tl.where(a >= six, a - six, -tl.minimum(s, a))
        centre = (lo + a) * 0.5
        m = m + (tl.where(w[k] < 0, -centre, centre),)
        rho = rho + ((a - lo) * 0.5 + 1e-5 * (a + s),)
        big = tl.fma(a, sd[k], big)
    q = _columns(m, rho, fv, tl.where(lr > 0, lr, 16), True)
    return q * (1.0 - 1e-5) - big * big * tau - _reg_term(w, rd)


@triton.jit
def _up_bound(w, mb, nbp, half_s):
    """max(max_k mu_k l_k^2, sum_k nu_k l_k^2), l_k = min(|w_k|, max(s / 2 - |w_k|, 0)) (upward bound)."""
    bmax = tl.zeros(half_s.shape, tl.float32)
    bs0 = tl.zeros(half_s.shape, tl.float32)
    bs1 = tl.zeros(half_s.shape, tl.float32)
    for k in tl.static_range(16):
        a = tl.abs(w[k])
        low = tl.minimum(a, tl.maximum(half_s - a, 0.0))
        low2 = low * low
        bmax = tl.maximum(bmax, low2 * tl.load(mb + k))
        if k % 2 == 0:  # two chains of 8 (critical path)
            bs0 = bs0 + low2 * tl.load(nbp + k)
        else:
            bs1 = bs1 + low2 * tl.load(nbp + k)
    return tl.maximum(bmax, bs0 + bs1)


@triton.jit
def _max_scale(m, g, v_ptr):
    """The 'max' choice's block scale and its reciprocal ([BR] fp32 each): v = e4m3(fp32(fp32(m / 6) / s_g)), RNE,
    saturating at 448, 0 below half the smallest FP8 value (numerics.block_scale_code), found in the FP8 value
    table (the two neighbours of the ratio differ from it exactly, Sterbenz); s = fp32(v * s_g)."""
    sg = tl.div_rn(g, GDIV)
    ratio = tl.div_rn(tl.div_rn(m, E2M1_TOP), tl.where(sg > 0, sg, 1.0))
    ratio = tl.where(sg > 0, tl.minimum(ratio, FP8_TOP), 0.0)
    lo = tl.zeros(m.shape, tl.int32)
    hi = tl.full(m.shape, N_CAND, tl.int32)
    for _ in range(7):  # first c with v_c >= ratio (N_CAND if none)
        mid = (lo + hi) // 2
        ok = mid < N_CAND
        below = (tl.load(v_ptr + tl.minimum(mid, N_CAND - 1)) >= ratio) & ok
        hi = tl.where(below, mid, hi)
        lo = tl.where(below | ~ok, lo, mid + 1)
    c = tl.minimum(lo, N_CAND - 1)
    v_hi = tl.load(v_ptr + c)
    v_lo = tl.where(c > 0, tl.load(v_ptr + tl.maximum(c - 1, 0)), 0.0)
    d_hi = v_hi - ratio
    d_lo = ratio - v_lo
    # ties to even: table index c holds FP8 code c + 1, so the upper neighbour's code is even when c is odd
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((c % 2) == 1))
    v = tl.where(ratio >= v_hi, v_hi, tl.where(take_hi, v_hi, v_lo))
    s = v * sg
    r = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    return s, r


@triton.jit
def _loss64(w, s, r, hb, HESSIAN: tl.constexpr):
    """float64 objective of blocks w (16-tuple of [BR]) at scales s, r: as reference.block_loss computes it."""
    d = _errors(w, s, r)
    if HESSIAN:
        return _quad64(d, hb)
    else:
        loss = tl.zeros(s.shape, tl.float64)
        for k in tl.static_range(16):
            loss = loss + d[k].to(tl.float64) * d[k].to(tl.float64)
        return loss


@triton.jit
def _load_block(wrow, ok, stride_wc, plo=0, phi=0, PERM: tl.constexpr = False):
    """The 16 weights of each lane's block at wrow [BR] (fp32, 0 where not ok) and their largest magnitude. PERM:
    in the row order of the block column's factor, channel indices packed 4 bits each, position k < 8 in plo's
    bits 4k.., k >= 8 in phi's (the identity on every block but a low-rank one: kernels._factor_block). A caller
    that drops the maximum does not pay for it (dead code)."""
    w = ()
    m = tl.zeros(ok.shape, tl.float32)
    for k in tl.static_range(16):
        if PERM:
            if k < 8:
                c = (plo >> (4 * k)) & 15
            else:
                c = (phi >> (4 * (k - 8))) & 15
        else:
            c = k
        wk = tl.load(wrow + c * stride_wc, mask=ok, other=0.0).to(tl.float32)
        w = w + (wk,)
        m = tl.maximum(m, tl.abs(wk))
    return w, m


@triton.jit
def _emit(p, fin, best, bmar, best_idx, low1, low2, r1, c_lo, c_hi, EXACT: tl.constexpr):
    """Store the record of each finished lane's block at p [BR] (where fin): its pick, and (EXACT) the runner-up,
    the window it walked and the float64 pass's mode: best | r1 << 7 | lo << 14 | hi << 21 | mode << 28."""
    rec = best_idx
    if EXACT:
        # candidates whose true loss may be at or below the best's: lower end at or below best + bmar (with the fp32
        # rounding of these sums); mode 0 needs nothing, 1 a float64 choice between best and r1, 2 a full one
        thr = best + bmar + tl.abs(best) * 2.0**-20
        mode = tl.where(low1 <= thr, tl.where(low2 <= thr, 2, 1), 0)
        rec = rec | (r1 << 7) | (c_lo << 14) | (c_hi << 21) | (mode << 28)
    tl.store(p, rec, mask=fin)


@triton.jit
def _sweep_rows_kernel(w_ptr, g_ptr, v_ptr, s_tab_ptr, r_tab_ptr, f_ptr, mu_ptr, nu_ptr, rd_ptr, rank_ptr, h_ptr,
                       nohalf_ptr,
                       out_ptr, oi_ptr,
                       stats_ptr, loss_ptr, cnt_ptr, list_ptr, cap, cout, nb, chunk, stride_we, stride_wr, stride_wc,
                       stride_fe, stride_oe,
                       HESSIAN: tl.constexpr, STATS: tl.constexpr, BR: tl.constexpr, FUSED: tl.constexpr,
                       LOSSES: tl.constexpr, EXACT: tl.constexpr, UNROLL: tl.constexpr, REFILL: tl.constexpr,
                       BOX_EVERY: tl.constexpr):
    """Grid (row chunks of `chunk` rows, block columns, tensors); one block per lane, BR lanes. No defaults for the
    settings: search_triton passes kernels.py's measured ones (_UNROLL, _REFILL_LANES, _BOX_EVERY).

    Lane refill: blocks walk different numbers of candidates (CPU simulation, 512 x 1024: 17 on average but 31 for
    the slowest of 32 on well-conditioned Hessians, 52 and 100 on rank-1 ones), and a warp runs as long as its
    slowest lane. So a program owns `chunk` rows of one block column (the factor F_j, the bounds' coefficients and
    the branches on them stay uniform), each lane walks both directions of its block in turn (down from the MSE
    top, then up), and when REFILL lanes have finished (or none is walking) they take the chunk's next rows (H200,
    4096 x 4096: the walk of 32 rank-1 blocks 101 -> 59 candidate steps, for 53.5 candidates per block).
    Three steps:
    1. windows: every row of the chunk, BR at a time: MSE top and first all-zero candidate, kept in oi_ptr (the
       int32 view of out_ptr) as top | zero_at << 8 (a lane's refill then loads one word, not two binary searches);
    2. the walk; a finished block leaves its record in oi_ptr: best | r1 << 7 | lo << 14 | hi << 21 | mode << 28;
    3. per BR rows again: the amax of the pick, the float64 list (EXACT) and the losses (LOSSES), which therefore
       run with every lane busy.
    FUSED (mse only): candidate scales computed here from the FP8 values (s_tab_ptr = r_tab_ptr = v_ptr), values
    checked here, flags in stats_ptr (0 bad w, 1 bad g, 2 s_g out of the exact range). STATS: per program (walk
    steps, rows of the chunk, blocks x candidates, blocks recorded for the float64 pass in mode 1 + 65536 x those in
    mode 2). LOSSES: add the float64 objective of the tensor at its 'max' scales and at the chosen scales to
    loss_ptr[e, 0:2] (the calibration's report, without a second pass over the weights). EXACT (HESSIAN): record
    the blocks whose fp32 order may be wrong for rescore._rescore_kernel (module docstring, 'Exact picks'):
    cnt_ptr[0] and cnt_ptr[1] count those of mode 1 (only best and r1 can win) and mode 2 (three or more can),
    zero on entry; list_ptr (int32 [2 cap], cap >= the blocks) holds them as (linear block index (e * cout + row) *
    nb + j, best | r1 << 7 | lo << 14 | hi << 21), [lo, hi] the window the block walked, mode 1 from entry 0 up,
    mode 2 from entry cap - 1 down. No float64 in the walk: inlined there (commit 8aa09ea) it made the kernel take
    minutes to compile."""
    pid_r = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    r0 = pid_r.to(tl.int64) * chunk
    r_end = tl.minimum(r0 + chunk, cout)
    lane = tl.arange(0, BR).to(tl.int64)
    wcol = w_ptr + e * stride_we + j * 16 * stride_wc
    ocol = e * stride_oe + j
    g = tl.load(g_ptr + e)
    if FUSED:
        sg = tl.div_rn(g, GDIV)
        s_ptr = s_tab_ptr
        r_ptr = r_tab_ptr
        first_prog = (pid_r == 0) & (j == 0)
        tl.atomic_max(stats_ptr + 1, 1, mask=first_prog & ((g != g) | (g < 0) | (g == float("inf"))))
        tl.atomic_max(stats_ptr + 2, 1, mask=first_prog & (sg != 0) & ((sg < SG_MIN) | (sg > SG_MAX)))
    else:
        sg = 1.0
        s_ptr = s_tab_ptr + e * N_CAND
        r_ptr = r_tab_ptr + e * N_CAND
    fb = f_ptr + e * stride_fe + j * 256
    hb = h_ptr + e * stride_fe + j * 256
    mb = mu_ptr + e * (stride_fe // 16) + j * 16
    nbp = nu_ptr + e * (stride_fe // 16) + j * 16
    rdp = rd_ptr + e * (stride_fe // 16) + j * 16
    sd = ()
    rd = ()
    weak = False
    reg = False
    clip = True
    lr = 0
    plo = 0
    phi = 0
    tau = TAU
    lrel = 0.0
    fv = ()
    if HESSIAN:
        fv = _load_tri(fb)
        # the rank record: rank (0: F triangular in channel order), F's row order (kernels._factor_block)
        rp = rank_ptr + (e * (stride_fe // 256) + j) * RANK_RECORD
        lr = tl.load(rp)
        plo = tl.load(rp + 1)
        phi = tl.load(rp + 2)
        # the margin's S^2 coefficient: TAU, or on a low-rank block its residual bound eps (kernels._factor_block)
        tau = tl.where(lr > 0, tl.load(rp + 3).to(tl.float32, bitcast=True) + LOW_ABS, TAU)
        lrel = tl.where(lr > 0, LOW_REL, 0.0)
        sd = _row_norms(fv)
        # the box bound costs a product per test: only where the diagonal bound nu is 0 (Gershgorin fails:
        # singular blocks, strongly correlated channels), where the clipping bound is weak
        nsum = 0.0
        for k in tl.static_range(16):
            nsum = nsum + tl.load(nbp + k)
        weak = nsum == 0.0
        # The clipping and upward bounds are computed only where they can end a walk (CPU count: ~180 and ~210
        # instructions per 2 candidates): nu > 0, or some mu_k >= MU_USEFUL H_kk. Not on singular blocks (mu = nu =
        # 0), nor where every channel is nearly collinear with another (mu_k ~ (1 - rho^2) H_kk, 2e-6 H_kk on the
        # collinear family: max_k mu_k e_k^2 beats the best only for errors ~700x the rounding error; the CPU
        # simulation, bench/tools/sim_walk.py, walks the same candidates there with and without them, while with
        # one collinear pair per block, mu ~ 0.97 H_kk on the other channels, they halve the walk)
        clip = nsum > 0.0
        for k in tl.static_range(16):
            clip = clip | (tl.load(mb + k) >= MU_USEFUL * sd[k] * sd[k])
        rsum = 0.0
        for k in tl.static_range(16):
            rk = tl.load(rdp + k)
            rd = rd + (rk,)
            rsum = rsum + rk
        reg = rsum > 0.0

    # 1. windows of the chunk's rows
    bad = tl.zeros([BR], tl.int32)
    for t in range(r0, r_end, BR):
        rows = t + lane
        ok = rows < r_end
        w, m = _load_block(wcol + rows * stride_wr, ok, stride_wc)
        if FUSED:
            for k in tl.static_range(16):
                bad = bad | ((w[k] != w[k]) | (tl.abs(w[k]) == float("inf"))).to(tl.int32)
        first = _first_at_or_below(m, s_ptr, r_ptr, 3.0, sg, FUSED)
        nohalf = tl.load(nohalf_ptr + tl.minimum(first, N_CAND - 1))
        top = tl.where(first >= N_CAND, N_CAND - 1, tl.maximum(first - 1, nohalf))  # >= 0: nohalf[0] >= 0
        if HESSIAN:
            zero_at = tl.minimum(_first_at_or_below(m, s_ptr, r_ptr, 0.25, sg, FUSED), N_CAND - 1)
        else:
            zero_at = top  # mse: no upward phase
        tl.store(oi_ptr + ocol + rows * nb, top | (zero_at << 8), mask=ok)
    if FUSED:
        tl.atomic_max(stats_ptr, 1, mask=tl.max(bad) > 0)
    tl.debug_barrier()  # step 2's lanes read rows another lane's step 1 wrote

    # 2. the walk, with lane refill
    row = tl.zeros([BR], tl.int64)
    w = ()
    for _k in tl.static_range(16):
        w = w + (tl.zeros([BR], tl.float32),)
    c = tl.zeros([BR], tl.int32)
    top = tl.zeros([BR], tl.int32)
    zero_at = tl.zeros([BR], tl.int32)
    down = tl.zeros([BR], tl.int1)
    live = tl.zeros([BR], tl.int1)  # walking a block
    has = tl.zeros([BR], tl.int1)  # holds a block whose record is not written yet
    best = tl.full([BR], float("inf"), tl.float32)
    bmar = tl.zeros([BR], tl.float32)
    low1 = tl.full([BR], float("inf"), tl.float32)
    low2 = tl.full([BR], float("inf"), tl.float32)
    r1 = tl.zeros([BR], tl.int32)
    c_lo = tl.zeros([BR], tl.int32)  # the window each block walked (for the float64 pass)
    c_hi = tl.zeros([BR], tl.int32)
    best_idx = tl.zeros([BR], tl.int32)
    next_row = r0
    n_live = 0
    n_fin = 0
    steps = 0
    work = 0
    while (n_live > 0) | (next_row < r_end):
        if (next_row < r_end) & ((n_fin >= REFILL) | (n_live == 0)):
            take = ~live
            _emit(oi_ptr + ocol + row * nb, take & has, best, bmar, best_idx, low1, low2, r1, c_lo, c_hi,
                  HESSIAN and EXACT)
            nr = next_row + tl.cumsum(take.to(tl.int64), 0) - take.to(tl.int64)
            got = take & (nr < r_end)
            next_row += BR - n_live
            row = tl.where(take, nr, row)
            wn, _ = _load_block(wcol + row * stride_wr, got, stride_wc, plo, phi, HESSIAN)
            nw = ()
            for k in tl.static_range(16):
                nw = nw + (tl.where(got, wn[k], w[k]),)
            w = nw
            win = tl.load(oi_ptr + ocol + row * nb, mask=got, other=0)
            top = tl.where(got, win & 255, top)
            zero_at = tl.where(got, win >> 8, zero_at)
            c = tl.where(got, top, c)
            down = down | got
            has = live | got
            live = has
            best = tl.where(got, float("inf"), best)
            bmar = tl.where(got, 0.0, bmar)
            low1 = tl.where(got, float("inf"), low1)
            low2 = tl.where(got, float("inf"), low2)
            c_lo = tl.where(got, top, c_lo)
            c_hi = tl.where(got, top, c_hi)
        steps += UNROLL
        if STATS:
            work += tl.sum(live.to(tl.int32)) * UNROLL
        for u in tl.static_range(UNROLL):
            cc = tl.minimum(tl.maximum(c, 0), N_CAND - 1)
            if HESSIAN and EXACT:
                c_lo = tl.where(live & down, cc, c_lo)
                c_hi = tl.where(live & ~down, cc, c_hi)
            s, r = _candidate(s_ptr, r_ptr, cc, sg, FUSED)
            best, bmar, best_idx, low1, low2, r1 = _consider(w, cc, s, r, live, down, best, bmar, best_idx, low1,
                                                             low2, r1, fv, sd, rd, reg, lr, tau, lrel,
                                                             HESSIAN)
            c = tl.where(down, c - 1, c + 1)
            if u == UNROLL - 1:
                # the bounds, tested at the next candidate each lane would try (covering it and all beyond)
                thr = tl.maximum(best + bmar, 0.0) * SLACK
                s_next = _scale(s_ptr, tl.minimum(tl.maximum(c, 0), N_CAND - 1), sg, FUSED)
                if clip:
                    bound = _clip_bound(w, mb, nbp, s_next * E2M1_TOP, HESSIAN)
                else:
                    bound = tl.zeros([BR], tl.float32)
                if HESSIAN:
                    # the box bound costs a product: tested at every BOX_EVERY-th check (kernels._BOX_EVERY, measured:
                    # 4, every 4 UNROLL candidates); a few candidates more per block, a quarter of the products
                    if weak & ((steps // UNROLL) % BOX_EVERY == 0):
                        bound = tl.maximum(bound, _box_bound(w, s_next, fv, sd, rd, lr))
                stop = down & (bound > thr)
                if HESSIAN:
                    if clip:
                        up = _up_bound(w, mb, nbp, 0.5 * s_next)
                        live = live & ~(~down & (up > thr))
                # the downward walk ends (bound, or below candidate 0): the upward one starts above the top
                stop = stop | (down & (c < 0))
            else:
                stop = down & (c < 0)
            c = tl.where(stop, top + 1, c)
            down = down & ~stop
            live = live & ~(~down & (c > zero_at))
        # one reduction per step: the lanes walking, and those finished whose record is not written yet
        cnt = tl.sum(live.to(tl.int32) + ((has & ~live).to(tl.int32) << 8))
        n_live = cnt & 255
        n_fin = cnt >> 8
    _emit(oi_ptr + ocol + row * nb, has, best, bmar, best_idx, low1, low2, r1, c_lo, c_hi, HESSIAN and EXACT)
    tl.debug_barrier()  # step 3 reads records other lanes wrote

    # 3. picks, float64 list, losses: BR rows at a time
    n1_all = 0
    n2_all = 0
    for t in range(r0, r_end, BR):
        rows = t + lane
        ok = rows < r_end
        rec = tl.load(oi_ptr + ocol + rows * nb, mask=ok, other=0)
        pick = rec & 127
        v_best = tl.load(v_ptr + pick).to(tl.float64)
        amax = ((g.to(tl.float64) * v_best) / FP8_TOP).to(tl.float32)
        tl.store(out_ptr + ocol + rows * nb, amax, mask=ok)
        if LOSSES:
            wl, ml = _load_block(wcol + rows * stride_wr, ok, stride_wc)
            s_max, r_max = _max_scale(ml, g, v_ptr)
            l_max = tl.where(ok, _loss64(wl, s_max, r_max, hb, HESSIAN), 0.0)
            s_b, r_b = _candidate(s_ptr, r_ptr, pick, sg, FUSED)
            l_best = tl.where(ok, _loss64(wl, s_b, r_b, hb, HESSIAN), 0.0)
            tl.atomic_add(loss_ptr + e * 2, tl.sum(l_max, axis=0))
            tl.atomic_add(loss_ptr + e * 2 + 1, tl.sum(l_best, axis=0))
        if HESSIAN and EXACT:
            mode = (rec >> 28) & 3
            blk = ((e * cout + rows) * nb + j).to(tl.int32)
            lst = rec & 0x0FFFFFFF
            near1 = ok & (mode == 1)  # from the front of the list
            n1 = tl.sum(near1.to(tl.int32))
            if n1 > 0:
                slot = tl.atomic_add(cnt_ptr, n1) + tl.cumsum(near1.to(tl.int32), 0) - near1.to(tl.int32)
                tl.store(list_ptr + 2 * slot, blk, mask=near1)
                tl.store(list_ptr + 2 * slot + 1, lst, mask=near1)
            near2 = ok & (mode == 2)  # from the back: the float64 pass runs the two kinds in separate steps
            n2 = tl.sum(near2.to(tl.int32))
            if n2 > 0:
                slot = cap - 1 - (tl.atomic_add(cnt_ptr + 1, n2) + tl.cumsum(near2.to(tl.int32), 0)
                                  - near2.to(tl.int32))
                tl.store(list_ptr + 2 * slot, blk, mask=near2)
                tl.store(list_ptr + 2 * slot + 1, lst, mask=near2)
            n1_all += n1
            n2_all += n2
    if STATS:
        pid = (e * tl.num_programs(1) + j) * tl.num_programs(0) + pid_r
        if not FUSED:
            tl.store(stats_ptr + pid * 4, steps)
            tl.store(stats_ptr + pid * 4 + 1, (r_end - r0).to(tl.int32))
            tl.store(stats_ptr + pid * 4 + 2, work)
        if HESSIAN and EXACT:
            tl.store(stats_ptr + pid * 4 + 3, n1_all + (n2_all << 16))
