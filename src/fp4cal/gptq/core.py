"""GPTQ rounding of one weight onto NVFP4 with fixed (or group-by-group re-searched) block scales.

The procedure, exactly as gptq_round implements it (fp4cal.gptq.reference.gptq_reference is the same in
float64, one column at a time, without the lazy updates):

    H [cin, cin]                  input second moment sum x x^T / n of this layer (float32|float64)
    dead, U = inverse_factor(H)   see fp4cal.gptq.hessian: dead channels, damping, H'^-1 = U^T U
    W[:, dead] = 0                as GPTQ does: a channel that never carried signal gets no weight
    block_amax = search_scales(W, scales, hessian=16x16 diagonal blocks of H)   ('local_hessian'|'mse'|'max')
    for each column i (group j = i // 16, s_b[:, j] = fp32(e4m3(a / 6 / s_g) * s_g) from block_amax):
        q_i   = NVFP4 rounding of fp32(W[:, i]) with s_b[:, j]      (fp4cal.numerics.quantize_blocks)
        e_i   = (W[:, i] - q_i) / U_ii
        W[:, k] -= e_i * U_ik  for every k > i                       (error propagation)

Lazy batching: the propagation to columns beyond the current 128-column block is deferred and applied as one
matrix product E_block @ U[block, later] when the block is done (the same sums, in another order).

Dynamic scales (scales='local_hessian_dynamic'): when the loop reaches group j, its block amax is re-searched
with the local-Hessian objective on the *error-updated* columns W[:, 16j:16j+16], with the group's conditional
Hessian (U_jj^T U_jj)^-1 (see hessian.conditional_block_hessians): the loss of the group's rounding error given
that earlier columns are fixed and later ones compensate. The fast path evaluates it as ||M_j^T e||^2 with
M_j = U_jj^-1 (group_factors, all groups in one batched triangular solve up front), a float64 sum of squares;
on CUDA the search runs inside the column-loop kernel, so a block is one launch and no group waits on the host.

Fallbacks (named in GPTQOutput.fallback, weights always finite): every diagonal entry of H zero (no
calibration token carried signal) -> round-to-nearest with the scales searched on the identity Hessian (mse);
H not positive definite after every damping retry -> round-to-nearest with the chosen scales.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from fp4cal.gptq.hessian import (
    DAMP_RETRIES,
    DEFAULT_DAMP,
    InverseFactor,
    block_diagonal,
    check_damp,
    check_full_hessian,
    inverse_factor,
)
from fp4cal.numerics import block_scale, global_scale, quantize_blocks, scale_candidates
from fp4cal.search import search_scales, triton_available
from fp4cal.search.hessian_blocks import is_psd
from fp4cal.search.reference import block_error, candidate_block_scales
from fp4cal.validation import BLOCK, check_global_amax, check_weight

SCALES = ("local_hessian", "local_hessian_dynamic", "mse", "max")
DEFAULT_SCALES = "local_hessian_dynamic"  # the measured best: docs/gptq.md (quality; H200 time 1.06x static)
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class GPTQConfig:
    """Options of method='gptq'. scales: how block scales are chosen (SCALES); damp: relative damping lambda
    (> 0); block_size: columns per lazy-update block (a positive multiple of 16)."""

    scales: str = DEFAULT_SCALES
    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.scales not in SCALES:
            raise ValueError(f"gptq_scales must be one of {SCALES}, got {self.scales!r}")
        check_damp(self.damp)
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % BLOCK:
            raise ValueError(f"gptq block_size must be a positive multiple of {BLOCK}, got {b!r}")


@dataclass
class GPTQOutput:
    """What gptq_round returns for one weight [cout, cin].

    codes: int32 [cout, cin], E2M1 magnitude code 0..7 with the sign in bit 3 (pack with numerics.pack_codes).
    weight: fp32 [cout, cin], the dequantized values of those codes (exactly numerics.dequantize's).
    block_amax: fp32 [cout, cin/16], the block amax whose FP8 scale each group was rounded with.
    damp: the lambda that factored (after retries). dead: input channels with a zero Hessian diagonal.
    fallback: None, or why the weight was rounded to nearest instead.
    scales_used: the scale search that chose block_amax (cfg.scales, or 'mse' for an all-zero Hessian).
    """

    codes: torch.Tensor
    weight: torch.Tensor
    block_amax: torch.Tensor
    damp: float
    dead: int
    fallback: str | None = None
    scales_used: str = DEFAULT_SCALES


def block_scale_values(block_amax: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """fp32 block scale s_b = fp32(v * s_g), v = e4m3(fp32(a / 6) / s_g); block_amax [cout, nb], g []."""
    s_g = global_scale(global_amax)
    return block_scale(block_amax, s_g)


def round_column(x: torch.Tensor, s_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 rounding of one column: x [cout] (rounded to fp32 first), s_b [cout] fp32 -> (code int32 [cout],
    dequantized fp32 [cout]), exactly fp4cal.numerics' rounding."""
    code, q = quantize_blocks(x.float().unsqueeze(-1), s_b)
    return code.squeeze(-1), q.squeeze(-1)


def group_factors(u: torch.Tensor) -> torch.Tensor:
    """M_j = U_jj^-1 for every 16-column group j: float64 [cin/16, 16, 16], upper triangular, from the upper
    factor u [cin, cin] (float64, H'^-1 = u^T u). The group's conditional Hessian (U_jj^T U_jj)^-1 equals
    M_j M_j^T, so the dynamic search's loss e^T Hc_j e is ||M_j^T e||^2: a sum of squares (no cancellation),
    and no second factorization. One batched triangular solve for the whole weight."""
    ub = block_diagonal(u.double())
    eye = torch.eye(BLOCK, dtype=torch.float64, device=u.device).expand_as(ub)
    return torch.linalg.solve_triangular(ub, eye, upper=True).contiguous()


def search_group(grp: torch.Tensor, m: torch.Tensor, s_cand: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """Best candidate index (int64 [cout]) of one 16-column group: argmin_c ||m^T e_c||^2 over the 126
    candidate scales s_cand (fp32 [126]), e_c = fp32(grp) - q_c(fp32(grp)) rounded as numerics does, loss in
    float64, ties to the smaller candidate (argmin's first minimum). grp: [cout, 16]; m: [16, 16] float64, the
    group factor (group_factors). All candidates at once, rows in chunks (a [rows, 126, 16] temporary); no
    host synchronization."""
    out = torch.empty(grp.shape[0], dtype=torch.int64, device=grp.device)
    md = m.double()
    for r0 in range(0, grp.shape[0], rows):
        x = grp[r0 : r0 + rows].float().unsqueeze(1)  # [r, 1, 16]
        dw = block_error(x.expand(-1, s_cand.numel(), -1), s_cand.expand(x.shape[0], -1)).double()
        y = dw @ md  # y_l = sum_k dw_k M_kl = (M^T dw)_l
        out[r0 : r0 + rows] = (y * y).sum(-1).argmin(dim=1)
    return out


def layer_objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, rows: int = 4096) -> float:
    """tr(dW H dW^T) in float64, dW = w - q ([cout, cin]), h [cin, cin]: the layer-output objective
    sum_t ||dW x_t||^2 / n. Rows in chunks so the temporaries stay O(rows * cin)."""
    hd = h.double()
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for r0 in range(0, w.shape[0], rows):
        d = w[r0 : r0 + rows].double() - q[r0 : r0 + rows].double()
        total += ((d @ hd) * d).sum()
    return float(total)


def check_inputs(w: torch.Tensor, hessian: torch.Tensor, global_amax, cfg: GPTQConfig) -> torch.Tensor:
    """Validate a gptq_round call; returns the fp32 global amax []."""
    if not isinstance(cfg, GPTQConfig):
        raise TypeError(f"cfg must be a fp4cal.gptq.GPTQConfig, got {type(cfg).__name__}")
    check_weight(w, "w")
    check_full_hessian(hessian, w.shape[-1], "hessian")
    if hessian.device != w.device:
        raise ValueError(f"hessian is on {hessian.device} but w is on {w.device}")
    return check_global_amax(global_amax, w)


def static_block_amax(
    w0: torch.Tensor, h: torch.Tensor, g: torch.Tensor, scales: str, backend: str | None, damp: float = 0.0
) -> torch.Tensor:
    """Block amax fp32 [cout, cin/16] of w0 [cout, cin] by the search ``scales`` names (the local-Hessian ones
    read the 16x16 diagonal blocks of h [cin, cin]). A Hessian whose blocks are not positive semi-definite
    (only an indefinite H, which GPTQ itself had to damp by ``damp`` x mean(diag H) to factor) is searched on
    the blocks of that same damped matrix, so the scales and the rounding optimise one objective."""
    method = "local_hessian" if scales.startswith("local_hessian") else scales
    hb = block_diagonal(h).float() if method == "local_hessian" else None
    if hb is not None and not is_psd(hb):
        shift = damp * float(torch.diagonal(h).double().mean())
        hb = hb + shift * torch.eye(BLOCK, dtype=hb.dtype, device=hb.device)
    return search_scales(w0, method, hessian=hb, global_amax=g, backend=backend)


def rtn_fallback(
    w0: torch.Tensor, h: torch.Tensor, g: torch.Tensor, used: str, backend: str | None, why: str, damp: float,
    dead: int,
) -> GPTQOutput:
    """Round-to-nearest with the scales of the search ``used`` (prepare picks mse when the Hessian carries
    nothing trustworthy: all zero, or not factorable even with damping), named ``why``."""
    amax = static_block_amax(w0, h, g, used, backend)
    s_b = block_scale_values(amax, g)
    nb = w0.shape[1] // BLOCK
    code, q = quantize_blocks(w0.float().reshape(w0.shape[0], nb, BLOCK), s_b)
    return GPTQOutput(code.reshape(w0.shape), q.reshape(w0.shape), amax, damp, dead, why, used)


def prepare(
    w: torch.Tensor, hessian: torch.Tensor, global_amax, cfg: GPTQConfig, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, InverseFactor, GPTQOutput | None]:
    """Shared first steps of the fast path and the reference: (fp32 g, w with dead columns zeroed (w's dtype
    promoted to fp32), the inverse factor, and a fallback output when GPTQ cannot run, else None)."""
    g = check_inputs(w, hessian, global_amax, cfg)
    f = inverse_factor(hessian, cfg.damp, DAMP_RETRIES)
    w0 = w.float().clone()
    w0[:, f.dead] = 0.0
    dead = int(f.dead.sum())
    if dead == w.shape[1]:
        why = "every input channel had zero second moment (all calibration tokens zero); rounded to nearest, mse scales"
        return g, w0, f, rtn_fallback(w.float(), hessian, g, "mse", backend, why, float("nan"), dead)
    if f.u is None:
        used = "mse" if cfg.scales.startswith("local_hessian") else cfg.scales  # max / mse need no Hessian
        why = (
            f"Hessian not positive definite even with damping {f.damp:g} (after {DAMP_RETRIES} retries x10 from "
            f"{cfg.damp:g}); rounded to nearest with {used} scales"
        )
        return g, w0, f, rtn_fallback(w.float(), hessian, g, used, backend, why, f.damp, dead)
    return g, w0, f, None


class _Clock:
    """Adds the seconds since the last call to timings[phase] (synchronizing CUDA first); no-op without timings."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self.t = time.perf_counter() if timings is not None else 0.0

    def __call__(self, phase: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
        self.t = now


def _kernel_block(work, u, s_b, codes, q, i1: int, i2: int, dyn) -> None:
    """One lazy block [i1, i2) through the Triton kernel (padded to 128 columns; one launch), then the lazy
    update of the later columns. dyn: None (static scales s_b), or (m group factors, s_cand, a_cand, amax):
    the kernel searches each group's scales itself and the chosen indices fill amax and s_b here."""
    from fp4cal.gptq.kernel import BS, gptq_block

    cout, cin = work.shape
    width, j0 = i2 - i1, i1 // BLOCK
    w1 = torch.zeros(cout, BS, dtype=torch.float32, device=work.device)
    w1[:, :width] = work[:, i1:i2]
    u1 = torch.zeros(BS, BS, dtype=torch.float32, device=work.device)
    u1[:width, :width] = u[i1:i2, i1:i2]
    e1, q1 = torch.zeros_like(w1), torch.zeros_like(w1)
    c1 = torch.zeros(cout, BS, dtype=torch.int32, device=work.device)
    groups = width // BLOCK
    if dyn is None:
        s1 = torch.zeros(cout, BS // BLOCK, dtype=torch.float32, device=work.device)
        s1[:, :groups] = s_b[:, j0 : j0 + groups]
        gptq_block(w1, u1, s1, e1, q1, c1, 0, groups)
    else:
        m, s_cand, a_cand, amax = dyn
        idx = torch.zeros(cout, BS // BLOCK, dtype=torch.int32, device=work.device)
        gptq_block(w1, u1, idx, e1, q1, c1, 0, groups, m=m, s_cand=s_cand, j0=j0)
        pick = idx[:, :groups].long()
        amax[:, j0 : j0 + groups] = a_cand[pick]
        s_b[:, j0 : j0 + groups] = s_cand[pick]
    codes[:, i1:i2] = c1[:, :width]
    q[:, i1:i2] = q1[:, :width]
    if i2 < cin:
        work[:, i2:].addmm_(e1[:, :width], u[i1:i2, i2:], alpha=-1.0)


def check_kernel_device(w: torch.Tensor) -> None:
    """The Triton column loop needs CUDA tensors, or Triton's interpreter (TRITON_INTERPRET=1, set before
    triton is imported) for CPU tensors: otherwise a clear ValueError instead of Triton's pointer error."""
    if not w.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"gptq_round(kernel=True) needs CUDA tensors (w is on {w.device}); on the CPU either pass "
            "kernel=False (or None: the torch path) or set TRITON_INTERPRET=1 before importing triton"
        )


def gptq_round(
    w: torch.Tensor,
    hessian: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
    cfg: GPTQConfig | None = None,
    backend: str | None = None,
    work_dtype: torch.dtype = torch.float32,
    kernel: bool | None = None,
    timings: dict[str, float] | None = None,
) -> GPTQOutput:
    """GPTQ-round w [cout, cin] (float32|float16|bfloat16, cin % 16 == 0) onto NVFP4; see the module docstring.

    hessian: [cin, cin] float32|float64 on w's device, H = sum x x^T / n. global_amax: [] (default max |w|; a
    fused group passes its shared value). cfg: GPTQConfig (default scales local_hessian_dynamic, damp 0.01, 128-column
    blocks). backend: passed to search_scales. work_dtype: precision of the working weights and the error
    propagation (float32; float64 for the exactness tests). kernel: run each block's column loop in the Triton
    kernel (fp4cal.gptq.kernel; default: on CUDA with fp32 and 128-column blocks), else torch ops, any device;
    kernel=True on CPU tensors needs TRITON_INTERPRET=1 (tests), else ValueError.
    timings: when given, seconds are added to its 'factor' (validation, damping, Cholesky), 'scales' (static
    search) and 'column loop' (incl. dynamic searches and lazy updates) entries, with a device sync per phase.
    """
    cfg = cfg or GPTQConfig()
    clock = _Clock(timings, w.device)
    g, w0, f, fallback = prepare(w, hessian, global_amax, cfg, backend)
    clock("factor")
    if fallback is not None:
        return fallback
    cout, cin = w0.shape
    u = f.u.to(work_dtype)
    dynamic = cfg.scales == "local_hessian_dynamic"
    if dynamic:
        m = group_factors(f.u)
        s_cand = candidate_block_scales(global_scale(g))
        a_cand = scale_candidates(g)
        amax = torch.empty(cout, cin // BLOCK, dtype=torch.float32, device=w.device)
        s_b = torch.empty_like(amax)
    else:
        amax = static_block_amax(w0, hessian, g, cfg.scales, backend, f.damp)
        s_b = block_scale_values(amax, g)
    clock("scales")
    work = w0.to(work_dtype)
    codes = torch.empty(cout, cin, dtype=torch.int32, device=w.device)
    q = torch.empty(cout, cin, dtype=torch.float32, device=w.device)
    bs = cfg.block_size
    if kernel is None:
        kernel = w.is_cuda and work_dtype == torch.float32 and bs == 128 and triton_available()
    if kernel and (work_dtype != torch.float32 or bs != 128):
        raise ValueError(f"the GPTQ kernel runs fp32 128-column blocks, got work_dtype {work_dtype}, block_size {bs}")
    if kernel:
        check_kernel_device(w)

    def pick_group(grp: torch.Tensor, j: int) -> None:  # dynamic scales of group j from its updated columns
        p = search_group(grp, m[j], s_cand)
        amax[:, j] = a_cand[p]
        s_b[:, j] = s_cand[p]

    for i1 in range(0, cin, bs):
        i2 = min(i1 + bs, cin)
        if kernel:
            _kernel_block(work, u, s_b, codes, q, i1, i2, (m, s_cand, a_cand, amax) if dynamic else None)
            continue
        w1 = work[:, i1:i2].clone()
        e1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = col // BLOCK
            if dynamic and col % BLOCK == 0:
                pick_group(w1[:, i : i + BLOCK], j)
            c, qc = round_column(w1[:, i], s_b[:, j])
            codes[:, col] = c
            q[:, col] = qc
            err = (w1[:, i] - qc.to(work_dtype)) / u1[i, i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1.0)
            e1[:, i] = err
        if i2 < cin:
            work[:, i2:].addmm_(e1, u[i1:i2, i2:], alpha=-1.0)
    clock("column loop")
    return GPTQOutput(codes, q, amax, f.damp, int(f.dead.sum()), None, cfg.scales)
