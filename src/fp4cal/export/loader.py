"""load(): read an NVFP4 checkpoint (either format) back with dequantized weights."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from fp4cal.export import compressed_tensors as ct_format
from fp4cal.export import modelopt as mo_format
from fp4cal.export.io import read_json, read_tensors
from fp4cal.export.layout import checkpoint_pieces


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


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors with every quantized module's ``<module>.weight`` dequantized to ``dtype``
    (its packed codes and scales removed); other tensors (embeddings, norms, ignored layers) as stored."""
    d = Path(path)
    config = read_json(d / "config.json") if (d / "config.json").exists() else {}
    fmt = detect_format(d, config)
    tensors, metadata = read_tensors(d)
    dense = {}
    consumed = set()
    for module in fmt.quantized_modules(tensors):
        dense[f"{module}.weight"] = fmt.decode(tensors, module, metadata, dtype)
        consumed.update(fmt.companion_names(module))
    for name, t in tensors.items():
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
    from fp4cal.export.exporter import _model_tensors

    used = set()
    for name, param in _model_tensors(model).items():
        shape = tuple(param.shape)
        pieces = checkpoint_pieces(model, name, shape)
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
    d = Path(path)
    if not as_model:
        return load_state_dict(d, dtype or torch.float32)
    model = _build_model(d, dtype)
    dense = load_state_dict(d, torch.float32)
    _fill(model, dense)
    return model.eval()
