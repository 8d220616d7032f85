"""Fused Triton kernels for the MSE and local-Hessian scale searches.

Same objective as ``reference.py``, for every 16-weight block b of row r and block column j:

    s_c  = fp32(v_c * s_g)                               c = 0..125, v_c the finite positive FP8-E4M3 values
    x    = fp32(|w| / s_c)                               exact IEEE quotient (see below)
    q    = fp32(E2M1(x) * s_c),  dw = sign(w) * fp32(|w| - q)
    mse:            loss_c = sum_k dw_k^2
    local_hessian:  loss_c = dw^T H_j dw = || F_j^T dw ||^2      with H_j = F_j F_j^T
    pick            argmin_c loss_c, ties to the smaller c; output g * v_c / 448 (fp32)

How each weight is rounded 126 times without a division. With r_c = fp32(1 / s_c) (one IEEE division per
candidate, on the host side), the exact quotient comes from Markstein's correction, three FMA-pipe ops:

    x0 = fp32(|w| * r_c);   res = fma(-x0, s_c, |w|)  (exact);   x = fma(res, r_c, x0) = fp32(|w| / s_c)

valid whenever nothing under- or overflows, which the wrapper guarantees by sending tensors with
s_g outside [2^-60, 2^60] to the reference. E2M1 round-to-nearest-even of x is then one magic-number add:
the step of the E2M1 grid around x is 2^(E-1) with E = clamp(exponent(x), 0, 2), and
fp32(fp32(x + 2^(E+22)) - 2^(E+22)) rounds x to that step with ties to even, exactly E2M1's rule; min(., 6)
saturates. Floating-point contraction is disabled at launch so that q and dw are rounded exactly as in the
reference.

Where the quadratic form runs: H_j = F_j F_j^T is factored once per block column (float64 eigh on the
host side, negative round-off eigenvalues clamped to 0), so the loss is a sum of squares
||dw^T F_j||^2 computed by a [rows x 16] @ [16 x 16] tensor-core product with 3xTF32 error compensation.
A sum of squares also loses less to cancellation than dw^T (H dw) would.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fp4cal.numerics import fp8_e4m3_values, global_scale, scale_candidates
from fp4cal.validation import BLOCK

N_CAND = 126
# s_g range where the division-free rounding is provably exact (no subnormal intermediates).
_SG_MIN = 2.0**-60
_SG_MAX = 2.0**60


@triton.jit
def _e2m1_times_scale(a, s, r):
    """q = fp32(E2M1(fp32(a / s)) * s) for a >= 0 (fp32 tensor), s > 0 or s == r == 0 (scalars)."""
    x0 = a * r
    res = tl.fma(-x0, s, a)
    x = tl.fma(res, r, x0)
    xb = x.to(tl.int32, bitcast=True) & 0x7F800000
    xb = tl.minimum(tl.maximum(xb, 0x3F800000), 0x40800000)  # exponent of x clamped to [0, 2]
    magic = (xb + (22 << 23)).to(tl.float32, bitcast=True)
    lvl = tl.minimum((x + magic) - magic, 6.0)
    return lvl * s


@triton.jit
def _first_at_or_below(m, s_ptr, r_ptr, t_base, T: tl.constexpr, NC: tl.constexpr):
    """Per block: the first candidate c with fp32(m / s_c) <= T (NC if none); m: [BR] fp32.

    fp32(m / s_c) falls as c rises (s_c ascending), so a 7-step binary search over the 126 candidates finds it.
    """
    lo = tl.zeros(m.shape, tl.int32)
    hi = tl.full(m.shape, NC, tl.int32)
    for _ in range(7):
        mid = (lo + hi) // 2
        ok = mid < NC
        s = tl.load(s_ptr + t_base + mid, mask=ok, other=1.0)
        r = tl.load(r_ptr + t_base + mid, mask=ok, other=1.0)
        x0 = m * r
        x = tl.fma(tl.fma(-x0, s, m), r, x0)
        below = (x <= T) & ok
        hi = tl.where(below, mid, hi)
        lo = tl.where(below | ~ok, lo, mid + 1)
    return lo


@triton.jit
def _sweep_kernel(
    w_ptr,
    f_ptr,
    mu_ptr,
    s_ptr,
    r_ptr,
    amax_ptr,
    nohalf_ptr,
    out_ptr,
    cout,
    nb,
    stride_we,
    stride_wr,
    stride_wc,
    stride_fe,
    stride_te,
    stride_oe,
    HESSIAN: tl.constexpr,
    PRUNE: tl.constexpr,
    QUAD: tl.constexpr,
    BR: tl.constexpr,
    NC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    rows = pid_r.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.arange(0, 16)
    rmask = rows < cout
    w_off = e * stride_we + rows[:, None] * stride_wr + (j * 16 + cols[None, :]) * stride_wc
    w = tl.load(w_ptr + w_off, mask=rmask[:, None], other=0.0).to(tl.float32)
    a = tl.abs(w)
    neg = w < 0
    m = tl.max(a, axis=1)
    t_base = e * stride_te
    if HESSIAN:
        f_off = e * stride_fe + j * 256 + cols[:, None] * 16 + cols[None, :]
        f = tl.load(f_ptr + f_off)
        # mu_i = min over dw with dw_i = 1 of dw^T H dw: the max element's error alone bounds the loss below.
        mu = tl.load(mu_ptr + e * (stride_fe // 16) + j * 16 + tl.argmax(a, axis=1))
    else:
        mu = tl.full(m.shape, 1.0, tl.float32)
    # Window top. Hessian: from the first all-zero candidate (x_max <= 0.25) on, every loss equals sum w^T H w,
    # so that one is the only one worth trying. MSE: a candidate with x_max <= 3 whose half v/2 is also a
    # candidate is dominated by it (its grid on [0, 3 s] is a subset of the half's), see BENCHMARKS.md.
    if PRUNE:
        if HESSIAN:
            top = tl.minimum(_first_at_or_below(m, s_ptr, r_ptr, t_base, 0.25, NC), NC - 1)
        else:
            first = _first_at_or_below(m, s_ptr, r_ptr, t_base, 3.0, NC)
            nohalf = tl.load(nohalf_ptr + tl.minimum(first, NC - 1))
            top = tl.where(first >= NC, NC - 1, tl.maximum(first - 1, nohalf))
    else:
        top = tl.full(m.shape, NC - 1, tl.int32)
    best = tl.full(m.shape, float("inf"), tl.float32)
    best_idx = tl.zeros(m.shape, tl.int32)
    c = top
    active = c >= 0
    n_active = tl.sum(active.to(tl.int32))
    while n_active > 0:
        cc = tl.maximum(c, 0)
        s = tl.load(s_ptr + t_base + cc)
        r = tl.load(r_ptr + t_base + cc)
        if PRUNE:
            # Bottom of the window: once 6 s_c <= m (the max element clips), its error m - 6 s_c only grows
            # for smaller candidates; when mu * error^2 already exceeds the best loss, stop this block.
            dm = m - _e2m1_times_scale(m, s, r)
            stop = (m >= 6.0 * s) & (dm * dm * mu > best * 1.0001)
            active = active & ~stop
        d = a - _e2m1_times_scale(a, s[:, None], r[:, None])
        if HESSIAN:
            d = tl.where(neg, -d, d)
            if QUAD == "fma":
                z = tl.sum(d[:, :, None] * f[None, :, :], axis=1)
            else:
                z = tl.dot(d, f, input_precision=QUAD)
            loss = tl.sum(z * z, axis=1)
        else:
            loss = tl.sum(d * d, axis=1)
        better = active & (loss <= best)  # descending c: '<=' keeps the smaller candidate on ties
        best = tl.where(better, loss, best)
        best_idx = tl.where(better, cc, best_idx)
        c = c - 1
        active = active & (c >= 0)
        n_active = tl.sum(active.to(tl.int32))
    amax = tl.load(amax_ptr + t_base + best_idx)
    tl.store(out_ptr + e * stride_oe + rows * nb + j, amax, mask=rmask)


def candidate_tables(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor candidate tables for global amax g (fp32 [E]): s_c, r_c = fp32(1/s_c) (0 where s_c == 0),
    and the candidate amax g * v_c / 448; each fp32 [E, 126] on g's device."""
    s = fp8_e4m3_values(g.device)[None, :] * global_scale(g)[:, None]
    r = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return s.contiguous(), r.contiguous(), scale_candidates(g).reshape(-1, N_CAND).contiguous()


