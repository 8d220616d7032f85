"""NVFP4 numerics: the one place the format is defined.

NVFP4 stores a weight w as a 4-bit E2M1 code (sign + magnitude in {0, .5, 1, 1.5, 2, 3, 4, 6}), one
FP8-E4M3 scale per 16 consecutive weights along the last (input) dimension, and one FP32 scale per
tensor. All arithmetic below is float32, in exactly this order, so that fake-quantization equals what a
serving engine computes from the stored FP8 code and per-tensor scale:

    s_g = fp32(g / 2688)                       g = global amax, 2688 = 6 * 448
    v   = e4m3(fp32(fp32(a / 6) / s_g))        a = block amax; RNE, saturating at 448
    s_b = fp32(v * s_g)                        the block scale
    x   = fp32(|w| / s_b)                      one IEEE division
    q   = sign(w) * fp32(E2M1(x) * s_b)        the dequantized weight

E2M1(x) rounds to nearest, ties to even, and saturates at 6. A block whose scale s_b is 0 (all-zero block,
g = 0, or a block so small that its FP8 code underflows) dequantizes to zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4cal.validation import (
    BLOCK,
    FLOAT_DTYPES,
    check_block_amax,
    check_finite,
    check_global_amax,
    check_same_device,
    check_weight,
)

E2M1_MAX = 6.0
FP8_MAX = 448.0
GLOBAL_DIVISOR = E2M1_MAX * FP8_MAX  # 2688
N_SCALE_CANDIDATES = 126  # finite positive FP8-E4M3 values: the block-scale candidates of every search
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive E2M1 levels, and whether a value exactly on the midpoint rounds up
# (ties to even: the even neighbour is the one whose code is even: 0, 1, 2, 4).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIE_UP = (False, True, False, True, False, True, False)


def e2m1_code(x: torch.Tensor) -> torch.Tensor:
    """Magnitude code 0..7 of non-negative fp32 x, round-to-nearest-even, saturating.

    x <= .25 -> 0; < .75 -> 1 (0.5); <= 1.25 -> 2 (1); < 1.75 -> 3 (1.5); <= 2.5 -> 4 (2); < 3.5 -> 5 (3);
    <= 5 -> 6 (4); else 7 (6). NaN maps to 0. Returns int32 of x's shape.
    """
    code = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    for t, up in zip(E2M1_MIDPOINTS, E2M1_TIE_UP, strict=True):
        code += (x >= t if up else x > t).to(torch.int32)
    return code


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """fp32 magnitude of an E2M1 magnitude code 0..7 (any integer tensor)."""
    levels = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=code.device)
    return levels[code.long()]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """E2M1 rounding of non-negative fp32 magnitudes: fp32 values in {0, .5, 1, 1.5, 2, 3, 4, 6}."""
    return e2m1_value(e2m1_code(x))


def fp8_e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 x >= 0 to the nearest FP8-E4M3 value (ties to even), saturating at 448; fp32 result.

    Clamping first makes the saturation explicit: torch's cast of values above 448 is not saturating on
    every version.
    """
    return x.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def fp8_e4m3_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 126 finite positive FP8-E4M3 values (bytes 0x01..0x7E), ascending, fp32 [126]."""
    codes = torch.arange(1, 0x7F, dtype=torch.uint8, device=device)
    return codes.view(torch.float8_e4m3fn).to(torch.float32)


def _true_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d as one IEEE division on every device.

    On CUDA, torch turns division by a Python (or other CPU) scalar into a multiplication by its
    reciprocal, which can differ from x / d in the last bit; a divisor tensor on x's own device keeps the
    true division, so CPU and GPU give the same bits.
    """
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale s_g = fp32(g / 2688), fp32, same shape as g."""
    return _true_div(global_amax.float(), GLOBAL_DIVISOR)


def block_scale_code(block_amax: torch.Tensor, s_g: torch.Tensor) -> torch.Tensor:
    """FP8-E4M3 block scale v = e4m3(fp32(fp32(a / 6) / s_g)) as fp32; 0 where s_g == 0.

    block_amax: [..., nb] fp32; s_g: broadcastable to block_amax ([] or [..., 1]).
    """
    ratio = _true_div(block_amax.float(), E2M1_MAX) / s_g
    ratio = torch.where(s_g > 0, ratio, torch.zeros_like(ratio))
    return fp8_e4m3_round(ratio)


def block_scale(block_amax: torch.Tensor, s_g: torch.Tensor) -> torch.Tensor:
    """fp32 block scale s_b = fp32(v * s_g), v = block_scale_code(block_amax, s_g): what a block is divided by
    before E2M1 rounding and what its codes are multiplied by after. Shapes as block_scale_code."""
    return block_scale_code(block_amax, s_g) * s_g


def scale_candidates(global_amax: torch.Tensor | float) -> torch.Tensor:
    """The 126 block-amax candidates g * v / 448, one per finite positive FP8-E4M3 value v, ascending.

    global_amax: scalar or [E] -> fp32 [126] or [E, 126]. The product is formed in float64 and rounded
    once, so that block_scale_code(candidate, s_g) gives back exactly v (tested for all 126 values).
    """
    g = torch.as_tensor(global_amax)
    if g.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"global_amax must be a float, got dtype {g.dtype}")
    if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise ValueError(f"global_amax must be finite and >= 0, got {g.tolist()}")
    v = fp8_e4m3_values(g.device).double()
    # g.float() first: quantize and the search use the fp32 global amax, so the candidates must too.
    return _true_div(g.float().double().unsqueeze(-1) * v, FP8_MAX).float()


def weight_blocks(w: torch.Tensor) -> torch.Tensor:
    """[..., cin] -> [..., cin/16, 16] fp32 view of the weights."""
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def block_max(w: torch.Tensor) -> torch.Tensor:
    """Each 16-block's own amax: w [..., cin] -> fp32 [..., cin/16] (the 'max' scale choice)."""
    return weight_blocks(w).abs().amax(dim=-1)


