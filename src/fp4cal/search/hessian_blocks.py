"""What a 16x16 block Hessian may decide: the MSE fallback for blocks without information, and the PSD check.

A block Hessian H_j = X_j^T X_j / n (X_j: the calibration inputs of the block's 16 input channels) carries no
information when its trace is 0, i.e. (H_j being PSD) when H_j = 0: none of the 16 channels was ever non-zero in
calibration. Its objective dw^T H_j dw is then 0 for every candidate, and the argmin would be the smallest
candidate (all weights rounded to 0), which is wrong wherever those channels are active after calibration. Such a
block is searched with the squared error instead (the identity Hessian, whose local-Hessian pick is exactly
the MSE pick), in the reference, the CPU path and the kernels alike; ``fallback_blocks`` counts them.

A Hessian that is not positive semi-definite (beyond fp32 rounding) is not a second moment: ``check_psd``
refuses it, naming the block and its smallest eigenvalue.
"""

from __future__ import annotations

import torch

from fp4cal.validation import BLOCK

# Smallest eigenvalue allowed, relative to the block's largest |entry|. An fp32 X^T X / n has eigenvalue errors
# of a few fp32 ulps of its norm (rounding of the entries, ~1e-7 relative); 1e-4 leaves a wide margin for
# accumulations over many batches while refusing any materially indefinite block (a negative-definite one has
# -1 relative).
PSD_RTOL = 1e-4


def fallback_mask(h: torch.Tensor) -> torch.Tensor:
    """bool [...]: True for the blocks of h [..., 16, 16] whose diagonal is all zero (searched with the MSE
    objective): on a block with a non-negative diagonal, every block check_psd accepts, that is a zero trace.

    The criterion is exact, so it is the same on every device and needs no tolerance, and it is the factor
    kernel's (kernels._factor_block): a trace-zero block with a negative diagonal entry is not replaced but refused
    as not PSD on every backend; a block with any active channel keeps its Hessian."""
    return (torch.diagonal(h, dim1=-2, dim2=-1) == 0).all(-1)


def fallback_blocks(h: torch.Tensor | None, cout: int) -> int:
    """Number of weight blocks searched with the MSE fallback: cout x the zero-trace Hessian blocks of h
    ([..., nb, 16, 16], one per block column; a shared [nb, 16, 16] for an expert stack counts once per
    expert only if the caller passes it per expert). 0 for h None. Reads one integer from h's device."""
    if h is None:
        return 0
    return int(fallback_mask(h).sum()) * cout


def with_fallback(h: torch.Tensor) -> torch.Tensor:
    """h with every zero-trace block replaced by the identity (the MSE objective); h itself when there is none.
    No host synchronisation (torch.where on h's device)."""
    eye = torch.eye(BLOCK, dtype=h.dtype, device=h.device)
    return torch.where(fallback_mask(h)[..., None, None], eye, h)


def _psd_test(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symmetrised float64 h, smallest eigenvalue, largest |entry|, failing-block mask) per block of h."""
    hd = h.detach().double()
    hd = (hd + hd.transpose(-1, -2)) * 0.5
    lam = torch.linalg.eigvalsh(hd)[..., 0]
    scale = hd.abs().amax(dim=(-2, -1))
    return hd, lam, scale, lam < -PSD_RTOL * scale


def is_psd(h: torch.Tensor) -> bool:
    """Whether every block of h [..., 16, 16] passes check_psd (same criterion, no exception)."""
    return not bool(_psd_test(h)[3].any())


def check_psd(h: torch.Tensor, name: str = "hessian") -> None:
    """Raise ValueError if a block of h [..., 16, 16] has an eigenvalue below -PSD_RTOL x its largest |entry|
    (after symmetrising). The message names the first such block (its index in h's leading dims), its smallest
    eigenvalue and its largest diagonal entry. float64 eigenvalues, on h's device."""
    hd, lam, scale, bad = _psd_test(h)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        diag = torch.diagonal(hd[idx])
        raise ValueError(
            f"{name} block {idx} (of {tuple(h.shape[:-2])} blocks) is not positive semi-definite: smallest "
            f"eigenvalue {float(lam[idx]):.6g}, diagonal from {float(diag.min()):.6g} to {float(diag.max()):.6g} "
            f"(allowed down to -{PSD_RTOL:g} x its largest |entry| {float(scale[idx]):.6g}); "
            f"{int(bad.sum())} of {bad.numel()} blocks fail. A Hessian X^T X / n is PSD: check how it was built"
        )
