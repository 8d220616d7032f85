"""Export NVFP4 checkpoints that serving engines load, and read them back.

export(result, model, out_dir, format="compressed-tensors" | "modelopt", ...) writes a checkpoint directory;
load(out_dir) reads either format back as a model (or dict) with dequantized weights.

Note: ``fp4cal.export`` (the attribute of the top-level package) is the export() function; reach this
package's modules with ``from fp4cal.export import exporter, io, layout, ...``.
"""

from fp4cal.export.exporter import FORMATS, export
from fp4cal.export.loader import load, load_state_dict

__all__ = ["FORMATS", "export", "load", "load_state_dict"]