def _scales(w: torch.Tensor, block_amax: torch.Tensor | None, global_amax) -> tuple:
    """Validated (fp32 blocks [..., nb, 16], v [..., nb], s_g [...], s_b [..., nb])."""
    g = check_global_amax(global_amax, w)
    a = block_max(w) if block_amax is None else check_block_amax(block_amax, w)
    s_g = global_scale(g)
    sg_b = s_g.reshape(*s_g.shape, 1, 1)  # broadcast over [cout, nb]
    v = block_scale_code(a, sg_b)
    s_b = v * sg_b
    return weight_blocks(w), v, s_g, s_b


def quantize_blocks(wb: torch.Tensor, s_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Core rounding of fp32 blocks. wb: [..., nb, 16]; s_b: [..., nb] (or broadcastable) fp32.

    Returns (code [..., nb, 16] int32 with the sign in bit 3, dequantized fp32 [..., nb, 16]).
    """
    s = s_b.unsqueeze(-1)
    x = wb.abs() / s
    x = torch.where(s > 0, x, torch.zeros_like(x))
    mag = e2m1_code(x)
    neg = wb < 0
    q = e2m1_value(mag) * s
    q = torch.where(neg, -q, q)
    return mag | (neg.to(torch.int32) << 3), q


def fake_quantize(
    w: torch.Tensor,
    block_amax: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize then dequantize in one call.

    w: [cout, cin] or [E, cout, cin] float32|float16|bfloat16, cin % 16 == 0.
    block_amax: [..., cout, cin/16] (default: each block's own max |w|).
    global_amax: scalar or [E] (default: max |w| of each tensor).
    Returns the dequantized weights, shape of w, in ``dtype`` (default w.dtype).
    """
    check_weight(w, "w", allow_stack=True)
    wb, _, _, s_b = _scales(w, block_amax, global_amax)
    _, q = quantize_blocks(wb, s_b)
    return q.reshape(w.shape).to(dtype or w.dtype)


@dataclass
class NVFP4Tensor:
    """A quantized weight.

    codes: uint8 [..., cout, cin/2], element 2k in the low nibble, 2k+1 in the high nibble, sign in bit 3.
    block_scale: float8_e4m3fn [..., cout, cin/16], the FP8 code v of each block.
    global_scale: float32 [] or [E], s_g = g / 2688 (the per-tensor scale; engines' "global scale" is often
        its reciprocal).
    dtype: the original dtype, used by dequantize by default.
    """

    codes: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.codes.shape[-1] * 2)


