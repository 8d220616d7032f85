"""Calibration: activation capture, per-block Hessians, and calibrate()."""

from fp4cal.calib.hessian import HessianAccumulator

__all__ = ["HessianAccumulator"]
