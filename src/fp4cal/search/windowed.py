"""The CPU path of the scale search: the kernels' candidate windows and pruning bounds, vectorised in PyTorch.

Picks what the brute-force reference (reference.py) picks: every block walks the kernels' window (down from
the MSE top, then, for local_hessian, up to its first all-zero candidate) and stops a direction only when a
lower bound proves that no candidate left in it can beat (or tie) the best loss so far. Losses are the
reference's float64 objective of the same fp32 errors (reference.block_error), so a skipped candidate is
never the argmin and ties still go to the smaller candidate. The windows and bounds, with proofs, are in
fp4cal.search.kernels' docstring; here the bounds are evaluated in float64:

- down (every candidate c' <= c): the clipping bound (sum of clipped errors^2 for mse; max_i mu_i e_i^2 for
  local_hessian) and, for local_hessian, the box bound: at every c' <= c each signed error lies in a known
  interval (a clipped weight's error grows from |w| - 6 s_c towards |w|; any other error is at most
  min(s_c, |w|) below 0 and at most |w| above), so with m the interval centres and rho their half widths,
  dw^T H dw >= max(0, sqrt(m^T H m) - sum_i rho_i sqrt(H_ii))^2. It needs no definite H, so it also prunes
  singular and ill-conditioned blocks, whose mu is 0.
- up (local_hessian): max(max_i mu_i l_i^2, sum_i nu_i l_i^2) with l_i the per-weight error floor.

Blocks are held block-column major, [nb, R, 16], since a block column shares its Hessian: each step evaluates one
candidate for every block the walk still holds, and the loss is one bmm against H [nb, 16, 16]
(reference.block_loss_cols, the reference's own loss function). Finished blocks leave: every few steps each
block column keeps only the rows of its active blocks (_Batch), so the cost is close to the number of candidates
the windows actually visit (MiniLM: 16.5 per block visited, 20.3 evaluated; 26.4 with whole rows and columns).
With torch's thread count above 1, worker threads search whole chunks of rows at once (search_windowed).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from fp4cal.numerics import (
    FP8_MAX,
    N_SCALE_CANDIDATES,
    block_scale,
    fp8_e4m3_values,
    global_scale,
    scale_candidates,
)
from fp4cal.search.hessian_blocks import with_fallback
from fp4cal.search.reference import block_error, block_loss_cols, reference_losses, search_reference
from fp4cal.validation import BLOCK

N_CAND = N_SCALE_CANDIDATES  # the constant lives once, in numerics
# s_g range where the fast rounding needs no zero-scale or overflow case (the kernels use the same range).
_SG_MIN = 2.0**-60
_SG_MAX = 2.0**60
# Relative slack of the float64 bounds (they are computed from fp32 quantities and float64 eigenvalues).
_SLACK = 1e-6


def nohalf_table() -> torch.Tensor:
    """int64 [126]: for candidate c, the largest c' >= c whose FP8 value has no half among the candidates (-1 if
    none). Candidates above nohalf[first] are dominated for mse (kernels' docstring, 'MSE, top')."""
    v = fp8_e4m3_values().tolist()
    vals = set(v)
    out, last = [0] * N_CAND, -1
    for c in range(N_CAND - 1, -1, -1):
        if last < 0 and v[c] / 2 not in vals:
            last = c
        out[c] = last
    return torch.tensor(out, dtype=torch.int64)


def block_bounds(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, nu, sd) float64 [..., 16] of PSD blocks h [..., 16, 16], the lower-bound coefficients:

    mu_i = min{dw^T H dw : dw_i = 1} = 1 / (H_AA^-1)_ii on the channels A whose row of H is non-zero (a zero
    row does not enter the loss), 0 off A or when H_AA is singular; nu_i = lambda H_ii with lambda the smallest
    eigenvalue of D^-1/2 H_AA D^-1/2, D = diag(H) (0 if not positive; the kernels use Gershgorin's bound on it);
    sd_i = sqrt(H_ii). All slightly shrunk (mu, nu) or grown (sd) so that they stay bounds after rounding.
    """
    hd = h.double()
    hd = (hd + hd.transpose(-1, -2)) * 0.5
    diag = torch.diagonal(hd, dim1=-2, dim2=-1)
    live = diag > 0  # [..., 16]
    # a zero diagonal with a non-zero row is not PSD-exact (only within tolerance): no bound for that block
    odd = ((~live) & (hd.abs().amax(-1) > 0)).any(-1)
    eye = torch.eye(BLOCK, dtype=torch.float64, device=h.device)
    pair = live[..., :, None] & live[..., None, :]
    ha = torch.where(pair, hd, eye)  # dead channels become identity rows: H_AA on A, decoupled elsewhere
    d = torch.diagonal(ha, dim1=-2, dim2=-1)
    isd = d.clamp_min(1e-300).rsqrt()
    # N = D^-1/2 H_AA D^-1/2 (unit diagonal): scale-free, so channels of very different magnitude stay definite.
    # (H_AA^-1)_ii = (N^-1)_ii / d_i, and H_AA >= lambda_min(N) D.
    lam, vec = torch.linalg.eigh(ha * isd[..., :, None] * isd[..., None, :])
    lmin = lam[..., 0]
    definite = (lmin > 1e-10) & ~odd
    safe = torch.where(definite[..., None], lam, 1.0)
    ninv_diag = (vec * vec / safe[..., None, :]).sum(-1)
    # float64 eigenvectors carry ~16 eps / lambda_min relative error into N^-1: shrink by that much more
    shrink = (1 - _SLACK - 64 * 2.0**-52 / torch.where(definite, lmin, 1.0))[..., None]
    mu = torch.where(live & definite[..., None], shrink * d / ninv_diag, 0.0)
    lam_g = torch.where(definite, (lmin - 1e-13).clamp_min(0.0) * (1 - _SLACK), 0.0)
    nu = torch.where(live, lam_g[..., None] * d, 0.0)
    sd = torch.diagonal(hd, dim1=-2, dim2=-1).clamp_min(0).sqrt() * (1 + _SLACK)
    return mu, nu, sd


def _first_at_or_below(m: torch.Tensor, s_tab: torch.Tensor, t: float) -> torch.Tensor:
    """int64 (m's shape): per block, the first candidate c with fp32(m / s_c) <= t (126 if none), by a 7-step
    binary search (m / s_c falls as c rises). m: fp32 block maxima; s_tab [126]. A zero scale counts as x = 0,
    as in the kernels (its r = 0)."""
    lo = torch.zeros(m.shape, dtype=torch.int64, device=m.device)
    hi = torch.full_like(lo, N_CAND)
    for _ in range(7):
        mid = (lo + hi) // 2
        ok = mid < N_CAND
        s = s_tab[mid.clamp_max(N_CAND - 1)]
        x = torch.where(s > 0, m / torch.where(s > 0, s, 1.0), 0.0)
        below = (x <= t) & ok
        hi = torch.where(below, mid, hi)
        lo = torch.where(below | ~ok, lo, mid + 1)
    return lo


def search_windowed(
    w: torch.Tensor,
    method: str,
    g: torch.Tensor,
    hessian: torch.Tensor | None = None,
    losses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block best amax, fp32 [..., cout, cin/16], for validated inputs (as search_reference), with the
    kernels' windows and bounds. w: [cout, cin] or [E, cout, cin]; g: fp32 [] or [E]; hessian [nb, 16, 16] or
    [E, nb, 16, 16] (local_hessian only; an expert stack may share one). losses: optional float64 [E or 1, 2]
    zeros: filled with each tensor's objective at its 'max' scales and at the chosen ones (reference_losses;
    the chosen one is the search's own best, no second pass)."""
    threads = torch.get_num_threads()
    # torch's thread count is the budget: on the CPU, up to that many workers (at most _MAX_WORKERS) each search
    # their own chunks of rows with one intra-op thread. The ops here are a few MB each: splitting each op over 2
    # threads on a loaded 2-core machine cost 10x the work in barriers (MiniLM's search 221 s against 20 s with 1);
    # whole chunks per thread share nothing but the GIL, which torch releases inside each op.
    workers = min(threads, _MAX_WORKERS) if w.device.type == "cpu" else 1
    if w.device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        if w.dim() == 3:
            outs = []
            for e in range(w.shape[0]):
                h = None if method != "local_hessian" else (hessian[e] if hessian.dim() == 4 else hessian)
                le = None if losses is None else losses[e : e + 1]
                outs.append(_search(w[e], method, g.reshape(-1)[e if g.numel() > 1 else 0], h, le, workers))
            return torch.stack(outs)
        return _search(w, method, g, hessian, losses, workers)
    finally:
        torch.set_num_threads(threads)


def _search(w: torch.Tensor, method: str, g: torch.Tensor, hessian: torch.Tensor | None,
            losses: torch.Tensor | None, workers: int = 1) -> torch.Tensor:
    """One 2-D weight [cout, cin]; g []; losses None or float64 [1, 2] to add to; workers: threads, each taking
    whole chunks of rows (the picks do not depend on it, but for exact float64 ties: reference.block_loss)."""
    hess = method == "local_hessian"
    cout, cin = w.shape
    nb = cin // BLOCK
    s_g = global_scale(g.float())
    if not _SG_MIN <= float(s_g) <= _SG_MAX:  # g = 0 or extreme: the reference (as the kernels do)
        out = search_reference(w, method, g, hessian)
        if losses is not None:
            losses += reference_losses(w, g, out, hessian if hess else None)
        return out
    s_tab = fp8_e4m3_values(w.device) * s_g  # [126] = reference.candidate_block_scales
    bounds = None
    hd = None
    if hess:
        hd = with_fallback(hessian.double())
        mu, nu, sd = block_bounds(hd)
        # the box bound costs a quadratic form per test: only where the clipping bound is weak (mu = 0 somewhere)
        singular = True if bool((mu == 0).any()) else None
        # [nb, 1, 16]: broadcast over the rows of the block-column-major blocks
        bounds = (hd, mu.unsqueeze(1), nu.unsqueeze(1), sd.unsqueeze(1), singular)
    chunks = -(-cout // max(1, _CHUNK_ELEMS // cin))  # at most _CHUNK_ELEMS weights each
    workers = max(1, min(workers, cout * cin // _MIN_CHUNK_ELEMS, cout))  # none with too thin a chunk
    chunks = -(-chunks // workers) * workers  # a multiple of the workers, all of about one size
    rows = -(-cout // chunks)
    idx = torch.empty(cout, nb, dtype=torch.int64, device=w.device)

    def one_chunk(r0):
        if workers > 1:  # a new thread: its intra-op thread count is not the caller's
            torch.set_num_threads(1)
        # block-column major [nb, R, 16]: the loss is then one bmm against H [nb, 16, 16], no permuted copies
        wt = w[r0 : r0 + rows].float().reshape(-1, nb, BLOCK).transpose(0, 1).contiguous()
        chosen, best = _search_rows(wt, s_tab, bounds)
        idx[r0 : r0 + rows] = chosen.T
        if losses is None:
            return None
        # the chosen loss is the search's own best; the max scales' loss is one more step, on the same layout
        s_max = block_scale(wt.abs().amax(-1), s_g)
        return block_loss_cols(block_error(wt, s_max).double(), hd).sum(), best.sum()

    starts = range(0, cout, rows)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one_chunk, starts))
    else:
        parts = [one_chunk(r0) for r0 in starts]
    if losses is not None:
        for lmax, lbest in parts:  # summed in chunk order, whatever the workers' timing
            losses[0, 0] += lmax
            losses[0, 1] += lbest
    return scale_candidates(g)[idx]


_CHUNK_ELEMS = 1 << 18  # weights per chunk of rows: float64 temporaries of a few MB
# A walk gathers its blocks anew when the longest column's active list falls to _KEEP_ROWS of the batch's K, or the
# live columns to _KEEP_COLS of its columns: a gather costs about one step, a step pays for every padded entry.
_KEEP_ROWS = 0.6
_KEEP_COLS = 0.5
# Threads searching chunks of rows at once: torch.get_num_threads() of them, at most _MAX_WORKERS, and no more
# than give each a chunk of _MIN_CHUNK_ELEMS weights. Each op's dispatch holds the GIL, so the threads contend for
# it: MiniLM's search on a 16-core Xeon took 3.84 s with 1 thread, 2.69 s with 2, 3.97 s with 4, 9.46 s with 16.
_MAX_WORKERS = 2
_MIN_CHUNK_ELEMS = 1 << 15


class _Batch:
    """The blocks a walk still evaluates, gathered per block column into contiguous tensors [n_c, K(, 16)].

    Block column j keeps the rows of its active blocks (its Hessian is shared along the column, so the loss stays
    one bmm over the kept columns); each column's list is padded to the longest, K, with inactive entries. When K or
    the number of live columns falls below a fraction of the batch's (_KEEP_ROWS, _KEEP_COLS), the batch is gathered
    anew (a few times per walk), so the steps in between index nothing."""

    def __init__(self, wt, at, c, active, best, best_idx, zero_at, bounds):
        self.src = (wt, at, zero_at, bounds)
        self.best, self.best_idx = best, best_idx  # the chunk's [nb, R] results, written back at each gather
        nb, r = c.shape
        self.cols = torch.arange(nb, device=c.device)[:, None]
        self.rows = torch.arange(r, device=c.device).expand(nb, r)
        self.c, self.active = c, active
        self.w, self.a, self.zero_at, self.bounds = wt, at, zero_at, bounds
        self.b, self.bi = best.clone(), best_idx.clone()
        self.pad = None  # bool [n_c, K]: entries that stand for no block

    def flush(self) -> None:
        """Write the batch's best losses and picks back into the chunk's."""
        if self.pad is None:
            ix, b, bi = (self.cols, self.rows), self.b, self.bi
        else:
            keep = ~self.pad
            ix, b, bi = (self.cols.expand_as(self.rows)[keep], self.rows[keep]), self.b[keep], self.bi[keep]
        self.best.index_put_(ix, b)
        self.best_idx.index_put_(ix, bi)

    def shrink(self, count: torch.Tensor, k: int) -> None:
        """Keep, per live column (count > 0), its active entries, count [n_c] of them, padded to k."""
        self.flush()
        live = (count > 0).nonzero().squeeze(1)
        # per column, the active entries first, in row order (a stable sort of the inactive flags)
        order = torch.sort((~self.active[live]).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        self.pad = torch.arange(k, device=count.device)[None, :] >= count[live][:, None]

        def take(t):
            return t[live].gather(1, order)

        self.rows, self.c, self.active, self.b, self.bi = (take(t) for t in (self.rows, self.c, self.active,
                                                                             self.b, self.bi))
        self.active &= ~self.pad
        self.cols = self.cols[live]
        wt, at, zero_at, bounds = self.src
        ix = (self.cols, self.rows)
        self.w, self.a = wt[ix], at[ix]
        self.zero_at = None if zero_at is None else zero_at[ix]
        cols = self.cols.squeeze(1)
        self.bounds = None if bounds is None else tuple(
            b if b is None or isinstance(b, bool) else b.index_select(0, cols) for b in bounds)


def _search_rows(
    wt: torch.Tensor, s_tab: torch.Tensor, bounds: tuple | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best candidate index int64 [nb, R], its float64 loss [nb, R]) of blocks wt [nb, R, 16] fp32 (block-column
    major) with candidate scales s_tab [126];
    bounds: None (mse) or (H float64 [nb, 16, 16] with the fallback applied; mu, nu, sd float64 [nb, 1, 16]; True
    where the box bound is needed, else None).

    Every step evaluates one candidate for every block the walk still holds (_Batch: per block column, the rows
    of its active blocks), so the loss is one bmm per step."""
    a = wt.abs()
    m = a.amax(-1)
    first = _first_at_or_below(m, s_tab, 3.0)
    nohalf = nohalf_table().to(wt.device)
    top = torch.where(first >= N_CAND, N_CAND - 1, torch.maximum(first - 1, nohalf[first.clamp_max(N_CAND - 1)]))
    best = torch.full(m.shape, float("inf"), dtype=torch.float64, device=wt.device)
    best_idx = torch.zeros(m.shape, dtype=torch.int64, device=wt.device)
    zero_at = None if bounds is None else _first_at_or_below(m, s_tab, 0.25).clamp_max(N_CAND - 1)

    def walk(c, active, down):
        batch = _Batch(wt, a, c, active, best, best_idx, zero_at, bounds)
        step = 0
        while True:
            count = batch.active.sum(1)
            k = int(count.max())
            if k == 0:
                batch.flush()
                return
            n_c = int((count > 0).sum())
            if k <= _KEEP_ROWS * batch.c.shape[1] or n_c <= _KEEP_COLS * count.numel():
                batch.shrink(count, k)
            bd = batch.bounds
            cc = batch.c.clamp(0, N_CAND - 1)
            q = _e2m1_times_scale(batch.a, s_tab[cc].unsqueeze(-1))
            loss = block_loss_cols((batch.w - torch.copysign(q, batch.w)).double(), None if bd is None else bd[0])
            b = batch.b
            better = batch.active & ((loss <= b) if down else (loss < b))  # ties: the smaller candidate
            batch.b = torch.where(better, loss, b)
            batch.bi = torch.where(better, cc, batch.bi)
            cr = batch.c - 1 if down else batch.c + 1
            ar = batch.active & ((cr >= 0) if down else (cr <= batch.zero_at))
            if step % 2 == 1:  # the bounds hold for every candidate beyond, so testing every other step is safe
                s_next = s_tab[cr.clamp(0, N_CAND - 1)]
                if down:
                    bound = _down_bound(batch.w, batch.a, s_next, bd)
                else:
                    bound = _up_bound(batch.a, s_next, bd)
                # above max(best, 0): with H's fp32 rounding noise a loss can be slightly negative, a trivial bound is 0
                ar = ar & ~(bound > batch.b.clamp_min(0.0) * (1 + _SLACK))
            batch.c, batch.active = cr, ar
            step += 1

    walk(top.clone(), top >= 0, True)
    if bounds is not None:
        c = top + 1
        walk(c, c <= zero_at, False)
    return best_idx, best


def _e2m1_times_scale(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """reference.e2m1_times_scale for scales s > 0 (the caller sends s_g outside [2^-60, 2^60] to the
    reference, so no scale is 0 and x never overflows), in fewer passes: the same ops, in place."""
    x = (a / s).clamp_max_(8.0)
    xb = (x.view(torch.int32) & 0x7F800000).clamp_(0x3F800000, 0x40800000).add_(22 << 23)
    magic = xb.view(torch.float32)
    return x.add_(magic).sub_(magic).clamp_max_(6.0).mul_(s)


def _down_bound(wb, a, s, bounds):
    """float64 [n, K]: a lower bound of the loss of every candidate at or below scales s [n, K] (module
    docstring): the clipping bound, and for local_hessian blocks whose mu is 0 (singular) the box bound."""
    six = (s * 6.0).unsqueeze(-1)
    err = torch.where(a >= six, a - six, 0.0).double()
    if bounds is None:
        return (err * err).sum(-1)
    hd, mu, nu, sd, singular = bounds
    e2 = err * err
    bound = torch.maximum((e2 * mu).amax(-1), (e2 * nu).sum(-1))
    if singular is not None:
        bound = torch.maximum(bound, _box_bound(wb, a, s, six, hd, sd))
    return bound


def _up_bound(a, s, bounds):
    """float64 [n, K]: max(max_i mu_i l_i^2, sum_i nu_i l_i^2), l_i the error floor at every candidate at or
    above scales s [n, K] (a [n, K, 16]; mu, nu [n, 1, 16])."""
    half = (s * 0.5).unsqueeze(-1).double()
    ad = a.double()
    low = torch.minimum(ad, (half - ad).clamp_min(0.0))
    low2 = low * low
    _, mu, nu, _, _ = bounds
    return torch.maximum((low2 * mu).amax(-1), (low2 * nu).sum(-1))


def _box_bound(wb, a, s, six, hd, sd):
    """float64 [n, K]: the box bound (module docstring) for every candidate at or below scales s [n, K]; wb, a:
    the blocks' fp32 weights and |weights| [n, K, 16] (n block columns, K blocks each); six = fp32(6 s) [n, K, 1];
    hd [n, 16, 16]; sd [n, 1, 16]."""
    ad = a.double()
    sc = s.double().unsqueeze(-1)
    lo = torch.where(a >= six, (a - six).double(), -torch.minimum(sc, ad))
    centre = (lo + ad) * 0.5
    rho = (ad - lo) * 0.5 + _SLACK * (ad + sc)  # + the fp32 rounding of the errors
    m = torch.where(wb < 0, -centre, centre)
    norm = (torch.bmm(m, hd) * m).sum(-1).clamp_min(0).sqrt() * (1 - _SLACK)
    return (norm - (rho * sd).sum(-1)).clamp_min(0.0).square()


assert FP8_MAX == 448.0  # the candidate values are the 126 finite positive E4M3 numbers up to 448