def pack_codes(code: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 [..., n] (n even) -> uint8 [..., n/2], element 2k in the low nibble."""
    c = code.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> uint8 codes [..., n]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(
    w: torch.Tensor,
    block_amax: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
) -> NVFP4Tensor:
    """Quantize w [cout, cin] or [E, cout, cin] (float32|float16|bfloat16) to NVFP4.

    See fake_quantize for the arguments. Returns an NVFP4Tensor (packed codes, FP8 block scales, FP32
    per-tensor scale s_g).
    """
    check_weight(w, "w", allow_stack=True)
    wb, v, s_g, s_b = _scales(w, block_amax, global_amax)
    code, _ = quantize_blocks(wb, s_b)
    packed = pack_codes(code.reshape(w.shape))
    return NVFP4Tensor(packed, v.to(torch.float8_e4m3fn), s_g, w.dtype)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4Tensor -> dense weights [..., cout, cin] in ``dtype`` (default the original dtype).

    value = sign * fp32(E2M1 * s_b), s_b = fp32(v * s_g): bit-identical to fake_quantize.
    """
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"q must be an NVFP4Tensor, got {type(q).__name__}")
    if q.codes.dtype != torch.uint8:
        raise TypeError(f"q.codes must be uint8, got dtype {q.codes.dtype}")
    if q.block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q.block_scale must be float8_e4m3fn, got dtype {q.block_scale.dtype}")
    if q.global_scale.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"q.global_scale must be a float tensor, got dtype {q.global_scale.dtype}")
    if q.codes.dim() not in (2, 3) or q.codes.numel() == 0:
        raise ValueError(f"q.codes must be a non-empty [cout, cin/2] or [E, cout, cin/2], got {tuple(q.codes.shape)}")
    check_same_device(q.codes, q.block_scale, "q.codes", "q.block_scale")
    check_same_device(q.codes, q.global_scale, "q.codes", "q.global_scale")
    codes = unpack_codes(q.codes).to(torch.int32)
    shape = codes.shape
    if shape[-1] % BLOCK or shape[-1] // BLOCK != q.block_scale.shape[-1] or shape[:-1] != q.block_scale.shape[:-1]:
        raise ValueError(
            f"q.block_scale has shape {tuple(q.block_scale.shape)}, expected "
            f"{tuple(shape[:-1]) + (shape[-1] // BLOCK,)} for codes of {tuple(shape)} weights"
        )
    if tuple(q.global_scale.shape) != tuple(shape[:-2]):
        raise ValueError(
            f"q.global_scale must have shape {tuple(shape[:-2])} (one per tensor), got {tuple(q.global_scale.shape)}"
        )
    for name, t in (("q.block_scale", q.block_scale.float()), ("q.global_scale", q.global_scale)):
        check_finite(t, name)
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got min {t.min().item()}")
    s_g = q.global_scale.float()
    s_b = q.block_scale.float() * s_g.reshape(*s_g.shape, 1, 1)
    cb = codes.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    mag = e2m1_value(cb & 7) * s_b.unsqueeze(-1)
    out = torch.where((cb & 8) > 0, -mag, mag)
    return out.reshape(shape).to(dtype or q.dtype)