def hessian_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor each 16x16 block: returns (F, mu), fp32 [..., 16, 16] and [..., 16].

    F satisfies H = F F^T, so dw^T H dw = ||F^T dw||^2: the float64 Cholesky factor where H is positive
    definite, else V diag(sqrt(max(l, 0))) from the float64 eigendecomposition (singular or zero H).
    mu_i = min over dw with dw_i = 1 of dw^T H dw = 1 / (H^-1)_ii (0 where H is singular): a lower bound
    on the loss from one element's error, used to end a block's sweep early. Shrunk by 1e-6 for safety.
    """
    h64 = h.double()
    chol, info = torch.linalg.cholesky_ex(h64)
    eye = torch.eye(16, dtype=torch.float64, device=h.device).expand_as(h64)
    inv_chol = torch.linalg.solve_triangular(chol, eye, upper=False)
    mu = 1.0 / inv_chol.pow(2).sum(-2)
    bad = info != 0
    good = bad.logical_not() & torch.isfinite(mu).all(-1) & torch.isfinite(chol).all(-1).all(-1)
    f, mu = chol.clone(), mu.clone()
    if not bool(good.all()):
        lam, vec = torch.linalg.eigh(h64[~good])
        f[~good] = vec * lam.clamp_min(0).sqrt().unsqueeze(-2)
        mu[~good] = 0.0
    return f.float().contiguous(), (mu * (1 - 1e-6)).float().contiguous()


@functools.cache
def _nohalf_above(device: str) -> torch.Tensor:
    """int32 [126]: the largest c' >= c whose FP8 value has no half among the candidates (-1 if none)."""
    v = fp8_e4m3_values().tolist()
    vals = set(v)
    out, last = [0] * N_CAND, -1
    for c in range(N_CAND - 1, -1, -1):
        if v[c] / 2 not in vals and last < c:
            last = max(last, c)
        out[c] = last
    return torch.tensor(out, dtype=torch.int32, device=device)


