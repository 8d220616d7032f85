"""GPTQ rounding onto NVFP4 with fixed or re-searched block scales (method='gptq').

Sits beside fp4cal.search and uses it (and fp4cal.numerics) only: calib calls gptq_round per weight.
    hessian.py    damping, dead channels, the Cholesky factor of the inverse Hessian
    core.py       gptq_round: the fast path (batched torch ops, lazy 128-column updates, any device)
    reference.py  gptq_reference: float64, column by column, with decision-by-decision parity counts
"""

from fp4cal.gptq.core import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SCALES,
    SCALES,
    GPTQConfig,
    GPTQOutput,
    gptq_round,
    layer_objective,
)
from fp4cal.gptq.hessian import DEFAULT_DAMP, block_diagonal, check_damp, inverse_factor
from fp4cal.gptq.reference import Parity, gptq_reference

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DAMP",
    "DEFAULT_SCALES",
    "SCALES",
    "GPTQConfig",
    "GPTQOutput",
    "Parity",
    "block_diagonal",
    "check_damp",
    "gptq_reference",
    "gptq_round",
    "inverse_factor",
    "layer_objective",
]
