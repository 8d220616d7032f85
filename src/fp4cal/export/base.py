"""What both checkpoint formats store for one quantized module, and the dequantization of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4cal.numerics import GLOBAL_DIVISOR, NVFP4Tensor, dequantize, e2m1_value, unpack_codes
from fp4cal.validation import BLOCK


@dataclass
class QuantizedModule:
    """One quantized Linear as a serving engine sees it (an expert of a stack is one module).

    module: checkpoint module name, e.g. "model.layers.0.mlp.experts.3.gate_proj".
    codes: uint8 [cout, cin/2], element 2k in the low nibble, sign in bit 3.
    block_scale: float8_e4m3fn [cout, cin/16], the FP8 code v of each block.
    global_scale: fp32 [], s_g = fp32(g / 2688) exactly as fp4cal.numerics computes it.
    input_amax: fp32 [] max |x| at the module's input (W4A4 export only), else None.
    """

    module: str
    codes: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    input_amax: torch.Tensor | None = None


def input_scale(input_amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor activation scale fp32(amax / 2688) (the activation analogue of s_g), fp32 []."""
    return (input_amax.float() / GLOBAL_DIVISOR).reshape(())


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp32(1 / scale), the "global scale" convention of compressed-tensors; 1.0 where scale is 0, as
    compressed-tensors itself stores for an all-zero tensor (any value dequantizes zeros to zeros)."""
    s = scale.float()
    return torch.where(s > 0, 1.0 / s, torch.ones_like(s))


def dequantize_module(codes: torch.Tensor, block_scale: torch.Tensor, s_g: torch.Tensor, dtype=torch.float32):
    """fp4cal's dequantization (fp4cal.numerics.dequantize): sign * fp32(E2M1 * fp32(v * s_g))."""
    return dequantize(NVFP4Tensor(codes, block_scale, s_g.float().reshape(()), dtype), dtype)


def dequantize_divide(codes: torch.Tensor, block_scale: torch.Tensor, gs: torch.Tensor, dtype=torch.float32):
    """The compressed-tensors convention: sign * fp32(E2M1 * fp32(v / gs)), gs the stored reciprocal
    global scale. This is what compressed-tensors' NVFP4 decompressor computes (before its final cast
    to bfloat16), used for checkpoints that fp4cal did not write."""
    c = unpack_codes(codes).to(torch.int32)
    cb = c.reshape(*c.shape[:-1], c.shape[-1] // BLOCK, BLOCK)
    s_b = block_scale.float() / gs.float().reshape(())
    mag = e2m1_value(cb & 7) * s_b.unsqueeze(-1)
    return torch.where((cb & 8) > 0, -mag, mag).reshape(c.shape).to(dtype)