def exact_range_ok(g: torch.Tensor) -> bool:
    """True when every s_g = g / 2688 is 0 or inside the range where the kernel's rounding is exact."""
    sg = global_scale(g)
    ok = (sg == 0) | ((sg >= _SG_MIN) & (sg <= _SG_MAX))
    return bool(ok.all())


def search_triton(
    w: torch.Tensor,
    method: str,
    g: torch.Tensor,
    hessian: torch.Tensor | None = None,
    block_rows: int = 128,
    num_warps: int = 4,
    quad: str = "fma",
    prune: bool = True,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Kernel path of search_scales for validated inputs (see search_scales for shapes).

    factor: hessian_factor(hessian), when the caller already has it (one Hessian shared by several weights).
    Falls back to the reference for global amax outside the exact range (see the module docstring).
    """
    from fp4cal.search.reference import search_reference

    if not exact_range_ok(g):
        return search_reference(w, method, g, hessian)
    stack = w.dim() == 3
    w3 = w if stack else w.unsqueeze(0)
    n_e, cout, cin = w3.shape
    nb = cin // BLOCK
    g1 = g.reshape(-1).expand(n_e).contiguous()
    s_tab, r_tab, amax_tab = candidate_tables(g1)
    out = torch.empty(n_e, cout, nb, dtype=torch.float32, device=w.device)
    hess = method == "local_hessian"
    if hess:
        f, mu = factor if factor is not None else hessian_factor(hessian)
        stride_fe = 0 if f.dim() == 3 else f.stride(0)
    else:
        f = mu = s_tab  # unused placeholder pointers
        stride_fe = 0
    grid = (triton.cdiv(cout, block_rows), nb, n_e)
    _sweep_kernel[grid](
        w3,
        f,
        mu,
        s_tab,
        r_tab,
        amax_tab,
        _nohalf_above(str(w.device)),
        out,
        cout,
        nb,
        w3.stride(0),
        w3.stride(1),
        w3.stride(2),
        stride_fe,
        N_CAND,
        cout * nb,
        HESSIAN=hess,
        PRUNE=prune,
        QUAD=quad,
        BR=block_rows,
        NC=N_CAND,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out if stack else out[0]
