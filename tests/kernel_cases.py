"""Weight and Hessian families shared by the kernel parity tests (CPU interpreter and GPU)."""

from __future__ import annotations

import torch

from fp4cal.numerics import E2M1_MIDPOINTS, fp8_e4m3_values


def make_weight(kind: str, cout: int, cin: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Returns (w, global_amax or None). Kinds: normal, heavy, outliers, zeros, threshold."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "normal":
        w = torch.randn(cout, cin, generator=gen) * 0.02
        g = None
    elif kind == "heavy":  # Student-t with 2 degrees of freedom: very heavy tails
        z = torch.randn(cout, cin, generator=gen)
        chi = torch.randn(cout, cin, 2, generator=gen).pow(2).sum(-1) / 2
        w = z / chi.sqrt() * 0.01
        g = None
    elif kind == "outliers":
        w = torch.randn(cout, cin, generator=gen) * 0.02
        w[torch.rand(cout, cin, generator=gen) < 1e-3] *= 8
        w[:, :16] = 0.0  # a column of all-zero blocks
        g = None
    elif kind == "zeros":
        w = torch.zeros(cout, cin)
        g = None
    elif kind == "threshold":
        # g = 2688 makes s_g = 1 and s_c = v_c exactly, so t * v_c (t an E2M1 midpoint) is exact in every dtype:
        # every weight sits exactly on a rounding threshold of some candidate, or one ulp beside it.
        v = fp8_e4m3_values()
        t = torch.tensor(E2M1_MIDPOINTS)
        ci = torch.randint(40, 126, (cout, cin), generator=gen)
        ti = torch.randint(0, len(E2M1_MIDPOINTS), (cout, cin), generator=gen)
        w = (t[ti] * v[ci]).to(dtype)
        nudge = torch.randint(-1, 2, (cout, cin), generator=gen)
        up = torch.nextafter(w, torch.full_like(w, float("inf")))
        dn = torch.nextafter(w, torch.zeros_like(w))
        w = torch.where(nudge > 0, up, torch.where(nudge < 0, dn, w))
        sign = torch.where(torch.rand(cout, cin, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        return (w * sign).to(device), torch.tensor(2688.0, device=device)
    else:
        raise ValueError(kind)
    return w.to(dtype).to(device), g


def make_hessian(kind: str, cin: int, device="cpu", seed: int = 0, tokens: int = 512) -> torch.Tensor:
    """[cin/16, 16, 16] fp32. Kinds: psd, diag, lowrank, zero, range (1e6 dynamic range), identity."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nb = cin // 16
    if kind == "identity":
        return torch.eye(16).expand(nb, 16, 16).contiguous().to(device)
    if kind == "zero":
        return torch.zeros(nb, 16, 16, device=device)
    if kind == "diag":
        return torch.diag_embed(torch.rand(nb, 16, generator=gen) + 0.01).to(device)
    if kind == "range":
        chan = torch.logspace(-3, 3, 16)[torch.randperm(16, generator=gen)]  # 1e6 dynamic range of channel scales
        x = torch.randn(tokens, cin, generator=gen) * chan.repeat(nb)
    elif kind == "lowrank":
        x = torch.randn(5, cin, generator=gen)  # rank 5 < 16
    elif kind == "psd":
        x = torch.randn(tokens, cin, generator=gen) * torch.exp(torch.randn(cin, generator=gen))
    else:
        raise ValueError(kind)
    xb = x.T.reshape(nb, 16, -1)
    return (xb @ xb.transpose(-1, -2) / x.shape[0]).float().to(device)


# Ill-conditioned block Hessians (issue 13): what few-token experts, dead channels and low-rank calibration sets give.
ILL_CONDITIONED = ["rank1", "rank2", "rank8", "deadchan", "collinear", "deadblock"]


def make_ill_hessian(kind: str, cin: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """[cin/16, 16, 16] fp32 PSD blocks. rank1 / rank2 / rank8: X^T X / n of that many tokens (n = 1, 2, 8);
    deadchan: 5 of each block's 16 channels never active (zero rows and columns); collinear: 8 channel pairs with
    correlation 1 - 1e-6 (near-singular, Gershgorin bound 0); deadblock: every other block all zero (MSE fallback)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nb = cin // 16
    if kind.startswith("rank"):
        x = torch.randn(int(kind[4:]), cin, generator=gen) * torch.exp(torch.randn(cin, generator=gen))
    elif kind == "deadchan":
        x = torch.randn(256, cin, generator=gen) * torch.exp(torch.randn(cin, generator=gen))
        x.view(256, nb, 16)[:, :, torch.randperm(16, generator=gen)[:5]] = 0.0
    elif kind == "collinear":
        base = torch.randn(256, nb, 8, generator=gen)
        noise = torch.randn(256, nb, 8, generator=gen) * 1e-3
        x = torch.stack((base, base + noise), dim=-1).reshape(256, cin) * torch.exp(torch.randn(cin, generator=gen))
    elif kind == "deadblock":
        x = torch.randn(256, cin, generator=gen) * torch.exp(torch.randn(cin, generator=gen))
        x.view(256, nb, 16)[:, ::2] = 0.0
    else:
        raise ValueError(kind)
    xb = x.T.reshape(nb, 16, -1)
    return (xb @ xb.transpose(-1, -2) / x.shape[0]).float().to(device)


def near_tie_blocks(n: int, seed: int = 0, pool: int = 20000):
    """(w fp32 [n, 16], h fp32 [1, 16, 16] rank 1, g): single-block rows on which fp32 cannot order the candidates
    of a rank-1 block Hessian H = x x^T (issue 13.2). Drawn from `pool` random blocks (bf16-valued, N(0, 0.02^2)):
    those where at least two candidates with distinct errors have a float64 loss below 4 u S^2 (u = 2^-24,
    S = sum_k sqrt(H_kk) |dw_k|), i.e. below the rounding error of any fp32 evaluation, so an fp32 sweep picks
    between them by its rounding. Raises if the pool holds fewer than n."""
    from fp4cal.numerics import global_scale
    from fp4cal.search.reference import block_error, candidate_block_scales

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(16, generator=gen) * torch.exp(torch.randn(16, generator=gen))).float()
    h = torch.outer(x, x).unsqueeze(0)  # fp32 rank-1 block, as one token's x^T x
    wb = (torch.randn(pool, 16, generator=gen) * 0.02).to(torch.bfloat16).float()
    g = wb.abs().amax()
    s = candidate_block_scales(global_scale(g))
    hd, sd = h[0].double(), h[0].diagonal().double().sqrt()
    close = torch.zeros(pool, dtype=torch.int64)
    prev = None
    for c in range(s.numel()):
        d = block_error(wb, s[c].expand(pool))
        dd = d.double()
        loss = ((dd @ hd) * dd).sum(-1)
        bound = 4 * 2.0**-24 * ((dd.abs() * sd).sum(-1)) ** 2
        new = torch.ones(pool, dtype=torch.bool) if prev is None else (d != prev).any(-1)  # distinct errors only
        close += (new & (loss < bound) & (loss > 0)).long()
        prev = d
    idx = (close >= 2).nonzero().squeeze(1)
    if idx.numel() < n:
        raise ValueError(f"near_tie_blocks: {idx.numel()} of {pool} blocks qualify, {n} asked")
    return wb[idx[:n]].contiguous(), h, g


def with_antisymmetric_part(h: torch.Tensor, rel: float = 2.0**-10, seed: int = 0) -> torch.Tensor:
    """h [..., 16, 16] plus an antisymmetric A (A_ik = -A_ki = rel * N(0, 1) * |h_ik|, i < k): a Hessian that is not
    symmetric, whose quadratic form is its symmetric part's (the sweep factors that; the float64 pass must read
    both triangles). Reading it as symmetric from either triangle changes the form by 2 sum_i<k A_ik d_i d_k."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(h.shape, generator=gen).to(h.device) * rel * h.abs()
    a = torch.triu(eps, 1)
    return (h + a - a.transpose(-1, -2)).float()


def check_mode2_filter(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, stats: torch.Tensor) -> tuple[int, int, int]:
    """The float64 pass's fp32 filter on one weight w [cout, cin] (h [nb, 16, 16]), from search_triton's
    rescore_stats: on every mode-2 block, the kept candidates lie in its window, every window candidate within
    2^-40 S^2 of the window's float64 minimum (the reference's losses) is kept, and every dropped one has a float64
    loss above that minimum. Runs on w's device, in chunks. Returns (mode-2 blocks, window candidates, kept)."""
    from fp4cal.numerics import global_scale, weight_blocks
    from fp4cal.search.reference import block_error, candidate_block_scales

    dev = w.device
    nb = w.shape[1] // 16
    recs = stats[8 : 8 + 5 * w.numel() // 16].view(-1, 5).to(dev).long()
    sel_all = (recs[:, 1:] != 0).any(1).nonzero().squeeze(1)
    wb_all = weight_blocks(w.float())
    s = candidate_block_scales(global_scale(g.float()))
    c = torch.arange(126, device=dev)
    bits = torch.arange(32, device=dev)
    n_win = n_kept = 0
    for sel in sel_all.split(4096):
        lo, hi = recs[sel, 0] & 255, (recs[sel, 0] >> 8) & 255
        tt = c[None, :] - lo[:, None]  # bit tt of the block's mask is candidate c
        words = recs[sel, 1:].gather(1, tt.clamp_min(0) // 32)
        kept = (tt >= 0) & (((words >> (tt.clamp_min(0) % 32)) & 1) == 1)
        n_bits = int(((recs[sel, 1:, None] >> bits) & 1).sum())
        assert int(kept.sum()) == n_bits, "a kept bit beyond the last candidate"
        win = (c[None, :] >= lo[:, None]) & (c[None, :] <= hi[:, None])
        assert bool((kept <= win).all()), "a kept candidate outside its block's window"
        rows, js = sel // nb, sel % nb
        wb = wb_all[rows, js]  # [n, 16]
        d = block_error(wb[:, None, :].expand(-1, 126, -1), s[None, :].expand(sel.numel(), -1)).double()
        hd = h.double()[js]
        loss = torch.einsum("nck,nkl,ncl->nc", d, hd, d)
        s2 = ((d.abs() * hd.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()[:, None, :]).sum(-1)) ** 2
        low = torch.where(win, loss, torch.full_like(loss, float("inf"))).min(1, keepdim=True).values
        must = win & (loss <= low + 2.0**-40 * s2)
        assert bool((must <= kept).all()), f"{int((must & ~kept).sum())} candidates at the float64 minimum dropped"
        dropped = win & ~kept
        assert bool((loss[dropped] > low.expand_as(loss)[dropped]).all()), "a dropped candidate ties the minimum"
        n_win += int(win.sum())
        n_kept += int(kept.sum())
    return sel_all.numel(), n_win, n_kept


def mode2_steps(stats: torch.Tensor, lanes: int | None = None) -> tuple[int, int]:
    """(fp32 steps, float64 steps) of the float64 pass's mode 2 (rescore.py, 'One block per lane, per group of
    lanes or per warp'), recomputed from search_triton's rescore_stats records (windows and kept masks) to check
    the kernel's own counters [4] and [3]: per block ceil(window / lanes) fp32 steps, and float64 steps that cover
    its kept candidates `lanes` consecutive ones at a time, each from the lowest kept one not yet done. lanes: the
    lanes a block took (default: the kernel's record of it, stats[6])."""
    lanes = int(stats[6]) if lanes is None else lanes
    recs = stats[8:].view(-1, 5).cpu().long()
    recs = recs[(recs[:, 1:] != 0).any(1)]
    lo, hi = recs[:, 0] & 255, (recs[:, 0] >> 8) & 255
    n32 = int(((hi - lo + lanes) // lanes).sum())
    bits = torch.arange(32)
    kept = ((recs[:, 1:, None] >> bits) & 1).reshape(-1, 128)  # [blocks, 128], bit t = candidate lo + t
    n64 = 0
    for row in kept:
        t0, ts = -lanes, row.nonzero().squeeze(1).tolist()
        for t in ts:
            if t >= t0 + lanes:
                n64, t0 = n64 + 1, t
    return n32, n64
