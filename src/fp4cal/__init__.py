"""fp4cal: NVFP4 weight quantization with the most accurate block scales.

Public API: fake_quantize, quantize, dequantize, scale_candidates, search_scales, HessianAccumulator,
calibrate, fake_quantize_model, CalibrationResult, WeightResult, export, load, evaluate, EvalResult, write_report.
"""

from fp4cal.calib.calibrate import calibrate, fake_quantize_model
from fp4cal.calib.hessian import HessianAccumulator
from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.eval import EvalResult, evaluate, write_report
from fp4cal.export import export, load
from fp4cal.numerics import NVFP4Tensor, dequantize, fake_quantize, quantize, scale_candidates
from fp4cal.search import search_scales

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "EvalResult",
    "HessianAccumulator",
    "WeightResult",
    "calibrate",
    "fake_quantize_model",
    "NVFP4Tensor",
    "dequantize",
    "evaluate",
    "export",
    "fake_quantize",
    "load",
    "quantize",
    "scale_candidates",
    "search_scales",
    "write_report",
]
