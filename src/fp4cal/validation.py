"""Input checks shared by every public entry point.

Each check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad dtype) with a message that
names the argument, says what it got and what was expected. Validation happens once, at the public
entry; internal helpers trust their inputs.
"""

from __future__ import annotations

import torch

BLOCK = 16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(w: torch.Tensor, name: str = "w", allow_stack: bool = False, values: bool = True) -> None:
    """A weight [cout, cin] (or [E, cout, cin] when ``allow_stack``) of a float dtype, finite, cin % 16 == 0.

    values=False skips the finiteness scan (a host sync); the caller then owes that check (the kernel path
    does it on the device and raises the same message through check_finite).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {w.dtype}")
    dims = (2, 3) if allow_stack else (2,)
    if w.dim() not in dims:
        want = "[cout, cin] or [E, cout, cin]" if allow_stack else "[cout, cin]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); expected at least one block of 16")
    if w.shape[-1] % BLOCK:
        raise ValueError(
            f"{name} has cin = {w.shape[-1]} (shape {tuple(w.shape)}), which is not divisible by the "
            f"NVFP4 block size {BLOCK}"
        )
    if values:
        check_finite(w, name)


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or Inf); expected all finite")


def check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; expected the same device")


def abs_max(w: torch.Tensor) -> torch.Tensor:
    """max |w| over the last two dims as fp32 ([] or [E]), without an |w| copy of the tensor (0.75 GiB for a
    Qwen3-30B-A3B expert stack)."""
    return torch.maximum(w.amax(dim=(-2, -1)), -w.amin(dim=(-2, -1))).float()


def check_global_amax(
    g: torch.Tensor | float | None, w: torch.Tensor, name: str = "global_amax", values: bool = True
) -> torch.Tensor:
    """Return the per-tensor amax as an fp32 tensor on w's device ([] or [E] for expert stacks)."""
    lead = w.shape[:-2]
    if g is None:
        return abs_max(w)
    if not isinstance(g, torch.Tensor):
        g = torch.tensor(float(g), dtype=torch.float32, device=w.device)
    if g.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be a float tensor, got dtype {g.dtype}")
    check_same_device(w, g, "w", name)
    if g.numel() == 1 and len(lead) == 0:
        g = g.reshape(())
    elif tuple(g.shape) != tuple(lead) and not (g.numel() == 1):
        raise ValueError(f"{name} must be a scalar or of shape {tuple(lead)}, got shape {tuple(g.shape)}")
    if g.numel() == 1 and len(lead):
        g = g.reshape(()).expand(lead)
    if values:
        check_global_amax_values(g, name)
    return g.float()


def check_global_amax_values(g: torch.Tensor, name: str = "global_amax") -> None:
    """Finite and >= 0 (the value half of check_global_amax)."""
    check_finite(g, name)
    if bool((g < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {g.min().item()}")


def check_block_amax(a: torch.Tensor, w: torch.Tensor, name: str = "block_amax") -> torch.Tensor:
    want = tuple(w.shape[:-1]) + (w.shape[-1] // BLOCK,)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be a float tensor, got dtype {a.dtype}")
    if tuple(a.shape) != want:
        raise ValueError(f"{name} must have shape {want} (one amax per 16-block of w), got {tuple(a.shape)}")
    check_same_device(w, a, "w", name)
    check_finite(a, name)
    if bool((a < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {a.min().item()}")
    return a.float()


def check_hessian(h: torch.Tensor, w: torch.Tensor, name: str = "hessian", values: bool = True) -> torch.Tensor:
    """Per-block Hessians: [cin/16, 16, 16] for w [cout, cin], [E, cin/16, 16, 16] for w [E, cout, cin]."""
    if h is None:
        raise ValueError(f"{name} is required for method 'local_hessian'; expected a [cin/16, 16, 16] tensor")
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be a float tensor, got dtype {h.dtype}")
    nb = w.shape[-1] // BLOCK
    want = tuple(w.shape[:-2]) + (nb, BLOCK, BLOCK)
    if h.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(h.shape)}); expected shape {want}")
    if tuple(h.shape) != want:
        # A stack of experts may share one Hessian: accept [cin/16, 16, 16] then.
        if not (w.dim() == 3 and tuple(h.shape) == (nb, BLOCK, BLOCK)):
            raise ValueError(
                f"{name} must have shape {want} to match w of shape {tuple(w.shape)} "
                f"(cin = {w.shape[-1]} gives {nb} blocks of 16), got {tuple(h.shape)}"
            )
    check_same_device(w, h, "w", name)
    if values:
        check_finite(h, name)
    return h
