"""Triton kernel for GPTQ's column loop inside one lazy block (CUDA; TRITON_INTERPRET=1 on the CPU for tests).

Rows of W are independent in GPTQ (every row uses the same U), so each program owns ROWS rows of the block's
working columns W1 [cout, BS] and keeps them in registers while it walks the 16-column groups g0..g1-1 and,
inside each, the columns i:

    s, r  = block scale of the row's group, r = fp32(1 / s) (0 when s == 0), an IEEE division
    w     = W1[:, i]                                     (fp32)
    q     = fp32(sign(w) * E2M1(fp32(|w| / s)) * s)      exact division-free rounding (search.kernel_common)
    e     = fp32((w - q) / U1[i, i])                     IEEE division
    W1[:, k] -= e * U1[i, k]   for k > i;   E1[:, i] = e;   codes and q stored for column i

Dynamic scales (DYNAMIC): before a group's columns, the kernel searches that group's scale for each of its rows
on the error-updated values it holds: for each of the 126 candidates c, dw_c = fp32(w - q_c(w)) as above,
loss_c = ||M_j^T dw_c||^2 in float64 with M_j = U_jj^-1 (core.group_factors: the group's conditional Hessian
is M_j M_j^T), keeping the first minimum (ties to the smaller candidate, as argmin). Candidates run in
parallel across the program's threads (one row at a time): each thread rounds its candidate's 16 errors, and
the [128 candidates, 16] x [16, 16] float64 product runs on the tensor cores (tl.dot; DMMA on Hopper, the
same IEEE float64 arithmetic in another summation order). The chosen index is stored for the host (block amax
and scale tables) and its scale rounds the group. So a block is one launch with either kind of scales, and
nothing waits on the host between groups. (Measured by compiling for sm_90 here: the row loop is ~450
instructions per warp with 5 barriers and no spills; an earlier layout with rows in parallel and a
[rows, 16, 16] float64 temporary was ~630 instructions per candidate with 36 barriers.)

The caller applies the lazy update of later blocks (E1 @ U[block, later]) with one matrix product, as the torch
path does. Launched with floating-point contraction off, so that q, w - q and the errors are rounded as written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4cal.search.kernel_common import N_CAND

BS = 128  # block width the kernel is compiled for (the caller's block_size must be 128 to use it)
ROWS = 16


@triton.jit
def _level_signed(w, s, r):
    """sign(w) * E2M1(fp32(|w| / s)) as fp32, r = fp32(1 / s): fp4cal.search.kernel_common._round_signed before
    its final multiply by s (the kernel needs the level itself for the code; see that function for why each
    step is exact)."""
    x0 = w * r
    res = tl.fma(-x0, s, w)
    x = tl.fma(res, r, x0)
    xb = x.to(tl.int32, bitcast=True) & 0x7F800000
    xb = tl.minimum(tl.maximum(xb, 0x3F800000), 0x40800000)
    magic = (xb + ((22 << 23) | (1 << 22))).to(tl.float32, bitcast=True)
    return tl.minimum(tl.maximum((x + magic) - magic, -6.0), 6.0)


@triton.jit
def _reciprocal(s):
    """fp32(1 / s) by an IEEE division, 0 where s == 0."""
    return tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)


@triton.jit
def _search_group(grp, rloc, m_ptr, s_c, r_c, cvalid, j, ROWS_: tl.constexpr, NC: tl.constexpr):
    """Index (int32 [ROWS]) of the best candidate scale for each row of grp [ROWS, 16] (fp32): s_c, r_c fp32
    [NC] candidate scales and reciprocals (cvalid marks the 126 real ones), loss ||M_j^T dw||^2 in float64 with
    M_j = m_ptr[j] (float64 16x16), first minimum wins (argmin's tie_break_left). The candidates run in
    parallel across the program's threads, one row at a time; the product is one float64 tl.dot per row."""
    k = tl.arange(0, 16)
    m = tl.load(m_ptr + j * 256 + k[:, None] * 16 + k[None, :])  # [16 (k), 16 (l)] float64
    best = tl.zeros([ROWS_], dtype=tl.int32)
    for rr in range(0, ROWS_):
        x = tl.sum(tl.where(rloc[:, None] == rr, grp, 0.0), axis=0)[:, None]  # row rr, [16 (k), 1], exact
        dw = (x - _level_signed(x, s_c[None, :], r_c[None, :]) * s_c[None, :]).to(tl.float64)  # [16, NC]
        y = tl.dot(tl.trans(dw), m)  # [NC, 16]: row c is (M^T dw_c)^T
        loss = tl.sum(y * y, axis=1)
        pick = tl.argmin(tl.where(cvalid, loss, float("inf")), axis=0, tie_break_left=True)
        best = tl.where(rloc == rr, pick.to(tl.int32), best)
    return best


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, e_ptr, q_ptr, c_ptr, m_ptr, sc_ptr, idx_ptr, cout, width, g0, g1, nbs,
                       jbase, BS_: tl.constexpr, ROWS_: tl.constexpr, DYNAMIC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS_ + tl.arange(0, ROWS_)
    cols = tl.arange(0, BS_)
    rmask = rows < cout
    cmask = cols < width
    tile_ptr = w_ptr + rows[:, None] * BS_ + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    tile = tl.load(tile_ptr, mask=m2, other=0.0)
    gsel = tl.arange(0, BS_ // 16)[None, :, None]
    if DYNAMIC:
        cand = tl.arange(0, 128)
        cvalid = cand < N_CAND
        s_c = tl.load(sc_ptr + cand, mask=cvalid, other=1.0)
        r_c = _reciprocal(s_c)
    for gl in range(g0, g1):
        if DYNAMIC:
            grp = tl.sum(tl.where(gsel == gl, tl.reshape(tile, (ROWS_, BS_ // 16, 16)), 0.0), axis=1)  # exact
            best = _search_group(grp, tl.arange(0, ROWS_), m_ptr, s_c, r_c, cvalid, jbase + gl, ROWS_, 128)
            tl.store(idx_ptr + rows * nbs + gl, best, mask=rmask)
            s = tl.load(sc_ptr + best)
        else:
            s = tl.load(s_ptr + rows * nbs + gl, mask=rmask, other=0.0)
        r = _reciprocal(s)
        for i in range(gl * 16, gl * 16 + 16):
            w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)  # column i, exact (one nonzero term)
            lev = _level_signed(w, s, r)
            q = lev * s
            lvl = tl.abs(lev)
            code = tl.where(lvl <= 2.0, lvl * 2.0, tl.where(lvl == 3.0, 5.0, tl.where(lvl == 4.0, 6.0, 7.0)))
            code = code.to(tl.int32) | tl.where(w < 0, 8, 0)
            d = tl.load(u_ptr + i * BS_ + i)
            e = tl.div_rn(w - q, tl.full(w.shape, 1.0, tl.float32) * d)
            urow = tl.load(u_ptr + i * BS_ + cols, mask=cmask & (cols > i), other=0.0)
            tile = tile - e[:, None] * urow[None, :]
            tl.store(e_ptr + rows * BS_ + i, e, mask=rmask)
            tl.store(q_ptr + rows * BS_ + i, q, mask=rmask)
            tl.store(c_ptr + rows * BS_ + i, code, mask=rmask)
    tl.store(tile_ptr, tile, mask=m2)


def gptq_block(w1: torch.Tensor, u1: torch.Tensor, s_b: torch.Tensor, e1: torch.Tensor, q1: torch.Tensor,
               c1_: torch.Tensor, g0: int, g1: int, m: torch.Tensor | None = None,
               s_cand: torch.Tensor | None = None, j0: int = 0) -> None:
    """Groups g0..g1-1 (16 columns each) of one block, in place. w1, e1, q1: fp32 [cout, 128] contiguous
    (columns past the block's width are zero and never read); u1: fp32 [128, 128] contiguous (the block's U,
    zero-padded); c1_: int32 [cout, 128] codes out.
    Static scales (m None): s_b fp32 [cout, 8] contiguous, the block scales of the block's groups.
    Dynamic scales: s_b int32 [cout, 8] contiguous, written with each row's chosen candidate index per group;
    m float64 [nb, 16, 16] contiguous, the group factors of the whole weight (core.group_factors); s_cand fp32
    [126], the candidate scales; j0 the weight's group index of the block's first group."""
    grid = (triton.cdiv(w1.shape[0], ROWS),)
    dynamic = m is not None
    if not dynamic:
        m, s_cand = s_b, s_b  # pointers the static kernel never reads
    _gptq_block_kernel[grid](w1, u1, s_b, e1, q1, c1_, m, s_cand, s_b, w1.shape[0], BS, g0, g1, s_b.shape[1], j0,
                             BS_=BS, ROWS_=ROWS, DYNAMIC=dynamic, enable_fp_fusion=False)
