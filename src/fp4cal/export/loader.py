"""load(): read an NVFP4 checkpoint (either format) back with dequantized weights."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from fp4cal.export import compressed_tensors as ct_format
from fp4cal.export import modelopt as mo_format
from fp4cal.export.io import CheckpointError, CheckpointTensors, read_checkpoint, read_json, recover_interrupted
from fp4cal.export.layout import checkpoint_pieces_of, model_tensors
from fp4cal.validation import BLOCK, FLOAT_DTYPES


def detect_format(directory: Path, config: dict):
    """The format module of a checkpoint directory, from config.json / hf_quant_config.json."""
    if ct_format.detect(config):
        fmt = config["quantization_config"].get("format")
        if fmt != ct_format.FORMAT:
            raise ValueError(
                f"{str(directory)!r} is a compressed-tensors checkpoint of format {fmt!r}; only "
                f"{ct_format.FORMAT!r} (NVFP4) is supported"
            )
        return ct_format
    if mo_format.detect(config) or (directory / mo_format.HF_QUANT_CONFIG).exists():
        return mo_format
    raise ValueError(
        f"{str(directory)!r} is not an NVFP4 checkpoint: config.json has no compressed-tensors or modelopt "
        "quantization_config and there is no hf_quant_config.json"
    )


def check_module_tensors(ck: CheckpointTensors, fmt, module: str) -> None:
    """Refuse (CheckpointError naming the file, the tensor and what was expected) a quantized module whose
    tensors are missing, of the wrong dtype or shape, or whose scales would dequantize to NaN / inf / silent
    zeros: block scales must be finite FP8, the global scale finite and positive (ModelOpt's weight_scale_2
    may be 0 only for an all-zero weight)."""
    names = {k: f"{module}.{getattr(fmt, k)}" for k in ("CODES", "BLOCK_SCALE", "GLOBAL_SCALE")}
    t = ck.tensors
    present = [n for n in names.values() if n in t]
    for n in names.values():
        if n not in t:
            where = ck.file_of[present[0]] if present else "the checkpoint"
            raise CheckpointError(
                f"{where}: quantized module {module!r} has {present} but no tensor {n!r}; an NVFP4 "
                f"{fmt.NAME} module stores {list(names.values())}"
            )
    codes, v, gs = (t[names[k]] for k in ("CODES", "BLOCK_SCALE", "GLOBAL_SCALE"))

    def bad(name: str, what: str) -> CheckpointError:
        return CheckpointError(f"{ck.file_of[name]}: tensor {name!r} {what}")

    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise bad(names["CODES"], f"is {codes.dtype} {tuple(codes.shape)}; expected uint8 [out, in/2] E2M1 codes")
    cout, cin = codes.shape[0], codes.shape[1] * 2
    if cin % BLOCK:
        raise bad(names["CODES"], f"has shape {tuple(codes.shape)}: in = {cin} is not a multiple of {BLOCK}")
    if v.dtype != torch.float8_e4m3fn or tuple(v.shape) != (cout, cin // BLOCK):
        raise bad(names["BLOCK_SCALE"], f"is {v.dtype} {tuple(v.shape)}; expected float8_e4m3fn "
                  f"[{cout}, {cin // BLOCK}] (one FP8 scale per 16 inputs of the {tuple(codes.shape)} codes)")
    if bool(torch.isnan(v.float()).any()):
        raise bad(names["BLOCK_SCALE"], f"has {int(torch.isnan(v.float()).sum())} NaN FP8 code(s); expected finite")
    if gs.dtype not in FLOAT_DTYPES or gs.numel() != 1:
        raise bad(names["GLOBAL_SCALE"], f"is {gs.dtype} {tuple(gs.shape)}; expected one float32 value")
    g = float(gs.float().reshape(()))
    if not torch.isfinite(gs.float()).all() or g < 0:
        raise bad(names["GLOBAL_SCALE"], f"is {g}; expected a finite, positive global scale")
    if g == 0 and (fmt.GLOBAL_IS_RECIPROCAL or bool((codes & 0x77).any())):
        meaning = "1 / s_g: dividing by 0 gives inf / NaN weights" if fmt.GLOBAL_IS_RECIPROCAL else (
            "s_g: the module's non-zero codes would all dequantize to 0")
        raise bad(names["GLOBAL_SCALE"], f"is 0; expected a positive global scale (it is {meaning})")


def check_dtype(dtype, name: str = "dtype", allow_none: bool = True) -> None:
    """A float dtype for dequantized weights: integer dtypes would truncate every NVFP4 value (mostly to 0)."""
    if dtype is None and allow_none:
        return
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(
            f"{name} must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16 or torch.float64), "
            f"got {dtype!r}"
        )


def _checkpoint_dir(path) -> Path:
    if path is None or isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint directory (str or os.PathLike), got {type(path).__name__}")
    d = Path(path).expanduser()
    recover_interrupted(d)  # a killed export may have left the directory mid-swap: finish or roll back
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file; expected a checkpoint directory")
    if not (d / "config.json").exists() and not (d / mo_format.HF_QUANT_CONFIG).exists():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json (nor hf_quant_config.json); expected an NVFP4 checkpoint directory"
        )
    return d


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors with every quantized module's ``<module>.weight`` dequantized to ``dtype``
    (its packed codes and scales removed); other tensors (embeddings, norms, ignored layers) as stored.
    Raises FileNotFoundError / CheckpointError naming the file and tensor for a missing, truncated or corrupt
    checkpoint and for scales that would give NaN, inf or silently zero weights."""
    check_dtype(dtype, allow_none=False)
    d = _checkpoint_dir(path)
    try:
        config = read_json(d / "config.json") if (d / "config.json").exists() else {}
    except ValueError as e:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    fmt = detect_format(d, config)
    ck = read_checkpoint(d)
    dense = {}
    consumed = set()
    for module in fmt.quantized_modules(ck.tensors):
        check_module_tensors(ck, fmt, module)
        try:
            dense[f"{module}.weight"] = fmt.decode(ck.tensors, module, ck.metadata, dtype)
        except ValueError as e:  # a corrupt header entry (the message names the module)
            raise CheckpointError(f"{ck.file_of[f'{module}.{fmt.CODES}']}: {e}") from None
        consumed.update(fmt.companion_names(module))
    for name, t in ck.tensors.items():
        if name not in consumed:
            dense[name] = t
    return dense


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _build_model(directory: Path, dtype: torch.dtype | None) -> nn.Module:
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - transformers is needed only for as_model=True
        raise ImportError("load(..., as_model=True) needs transformers; use as_model=False for a dict") from e
    config = AutoConfig.from_pretrained(directory)
    # A plain model: fp4cal fills it with dequantized weights, so no quantizer must touch it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = _model_class(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        if cls.__name__.startswith("Auto"):
            model = cls.from_config(config, dtype=dtype or config.dtype)
        else:
            model = cls._from_config(config, dtype=dtype or config.dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights defers tying (e.g. lm_head to the embeddings)
    return model


def _fill(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    used = set()
    tensors = model_tensors(model)
    all_pieces = checkpoint_pieces_of(model, {name: tuple(t.shape) for name, t in tensors.items()})
    for name, param in tensors.items():
        shape = tuple(param.shape)
        pieces = all_pieces[name]
        missing = [p.name for p in pieces if p.name not in dense]
        if missing:
            if name in dict(model.named_buffers()):
                continue  # a buffer the checkpoint does not carry keeps its initial value
            raise ValueError(f"checkpoint has no tensor {missing[0]!r} for model parameter {name!r}")
        last = shape[-1] if shape else 1
        buf = torch.empty(param.numel() // last, last, dtype=param.dtype, device=param.device)
        for p in pieces:
            src = dense[p.name]
            if src.numel() != p.rows.numel() * last:
                raise ValueError(
                    f"checkpoint tensor {p.name!r} has shape {tuple(src.shape)}, expected {p.shape} "
                    f"for parameter {name!r}"
                )
            buf[p.rows.to(buf.device)] = src.reshape(-1, last).to(device=buf.device, dtype=buf.dtype)
            used.add(p.name)
        with torch.no_grad():
            param.copy_(buf.reshape(shape))
    unused = sorted(set(dense) - used)
    if unused:
        raise ValueError(f"checkpoint tensors {unused[:5]} ({len(unused)} in all) match no parameter of the model")


def load(
    path: str | os.PathLike,
    as_model: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module | dict[str, torch.Tensor]:
    """Read an NVFP4 checkpoint written by fp4cal.export (or by another compressed-tensors / ModelOpt tool).

    as_model=True: a transformers model built from the checkpoint's config.json (without its quantization
        config) holding the dequantized (fake-quantized) weights, in ``dtype`` (default: the config's dtype);
        stacked MoE expert parameters are reassembled from the per-expert checkpoint tensors.
    as_model=False: a dict of checkpoint-named tensors, quantized modules' ``<module>.weight`` dequantized to
        ``dtype`` (default float32, which holds every NVFP4 value exactly).
    fp4cal checkpoints dequantize bit-identically to fp4cal.numerics.dequantize of the exported weights.
    """
    check_dtype(dtype)
    if not as_model:
        return load_state_dict(path, dtype or torch.float32)
    d = _checkpoint_dir(path)
    model = _build_model(d, dtype)
    dense = load_state_dict(d, torch.float32)
    _fill(model, dense)
    return model.eval()
