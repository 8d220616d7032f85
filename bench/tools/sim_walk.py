# Helper "search3" (2026-11-30): CPU simulation of the sweep walk (warp steps per family); not run by CI.
"""CPU simulation of the sweep's walk per Hessian family (mirrors sweep_rows.py's phases, bounds, UNROLL=2)."""

import math
import os
import sys

import torch

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from fp4cal.numerics import fp8_e4m3_values, global_scale
from fp4cal.search.reference import block_error
from fp4cal.search.windowed import _first_at_or_below, nohalf_table
from kernel_cases import make_ill_hessian

torch.set_num_threads(1)
TAU = 2.0**-18
SLACK = 1.0001
REG = 2.0**-14
N = 126


def make_case_h(cin, seed=0, tokens=4096):
    torch.manual_seed(seed)
    chan = torch.exp(torch.randn(cin))
    x = torch.randn(tokens, cin) * chan
    xb = x.T.reshape(cin // 16, 16, tokens)
    return (xb @ xb.transpose(-1, -2)) / tokens


def factor(h):
    from fp4cal.search.kernels import hessian_factor

    F, mu, nu, rd, _rk = hessian_factor(h.float())
    return F.double(), mu.double(), nu.double(), rd.double(), rd.sum(-1) > 0


def factor_old(h):
    """kernel's factor: (F, mu, nu, rd, singular) float64."""
    a = (h.double() + h.double().transpose(-1, -2)) / 2
    d = torch.diagonal(a, dim1=-2, dim2=-1)
    L, info = torch.linalg.cholesky_ex(a)
    # kernel: singular if a live pivot <= 1e-12 diag; approximate with cholesky failure or tiny pivot
    piv = torch.diagonal(L, dim1=-2, dim2=-1) ** 2
    sing = (info > 0) | ((piv <= 1e-12 * d) & (d > 0)).any(-1)
    rd = torch.where(sing[:, None], REG * d, 0.0)
    L2 = torch.linalg.cholesky(a + torch.diag_embed(rd))
    F = torch.where(sing[:, None, None], L2, torch.nan_to_num(L))
    hinv = torch.diagonal(torch.cholesky_inverse(F), dim1=-2, dim2=-1)
    live = d > 0
    mu = torch.where(sing[:, None] | ~live, 0.0, (1 - 1e-6) / hinv)
    isd = 1 / torch.sqrt(torch.where(live, d, 1.0))
    corr = a.abs() * isd[:, :, None] * isd[:, None, :]
    rad = (corr.sum(-1) - torch.diagonal(corr, dim1=-2, dim2=-1)).amax(-1)
    lam = torch.where(sing, 0.0, (1 - rad).clamp_min(0) * (1 - 1e-6))
    nu = torch.where(live, lam[:, None] * d, 0.0)
    return F, mu, nu, rd, sing


def simulate(w, g, h, rank_eps=None):
    """w fp32 [cout, cin]; returns dict of stats."""
    cout, cin = w.shape
    nb = cin // 16
    s_g = global_scale(g)
    s = fp8_e4m3_values() * s_g
    from fp4cal.search.hessian_blocks import with_fallback

    hd = with_fallback(h).double()
    F, mu, nu, rd, sing = factor(hd)
    sd = (F * F).sum(-1).sqrt() * (1 + 1e-6)  # [nb,16]
    wb = w.reshape(cout, nb, 16)
    a = wb.abs()
    m = a.amax(-1)
    first = _first_at_or_below(m, s, 3.0)
    nh = nohalf_table()
    top = torch.where(first >= N, N - 1, torch.maximum(first - 1, nh[first.clamp_max(N - 1)]))
    zero_at = _first_at_or_below(m, s, 0.25).clamp_max(N - 1)
    # all candidates' losses: true float64 (from fp32 H) and fp32-like regularised + margins
    L = torch.empty(N, cout, nb, dtype=torch.float64)
    MAR = torch.empty_like(L)
    LF = torch.empty_like(L)
    for c in range(N):
        d = block_error(wb, s[c].expand(cout, nb)).double()
        L[c] = (torch.einsum("rnk,nkl->rnl", d, hd) * d).sum(-1)
        z = torch.einsum("rnk,nkl->rnl", d.float(), F.float())  # F^T d
        LF[c] = ((z * z).sum(-1) - (d.float() ** 2 * rd.float()).sum(-1)).double()
        S = (d.abs() * sd).sum(-1)
        MAR[c] = TAU * S * S
    weak = nu.sum(-1) == 0  # [nb]
    # the kernel's rule for the clipping and upward bounds (sweep_rows.MU_USEFUL): nu > 0 or some mu_k >= 2^-10 H_kk
    no_mu = weak & ~(mu >= 2.0**-10 * sd * sd).any(-1)

    def clipb(sn):
        six = (sn * 6.0).unsqueeze(-1)
        e = torch.where(a >= six, a - six, 0.0).double() ** 2
        return torch.maximum((e * mu).amax(-1), (e * nu).sum(-1))

    def boxb(sn, tight=False, col=False):
        """The box bound at sn; col: also its column-wise form sum_t max(|F[:, t] . m| - |F[:, t]| . rho, 0)^2
        (thirteenth session, BENCHMARKS.md: shorter walks on near-collinear and low-rank blocks), the larger."""
        six = sn * 6.0
        sc = sn.unsqueeze(-1).double()
        ad = a.double()
        neg = torch.minimum(sc, ad)
        if tight:  # rounding up costs at most half an E2M1 step: max(s, |w|) / 4 at every scale at or below s
            neg = torch.minimum(neg, torch.maximum(sc, ad) / 4)
        lo = torch.where(a >= six.unsqueeze(-1), ad - six.unsqueeze(-1).double(), -neg)
        cen = (lo + ad) / 2
        rho = (ad - lo) / 2 + 1e-5 * (ad + sc)
        mm = torch.where(wb < 0, -cen, cen)
        z = torch.einsum("rnk,nkl->rnl", mm, F)
        rad_ = (rho * sd).sum(-1)
        big = (ad * sd).sum(-1)
        nrm = ((z * z).sum(-1).sqrt() * (1 - 1e-5) - rad_ - 1e-5 * big).clamp_min(0)
        if col:
            r_col = torch.einsum("rnk,nkl->rnl", rho, F.abs())
            nrm = torch.maximum(nrm, (z.abs() - r_col).clamp_min(0).norm(dim=-1) * (1 - 1e-5) - 2.0**-16 * big)
        return nrm * nrm - big * big * TAU - (w.reshape(cout, nb, 16).double() ** 2 * rd).sum(-1)

    def upb(sh):
        ad = a.double()
        low = torch.minimum(ad, (sh.unsqueeze(-1).double() - ad).clamp_min(0))
        l2 = low * low
        return torch.maximum((l2 * mu).amax(-1), (l2 * nu).sum(-1))

    def upbox(sn):  # proposed: at scales >= sn, |w| <= sn/4 -> dw = w exactly; others in [-|w|, |w|]
        ad = a.double()
        fixed = ad <= (sn / 4).unsqueeze(-1).double()
        mm = torch.where(fixed, wb.double(), 0.0)
        rho = torch.where(fixed, 0.0, ad) + 1e-5 * ad
        z = torch.einsum("rnk,nkl->rnl", mm, F)
        big = (ad * sd).sum(-1)
        nrm = ((z * z).sum(-1).sqrt() * (1 - 1e-5) - (rho * sd).sum(-1) - 1e-5 * big).clamp_min(0)
        return nrm * nrm - big * big * TAU - (wb.double() ** 2 * rd).sum(-1)

    nz = a > 0
    mnz = torch.where(nz, a, torch.full_like(a, float("inf"))).amin(-1)  # smallest nonzero |w|
    ac_idx = torch.searchsorted(s * 6, mnz.reshape(-1).contiguous()).reshape(mnz.shape) - 1
    s_ac = torch.where(ac_idx >= 0, s[ac_idx.clamp_min(0)], torch.zeros(())).double()
    Hs = F @ F.transpose(-1, -2) - torch.diag_embed(rd)  # [nb,16,16]

    def quadf(x):
        return (torch.einsum("rnk,nkl->rnl", x, Hs) * x).sum(-1)

    def boxb2(sn):
        sc = sn.unsqueeze(-1).double()
        ad = a.double()
        sa = s_ac.unsqueeze(-1)
        # region 2: scales in [s_ac, sn]
        clip = ad >= 6 * sc
        lo = torch.where(clip, ad - 6 * sc, -torch.minimum(sc, ad))
        hi = torch.where(clip, ad - 6 * sa, torch.maximum(torch.minimum(sc, ad), ad - 6 * sa))
        hi = torch.where(nz, hi, 0.0)
        lo = torch.where(nz, lo, 0.0)
        cen = (lo + hi) / 2
        rho = (hi - lo) / 2
        sg_ = torch.sign(wb.double())
        mm = sg_ * cen
        nrm = (quadf(mm).clamp_min(0).sqrt() - (rho * sd).sum(-1)).clamp_min(0)
        r2 = torch.where(sn.double() > s_ac, nrm * nrm, torch.full_like(nrm, float("inf")))
        # region 1: all clip, s in [0, min(sn, s_ac)]: dw = sgn (|w| - 6 s) on nonzero weights
        u = torch.where(nz, wb.double(), 0.0)
        v = torch.where(nz, 6 * sg_, 0.0)
        uu = quadf(u)
        vv = quadf(v)
        uv = (torch.einsum("rnk,nkl->rnl", u, Hs) * v).sum(-1)
        smax = torch.minimum(sn.double(), s_ac)
        st = torch.where(vv > 0, uv / vv.clamp_min(1e-300), 0.0).clamp(torch.zeros_like(smax), smax)
        r1 = uu - 2 * st * uv + st * st * vv
        r1 = torch.where(s_ac > 0, r1, torch.full_like(r1, float("inf")))
        return torch.minimum(r1, r2) * (1 - 1e-6)

    torch.arange(cout)[:, None].expand(cout, nb)
    torch.arange(nb)[None, :].expand(cout, nb)

    def run(upbox_on=False, box_every=2, two=False, mu_rule=False, tight=False, per_block=False, col=False):
        best = torch.full((cout, nb), math.inf, dtype=torch.float64)
        bmar = torch.zeros_like(best)
        bidx = torch.zeros(cout, nb, dtype=torch.long)
        runner = torch.full_like(best, math.inf)
        n1 = torch.zeros(cout, nb)
        n2 = torch.zeros(cout, nb)
        boxes = [0, 0]

        def consider(c, act, down):
            nonlocal best, bmar, bidx, runner
            cc = c.clamp(0, N - 1)
            lf = LF.gather(0, cc[None])[0]
            mr = MAR.gather(0, cc[None])[0]
            better = act & ((lf <= best) if down else (lf < best))
            runner = torch.where(
                act & better,
                torch.minimum(runner, best - bmar),
                torch.where(act, torch.minimum(runner, lf - mr), runner),
            )
            best = torch.where(better, lf, best)
            bmar = torch.where(better, mr, bmar)
            bidx = torch.where(better, cc, bidx)

        # phase 1
        c = top.clone()
        act = c >= 0
        it = 0
        w1 = torch.zeros(cout // 32, nb)
        while act.any():
            it += 2
            w1 += act.reshape(cout // 32, 32, nb).any(1).float()
            for u in range(2):
                consider(c, act, True)
                n1 += act.float()
                c = c - 1
                if u == 1:
                    sn = s[c.clamp_min(0)]
                    bd = clipb(sn)
                    if mu_rule:
                        bd = torch.where(no_mu[None, :], 0.0, bd)
                    if (it // 2) % box_every == 0:
                        bx = boxb(sn, tight, col)
                        if two:
                            bx = torch.maximum(bx, boxb2(sn))
                        bd = torch.where(weak[None, :], torch.maximum(bd, bx), bd)
                        boxes[0] += int(act.reshape(cout // 32, 32, nb).any(1)[:, weak].sum())
                    act = act & ~(bd > (best + bmar).clamp_min(0) * SLACK)
                act = act & (c >= 0)
        c = top + 1
        act = c <= zero_at
        w2 = torch.zeros(cout // 32, nb)
        it = 0
        while act.any():
            it += 2
            w2 += act.reshape(cout // 32, 32, nb).any(1).float()
            for u in range(2):
                consider(c.clamp_max(N - 1), act, False)
                n2 += act.float()
                c = c + 1
                act = act & (c <= zero_at)
                if u == 1:
                    sn = s[c.clamp_max(N - 1)]
                    bd = upb(0.5 * sn)
                    if mu_rule:
                        bd = torch.where(no_mu[None, :], 0.0, bd)
                    if upbox_on and (it // 2) % box_every == 0:
                        bd = torch.where(weak[None, :], torch.maximum(bd, upbox(sn)), bd)
                        boxes[1] += int(act.reshape(cout // 32, 32, nb).any(1)[:, weak].sum())
                    act = act & ~(bd > (best + bmar).clamp_min(0) * SLACK)
        # truth
        L.argmin(0)
        lt = L.min(0).values
        lpick = L.gather(0, bidx[None])[0]
        bad = ((lpick - lt) > 1e-6 * lt.abs().clamp_min(1e-300)).sum().item()
        flagged = (runner <= best + bmar).float().mean().item()
        n1e = torch.ceil(n1 / 2) * 2
        n2e = torch.ceil(n2 / 2) * 2
        merged = (n1e + n2e).reshape(cout // 32, 32, nb).amax(1).mean().item()
        if per_block:
            return n1e + n2e
        return dict(
            merged=merged,
            cand1=n1.mean().item(),
            cand2=n2.mean().item(),
            warp1=2 * w1.mean().item(),
            warp2=2 * w2.mean().item(),
            box_down=boxes[0] / w1.numel(),
            box_up=boxes[1] / w1.numel(),
            fp32_bad=bad,
            flagged=flagged,
            sing=sing.float().mean().item(),
            weak=weak.float().mean().item(),
        )

    return run, (L, top, zero_at, sing)


def oracle(L, top, zero_at):
    """The walk an oracle would take (BENCHMARKS.md, thirteenth session): per block, the candidates from the top down
    until every candidate below is worse than the block's best, and from top + 1 up until every one above is;
    returns (mean down, mean up). L [126, rows, nb] float64 losses; top, zero_at [rows, nb]."""
    n = L.shape[0]
    best = L.min(0).values
    idx = torch.arange(n)[:, None, None]
    worse_below = torch.cummin(L, 0).values > best  # every candidate at or below c is worse than the best
    stop_below = torch.cat([torch.ones_like(worse_below[:1]), worse_below[:-1]])  # ... every one below c
    c_down = torch.where((idx <= top) & stop_below, idx, torch.full_like(idx.expand_as(L), -1)).amax(0)
    worse_above = torch.flip(torch.cummin(torch.flip(L, [0]), 0).values, [0]) > best
    stop_above = torch.cat([worse_above[1:], torch.ones_like(worse_above[:1])])
    c_up = torch.where((idx > top) & stop_above, idx, torch.full_like(idx.expand_as(L), n)).amin(0)
    return float((top - c_down + 1).double().mean()), float((torch.minimum(c_up, zero_at) - top).double().mean())


def weights(cout, cin, seed=3):
    torch.manual_seed(seed)
    w = torch.randn(cout, cin) * 0.02
    w[torch.rand_like(w) < 1e-3] *= 8
    return w.to(torch.bfloat16).float()


if __name__ == "__main__":
    cout, cin = int(sys.argv[1]), int(sys.argv[2])
    fams = sys.argv[3].split(",")
    w = weights(cout, cin)
    g = w.abs().amax()
    for fam in fams:
        print(fam, flush=True)
        h = make_case_h(cin) if fam == "well" else make_ill_hessian(fam, cin, seed=0)
        run, (L, top, zero_at, _) = simulate(w, g, h)
        print(fam, "oracle (down, up)", oracle(L, top, zero_at), flush=True)
        variants = [("base", {}), ("tight", dict(tight=True)), ("box3", dict(box_every=3)),
                    ("tight_box3", dict(tight=True, box_every=3)), ("tight_box1", dict(tight=True, box_every=1)),
                    ("col_box4", dict(col=True, box_every=4))]
        for name, kw in variants:
            r = run(**kw)
            print(fam, name, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
