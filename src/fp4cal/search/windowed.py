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

Blocks are processed as one flat batch; each step evaluates one candidate for every block still active, and
finished blocks leave the batch, so the cost is the number of candidates the windows actually visit.
"""

from __future__ import annotations

import torch

from fp4cal.numerics import (
    FP8_MAX,
    N_SCALE_CANDIDATES,
    block_scale_code,
    fp8_e4m3_values,
    global_scale,
    scale_candidates,
)
from fp4cal.search.hessian_blocks import with_fallback
from fp4cal.search.reference import block_error, block_loss, reference_losses, search_reference
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
    if w.device.type == "cpu" and threads > 1:
        # The ops here are a few MB each: with 2 threads on a loaded 2-core machine their barriers cost 10x the
        # work (measured: MiniLM's search 221 s with 2 threads, 20 s with 1).
        torch.set_num_threads(1)
    try:
        if w.dim() == 3:
            outs = []
            for e in range(w.shape[0]):
                h = None if method != "local_hessian" else (hessian[e] if hessian.dim() == 4 else hessian)
                le = None if losses is None else losses[e : e + 1]
                outs.append(_search(w[e], method, g.reshape(-1)[e if g.numel() > 1 else 0], h, le))
            return torch.stack(outs)
        return _search(w, method, g, hessian, losses)
    finally:
        torch.set_num_threads(threads)


def _search(w: torch.Tensor, method: str, g: torch.Tensor, hessian: torch.Tensor | None,
            losses: torch.Tensor | None) -> torch.Tensor:
    """One 2-D weight [cout, cin]; g []; losses None or float64 [1, 2] to add to."""
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
        bounds = (hd, mu, nu, sd, singular)
    rows = max(1, _CHUNK_ELEMS // cin)
    idx = torch.empty(cout, nb, dtype=torch.int64, device=w.device)
    for r0 in range(0, cout, rows):
        wb = w[r0 : r0 + rows].float().reshape(-1, nb, BLOCK)
        idx[r0 : r0 + rows], best = _search_rows(wb, s_tab, bounds)
        if losses is not None:  # the chosen loss is the search's own best; the max scales' loss is one more step
            s_max = block_scale_code(wb.abs().amax(-1), s_g) * s_g
            losses[0, 0] += block_loss(block_error(wb, s_max), hd).sum()
            losses[0, 1] += best.sum()
    return scale_candidates(g)[idx]


_CHUNK_ELEMS = 1 << 18  # weights per chunk of rows: float64 temporaries of a few MB


def _search_rows(
    wb: torch.Tensor, s_tab: torch.Tensor, bounds: tuple | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best candidate index int64 [R, nb], its float64 loss [R, nb]) of blocks wb [R, nb, 16] fp32 with
    candidate scales s_tab [126];
    bounds: None (mse) or (H float64 [nb, 16, 16] with the fallback applied, mu, nu, sd [nb, 16]).

    Every step evaluates one candidate for every block of the rows that still have an active block (the
    Hessian is shared along a block column, so the loss is one batched product, no per-block gather)."""
    a = wb.abs()
    m = a.amax(-1)
    first = _first_at_or_below(m, s_tab, 3.0)
    nohalf = nohalf_table().to(wb.device)
    top = torch.where(first >= N_CAND, N_CAND - 1, torch.maximum(first - 1, nohalf[first.clamp_max(N_CAND - 1)]))
    best = torch.full(m.shape, float("inf"), dtype=torch.float64, device=wb.device)
    best_idx = torch.zeros(m.shape, dtype=torch.int64, device=wb.device)
    hd = None if bounds is None else bounds[0]
    zero_at = None if hd is None else _first_at_or_below(m, s_tab, 0.25).clamp_max(N_CAND - 1)

    def sub_bounds(ci):
        return None if bounds is None else tuple(b if b is None or b is True else b[ci] for b in bounds)

    def walk(c, active, down):
        step = 0
        while True:
            live_r, live_c = active.any(1), active.any(0)
            n_r, n_c = int(live_r.sum()), int(live_c.sum())
            if n_r == 0:
                return
            # the rectangle of rows and block columns that still hold an active block (the Hessian is per block
            # column, so the loss stays one batched product); whole axes, no gather, while most are live
            r = slice(None) if 2 * n_r > live_r.numel() else live_r.nonzero().squeeze(1)
            ci = slice(None) if 4 * n_c > 3 * live_c.numel() else live_c.nonzero().squeeze(1)
            ix = (r, ci) if isinstance(r, slice) or isinstance(ci, slice) else (r[:, None], ci[None, :])
            bd = sub_bounds(ci)
            cr, ar = c[ix], active[ix]
            cc = cr.clamp(0, N_CAND - 1)
            wr, ar_abs = wb[ix], a[ix]
            q = _e2m1_times_scale(ar_abs, s_tab[cc].unsqueeze(-1))
            loss = block_loss(wr - torch.copysign(q, wr), None if bd is None else bd[0])  # RNE is symmetric
            b = best[ix]
            better = ar & ((loss <= b) if down else (loss < b))  # ties: the smaller candidate
            best[ix] = torch.where(better, loss, b)
            best_idx[ix] = torch.where(better, cc, best_idx[ix])
            cr = cr - 1 if down else cr + 1
            ar = ar & ((cr >= 0) if down else (cr <= zero_at[ix]))
            if step % 2 == 1:  # the bounds hold for every candidate beyond, so testing every other step is safe
                cn = cr.clamp(0, N_CAND - 1)
                if down:
                    bound = _down_bound(wr, ar_abs, s_tab[cn], bd)
                else:
                    bound = _up_bound(ar_abs, s_tab[cn], bd)
                # above max(best, 0): with H's fp32 rounding noise a loss can be slightly negative, a trivial bound is 0
                ar = ar & ~(bound > best[ix].clamp_min(0.0) * (1 + _SLACK))
            c[ix] = cr
            active[ix] = ar
            step += 1

    walk(top.clone(), top >= 0, True)
    if hd is not None:
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
    """float64 [r, nb]: a lower bound of the loss of every candidate at or below scales s [r, nb] (module
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
    """float64 [r, nb]: max(max_i mu_i l_i^2, sum_i nu_i l_i^2), l_i the error floor at every candidate at or
    above scales s [r, nb]."""
    half = (s * 0.5).unsqueeze(-1).double()
    ad = a.double()
    low = torch.minimum(ad, (half - ad).clamp_min(0.0))
    low2 = low * low
    _, mu, nu, _, _ = bounds
    return torch.maximum((low2 * mu).amax(-1), (low2 * nu).sum(-1))


def _box_bound(wb, a, s, six, hd, sd):
    """float64 [r, nb]: the box bound (module docstring) for every candidate at or below scales s [r, nb]; wb, a:
    the blocks' fp32 weights and |weights| [r, nb, 16]; six = fp32(6 s) [r, nb, 1]; hd [nb, 16, 16]; sd [nb, 16]."""
    ad = a.double()
    sc = s.double().unsqueeze(-1)
    lo = torch.where(a >= six, (a - six).double(), -torch.minimum(sc, ad))
    centre = (lo + ad) * 0.5
    rho = (ad - lo) * 0.5 + _SLACK * (ad + sc)  # + the fp32 rounding of the errors
    m = torch.where(wb < 0, -centre, centre)
    norm = (torch.einsum("rnk,nkl->rnl", m, hd) * m).sum(-1).clamp_min(0).sqrt() * (1 - _SLACK)
    return (norm - (rho * sd).sum(-1)).clamp_min(0.0).square()


assert FP8_MAX == 448.0  # the candidate values are the 126 finite positive E4M3 numbers up to 448
