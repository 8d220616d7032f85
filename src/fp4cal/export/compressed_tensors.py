"""compressed-tensors ``nvfp4-pack-quantized``: the format vLLM, SGLang and transformers load.

Per quantized module M (layout of compressed-tensors 0.20's NVFP4PackedCompressor):
    M.weight_packed        uint8 [out, in/2]            two E2M1 codes per byte, element 2k in the low nibble
    M.weight_scale         float8_e4m3fn [out, in/16]   the FP8 block scale codes v
    M.weight_global_scale  float32 [1]                  gs = fp32(1 / s_g), the reciprocal of fp4cal's s_g
    M.input_global_scale   float32 [1]                  (W4A4 only) fp32(1 / fp32(input_amax / 2688))
and config.json gets the ``quantization_config`` block that compressed-tensors writes for its NVFP4A16
(weight-only) or NVFP4 (W4A4) preset, built with the library's own classes when it is installed.

Numerics: compressed-tensors dequantizes as fp32(E2M1 * fp32(v / gs)) and casts to bfloat16; fp4cal
dequantizes as fp32(E2M1 * fp32(v * s_g)). fp32(v / fp32(1 / s_g)) differs from fp32(v * s_g) by one
fp32 ulp for some (s_g, v) pairs, so the two agree exactly except for rare values where that ulp
crosses a bfloat16 rounding boundary (see docs/export.md). To keep fp4cal's own round trip exact,
each shard header records s_g for the modules it holds (key ``fp4cal_global_scale``: module -> float.hex);
serving engines ignore header metadata.
"""

from __future__ import annotations

import torch

from fp4cal.export.base import (
    QuantizedModule,
    dequantize_divide,
    dequantize_module,
    input_scale,
    reciprocal_scale,
)

NAME = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
SG_METADATA_KEY = "fp4cal_global_scale"
# Tensor suffixes of one quantized module (shared with the loader and fp4cal check).
CODES, BLOCK_SCALE, GLOBAL_SCALE = "weight_packed", "weight_scale", "weight_global_scale"
INPUT_SCALE = "input_global_scale"
GLOBAL_IS_RECIPROCAL = True  # weight_global_scale is 1 / s_g: dequantized = E2M1 * v / weight_global_scale
GLOBAL_SHAPES = ((1,), ())  # compressed-tensors writes [1]
# The fallback config (written when compressed-tensors is not installed) follows the on-disk layout of
# compressed-tensors 0.20. It carries no "version" key: that key names the library release that wrote the
# file, and fp4cal is not that library (loaders do not require the key; a test proves the library parses
# the fallback).


def module_tensors(qm: QuantizedModule, w4a4: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Checkpoint tensors of one quantized module, and the shard-header metadata entries to record."""
    m = qm.module
    out = {
        f"{m}.weight_packed": qm.codes,
        f"{m}.weight_scale": qm.block_scale,
        f"{m}.weight_global_scale": reciprocal_scale(qm.global_scale).reshape(1),
    }
    if w4a4:
        out[f"{m}.input_global_scale"] = reciprocal_scale(input_scale(qm.input_amax)).reshape(1)
    meta = {SG_METADATA_KEY: {m: float(qm.global_scale.float()).hex()}}
    return out, meta


def _weights_args() -> dict:
    return {
        "dynamic": False,
        "group_size": 16,
        "num_bits": 4,
        "scale_dtype": "torch.float8_e4m3fn",
        "strategy": "tensor_group",
        "symmetric": True,
        "type": "float",
    }


def _static_config(ignore: list[str], w4a4: bool) -> dict:
    """The quantization_config compressed-tensors 0.20 writes (ModelCompressor.update_config) for
    the NVFP4A16 / NVFP4 presets targeting Linear, less its "version" key (the writing library's release);
    used when the library is not installed. A test checks it equals what the library itself writes, but
    for that key."""
    inputs = None
    if w4a4:
        inputs = {**_weights_args(), "dynamic": "local", "observer": "static_minmax"}
    return {
        "config_groups": {
            "group_0": {
                "format": FORMAT,
                "input_activations": inputs,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": _weights_args(),
            }
        },
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }


def library_config(ignore: list[str], w4a4: bool) -> dict:
    """The quantization_config built with compressed-tensors' own classes, serialized the way its
    ModelCompressor.update_config does. Raises ImportError when compressed-tensors is missing."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    scheme = preset_name_to_scheme("NVFP4" if w4a4 else "NVFP4A16", ["Linear"])
    scheme.format = CompressionFormat.nvfp4_pack_quantized
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.nvfp4_pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )
    return {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: "compressed-tensors",
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **qc.model_dump(exclude=["quant_method"]),
    }


def quantization_config(ignore: list[str], w4a4: bool) -> dict:
    """config.json's quantization_config: from the installed library when available, else the 0.20 layout."""
    try:
        return library_config(ignore, w4a4)
    except ImportError:
        return _static_config(ignore, w4a4)


def extra_files(ignore: list[str], w4a4: bool) -> dict[str, dict]:
    return {}


def detect(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors"


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules with any NVFP4 tensor (a module missing one of its tensors is still listed, so the loader
    can name what is missing)."""
    found = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((f".{CODES}", f".{BLOCK_SCALE}", f".{GLOBAL_SCALE}"))}
    return sorted(found)


def decode(tensors: dict[str, torch.Tensor], module: str, metadata: dict[str, dict], dtype=torch.float32):
    """Dense weight of one module. fp4cal checkpoints carry the exact s_g in the shard header and
    decode with fp4cal's formula (exact round trip); others decode as compressed-tensors does."""
    codes = tensors[f"{module}.weight_packed"]
    v = tensors[f"{module}.weight_scale"]
    exact = metadata.get(SG_METADATA_KEY, {}).get(module)
    if exact is not None:
        try:
            s_g = float.fromhex(exact)
        except (TypeError, ValueError):
            raise ValueError(
                f"header metadata {SG_METADATA_KEY}[{module!r}] is {exact!r}; expected the module's global scale "
                "as a float hex string (e.g. '0x1.0p-8')"
            ) from None
        return dequantize_module(codes, v, torch.tensor(s_g, dtype=torch.float32), dtype)
    return dequantize_divide(codes, v, tensors[f"{module}.weight_global_scale"], dtype)


def companion_names(module: str) -> list[str]:
    return [f"{module}.{s}" for s in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")]
