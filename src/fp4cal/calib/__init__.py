"""Calibration: activation capture, per-block Hessians, and calibrate()."""

from fp4cal.calib.calibrate import CalibrationWarning, calibrate, fake_quantize_model, solve
from fp4cal.calib.capture import ActivationCapture, CaptureStats, capture_statistics
from fp4cal.calib.data import calibration_batches, evaluation_batches, load_texts
from fp4cal.calib.hessian import HessianAccumulator
from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.calib.targets import DEFAULT_EXCLUDE, Target, find_targets

__all__ = [
    "DEFAULT_EXCLUDE",
    "ActivationCapture",
    "CalibrationResult",
    "CalibrationWarning",
    "CaptureStats",
    "HessianAccumulator",
    "Target",
    "WeightResult",
    "calibrate",
    "calibration_batches",
    "capture_statistics",
    "evaluation_batches",
    "fake_quantize_model",
    "find_targets",
    "load_texts",
    "solve",
]
