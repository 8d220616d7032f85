"""Streaming quantization: a checkpoint on disk -> an NVFP4 checkpoint, one decoder layer at a time.

quantize_checkpoint(model_dir, out_dir, ...) never holds the whole model: see fp4cal.stream.engine.
"""

from fp4cal.stream.engine import PROPAGATIONS, StreamReport, quantize_checkpoint

__all__ = ["PROPAGATIONS", "StreamReport", "quantize_checkpoint"]
