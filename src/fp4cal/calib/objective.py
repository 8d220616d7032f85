"""A calibrated weight's block scales from its chosen block amax: the FP8 codes an export writes and the fp32 scales
fake quantization applies (fp4cal.numerics' rounding). The searched objective of a whole weight, as the reports give
it, is fp4cal.search.reference.reference_losses."""

from __future__ import annotations

import torch

from fp4cal.numerics import block_scale_code, global_scale


def block_scales(block_amax: torch.Tensor, global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 code v as float8_e4m3fn, fp32 block scale s_b = v * s_g), both [..., cout, cin/16].

    block_amax: fp32 [..., cout, cin/16]; global_amax: fp32 [] or [E].
    """
    s_g = global_scale(global_amax).reshape(*global_amax.shape, 1, 1)
    v = block_scale_code(block_amax, s_g)
    return v.to(torch.float8_e4m3fn), v * s_g
