"""Triton kernel for GPTQ's column loop inside one lazy block (CUDA; TRITON_INTERPRET=1 on the CPU for tests).

Rows of W are independent in GPTQ (every row uses the same U), so each program owns ROWS rows of the block's
working columns W1 [cout, BS] and keeps them in registers while it walks the columns c0..c1-1:

    w     = W1[:, i]                                     (fp32)
    s, r  = block scale of column i's group, r = fp32(1 / s) (0 when s == 0), an IEEE division
    q     = fp32(sign(w) * E2M1(fp32(|w| / s)) * s)      exact division-free rounding (search.kernel_common)
    e     = fp32((w - q) / U1[i, i])                     IEEE division
    W1[:, k] -= e * U1[i, k]   for k > i;   E1[:, i] = e;   codes and q stored for column i

The caller applies the lazy update of later blocks (E1 @ U[block, later]) with one matrix product, as the torch
path does. One launch per block (static scales) or per 16-column group (dynamic scales: the group's scales are
searched between launches on the updated W1, which the kernel writes back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, e_ptr, q_ptr, c_ptr, cout, width, c0, c1, nbs,
                       BS_: tl.constexpr, ROWS_: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS_ + tl.arange(0, ROWS_)
    cols = tl.arange(0, BS_)
    rmask = rows < cout
    cmask = cols < width
    tile_ptr = w_ptr + rows[:, None] * BS_ + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    tile = tl.load(tile_ptr, mask=m2, other=0.0)
    for i in range(c0, c1):
        w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)  # column i, exact (one nonzero term)
        s = tl.load(s_ptr + rows * nbs + i // 16, mask=rmask, other=0.0)
        r = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
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
               c1_: torch.Tensor, c0: int, c1: int) -> None:
    """Columns c0..c1-1 of one block, in place. w1, e1, q1: fp32 [cout, 128] contiguous (columns past the
    block's width are zero and never read); u1: fp32 [128, 128] contiguous (the block's U, zero-padded); s_b:
    fp32 [cout, 8] contiguous, block scales of the block's groups; c1_: int32 [cout, 128] codes out."""
    grid = (triton.cdiv(w1.shape[0], ROWS),)
    _gptq_block_kernel[grid](w1, u1, s_b, e1, q1, c1_, w1.shape[0], BS, c0, c1, s_b.shape[1], BS_=BS, ROWS_=ROWS)
