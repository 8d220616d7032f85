"""The GPTQ Hessian: damping, dead input channels, and the upper Cholesky factor of its inverse.

Given the input second moment H = sum_t x_t x_t^T / n ([cin, cin]) of one linear layer:

    dead   = {i : H_ii == 0}                      input channels never active in the calibration data
    H_ii   = 1 for i in dead                      (their weight columns are zeroed by the caller)
    H'     = H + lambda * mean(diag H) * I        damping; the mean is taken after the dead fix, as GPTQ does
    U      = upper Cholesky factor of H'^-1       H'^-1 = U^T U, U upper triangular

U without forming H'^-1: with J the reversal permutation, J H' J = L L^T (a lower Cholesky factor) gives
H'^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a positive diagonal,
so it is U (the Cholesky factor is unique). One Cholesky and one triangular solve, n^3 / 3 + n^3 / 2 flops,
instead of a Cholesky, an inverse from it and a second Cholesky (~4 n^3 / 3; measured 6x slower on a CPU).

All of it in float64 (a [cin, cin] Cholesky is a small part of the time, and float64 keeps the factor the
same on every device to ~1e-12). When H' is not positive definite, lambda is multiplied by 10 and the
factorization retried, at most ``retries`` times; after that the caller falls back to round-to-nearest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp4cal.validation import BLOCK

DEFAULT_DAMP = 0.01
DAMP_RETRIES = 3  # lambda, 10 lambda, 100 lambda, 1000 lambda


def check_damp(damp: float, name: str = "gptq_damp") -> float:
    """The relative damping lambda as a float: finite and > 0, else ValueError naming ``name``."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (relative damping, e.g. 0.01), got {damp!r}")
    return float(damp)


def check_full_hessian(h: torch.Tensor, cin: int, name: str = "hessian") -> None:
    """h must be a finite float [cin, cin] tensor (symmetric up to rounding is the caller's business)."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [cin, cin], got {type(h).__name__}")
    if h.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {h.dtype}")
    if tuple(h.shape) != (cin, cin):
        raise ValueError(f"{name} must have shape [cin, cin] = {(cin, cin)}, got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf); the calibration activations overflowed?")


@dataclass
class InverseFactor:
    """Result of inverse_factor.

    u: float64 [cin, cin] upper triangular with (H + lambda mean(diag H) I)^-1 = u^T u; None when no damping
        up to the last retry gave a positive definite matrix.
    dead: bool [cin], input channels with H_ii == 0. damp: the lambda that worked (the last one tried if none).
    """

    u: torch.Tensor | None
    dead: torch.Tensor
    damp: float


def inverse_factor(h: torch.Tensor, damp: float = DEFAULT_DAMP, retries: int = DAMP_RETRIES) -> InverseFactor:
    """Dampen H [cin, cin] (float32|float64) and factor its inverse; see the module docstring."""
    damp = check_damp(damp)
    hd = h.double().clone()
    diag = torch.diagonal(hd)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(hd.shape[0], dtype=torch.float64, device=hd.device)
    lam = damp
    for attempt in range(retries + 1):
        if attempt:
            lam *= 10.0
        lower, info = torch.linalg.cholesky_ex((hd + (lam * mean) * eye).flip(0, 1))  # J H' J = L L^T
        if int(info) != 0:
            continue
        u = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)  # J L^-1 J (module docstring)
        if bool(torch.isfinite(u).all()):
            return InverseFactor(u, dead, lam)
    return InverseFactor(None, dead, lam)


def conditional_block_hessians(u: torch.Tensor) -> torch.Tensor:
    """Per 16-column group g, the Hessian of g's rounding error once the columns before g are fixed and the
    columns after g compensate: (U_gg^T U_gg)^-1, U_gg the group's 16x16 diagonal block of u.

    Why: GPTQ's loss for errors e_g of group g (earlier columns already quantized, later ones still free) is
    e_g^T ((H^-1 restricted to the remaining columns)_gg)^-1 e_g, and since U is upper triangular and g is the
    first remaining group, that restricted block is U_gg^T U_gg. u: float64 [cin, cin] -> float64 [cin/16, 16, 16].
    """
    nb = u.shape[0] // BLOCK
    blocks = torch.stack([u[j * BLOCK : (j + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] for j in range(nb)])
    m = blocks.transpose(-1, -2) @ blocks
    return torch.cholesky_inverse(torch.linalg.cholesky(m))


def block_diagonal(h: torch.Tensor) -> torch.Tensor:
    """The 16x16 diagonal blocks of h [cin, cin] -> [cin/16, 16, 16] (same dtype; what the scale search takes)."""
    nb = h.shape[0] // BLOCK
    return h.reshape(nb, BLOCK, nb, BLOCK).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
