"""ModelOpt "unified HF" NVFP4 checkpoints: the layout TensorRT-LLM, vLLM (modelopt_fp4) and SGLang
(modelopt_fp4) read.

Per quantized module M:
    M.weight          uint8 [out, in/2]            two E2M1 codes per byte, element 2k in the low nibble
    M.weight_scale    float8_e4m3fn [out, in/16]   the FP8 block scale codes v
    M.weight_scale_2  float32 []                   s_g = fp32(global_amax / 2688), fp4cal's s_g itself
    M.input_scale     float32 []                   (W4A4 only) fp32(input_amax / 2688)
plus ``hf_quant_config.json`` ({"producer": ..., "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}, all four keys required by vLLM) and the same information in
config.json's ``quantization_config`` (flat form, quant_method "modelopt"), which newer engines read
first. Weight-only exports use quant_algo "W4A16_NVFP4": engines given "NVFP4" expect an
``input_scale`` for every module and would quantize activations with an uninitialized scale.

Numerics: engines dequantize as E2M1 * v * weight_scale_2, which is fp4cal's formula with the same
fp32 s_g, so fp4cal's round trip through this format is exact without any side information.
"""

from __future__ import annotations

import torch

from fp4cal.export.base import QuantizedModule, dequantize_module, input_scale

NAME = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
# Tensor suffixes of one quantized module (shared with the loader and fp4cal check).
CODES, BLOCK_SCALE, GLOBAL_SCALE, INPUT_SCALE = "weight", "weight_scale", "weight_scale_2", "input_scale"
GLOBAL_IS_RECIPROCAL = False  # weight_scale_2 is s_g itself: dequantized = E2M1 * v * weight_scale_2
GLOBAL_SHAPES = ((), (1,))  # ModelOpt writes [] ; engines also accept [1]


def _producer() -> dict:
    from fp4cal import __version__

    return {"name": "fp4cal", "version": __version__}


def quant_algo(w4a4: bool) -> str:
    return "NVFP4" if w4a4 else "W4A16_NVFP4"


def module_tensors(qm: QuantizedModule, w4a4: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    m = qm.module
    out = {
        f"{m}.weight": qm.codes,
        f"{m}.weight_scale": qm.block_scale,
        f"{m}.weight_scale_2": qm.global_scale.float().reshape(()),
    }
    if w4a4:
        out[f"{m}.input_scale"] = input_scale(qm.input_amax)
    return out, {}


def quantization_config(ignore: list[str], w4a4: bool) -> dict:
    """config.json quantization_config, in the flat form vLLM and SGLang parse (``ignore``, per-group args)."""
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = {"targets": ["Linear"], "weights": dict(args)}
    if w4a4:
        group["input_activations"] = dict(args)
    return {
        "quant_method": "modelopt",
        "quant_algo": quant_algo(w4a4),
        "producer": _producer(),
        "group_size": 16,
        "kv_cache_quant_algo": None,
        "ignore": list(ignore),
        "config_groups": {"group_0": group},
    }


def extra_files(ignore: list[str], w4a4: bool) -> dict[str, dict]:
    return {
        HF_QUANT_CONFIG: {
            "producer": _producer(),
            "quantization": {
                "quant_algo": quant_algo(w4a4),
                "kv_cache_quant_algo": None,
                "group_size": 16,
                "exclude_modules": list(ignore),
            },
        }
    }


def detect(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return str(q.get("quant_method", "")).lower().startswith("modelopt")


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules with any NVFP4 scale tensor (a module missing one of its tensors is still listed, so the
    loader can name what is missing instead of passing the rest on as dense tensors)."""
    found = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((f".{BLOCK_SCALE}", f".{GLOBAL_SCALE}"))}
    return sorted(found)


def decode(tensors: dict[str, torch.Tensor], module: str, metadata: dict[str, dict], dtype=torch.float32):
    codes = tensors[f"{module}.weight"]
    if codes.dtype != torch.uint8:
        raise TypeError(f"{module}.weight must be uint8 packed NVFP4 codes, got dtype {codes.dtype}")
    return dequantize_module(codes, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"], dtype)


def companion_names(module: str) -> list[str]:
    return [f"{module}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")]
