"""The model without its weights: a skeleton on the meta device, its decoder-layer list, and tensor swaps.

The skeleton is built from config.json alone (transformers AutoModelForCausalLM / AutoModel.from_config under
torch.device("meta")), so its parameter names, shapes, dtypes, target list and checkpoint layout are exactly
those of the model ``from_pretrained`` would build, while it holds no memory. Weights are then put in one
module at a time (set_tensor) and taken out again (release).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def read_config(model_dir: Path):
    """transformers' config of ``model_dir`` (its config.json), with a clear error when it is missing."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} has no config.json; expected a Hugging Face "
                                "model directory")
    return AutoConfig.from_pretrained(model_dir)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") gives the model: config.dtype (float32 when unset)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d.replace("torch.", ""), None)
    return d if isinstance(d, torch.dtype) else torch.float32


def build_skeleton(model_dir: Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """(model on the meta device in eval mode, description). Causal LMs (config.architectures ending in
    ForCausalLM) are built with AutoModelForCausalLM, others (encoders such as MiniLM) with AutoModel,
    as fp4cal.cli's load_model does."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = read_config(model_dir)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype or checkpoint_dtype(config))
    model.eval()
    config._name_or_path = str(model_dir)  # export copies tokenizer files from here
    return model, f"{(config.architectures or [type(model).__name__])[0]}, {cls.__name__}"


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the nn.ModuleList of config.num_hidden_layers modules of one class holding the
    most parameters (model.layers, encoder.layer, transformer.h, ...). Returns (its name, the list).
    Raises ValueError naming what was looked for when there is none."""
    n = num_layers(model)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) != n:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder-layer list found (an nn.ModuleList of config.num_hidden_layers = "
            f"{n} modules of one class); streaming needs one. Quantize it with the whole-model path "
            "(--no-streaming) if it fits on the device"
        )
    return best[1], best[2]


def tensor_owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Name (first name of a tied tensor, as model_tensors lists it) -> every (module, attribute, is_param)
    holding that same tensor, so a tied weight is replaced everywhere at once."""
    first: dict[int, str] = {}
    out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for is_param, items in ((True, model.named_parameters(remove_duplicate=False)),
                            (False, model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            key = first.setdefault(id(t), name)
            mod_name, _, attr = name.rpartition(".")
            out.setdefault(key, []).append((model.get_submodule(mod_name), attr, is_param))
    return out


def set_tensor(owners: list[tuple[nn.Module, str, bool]], value: torch.Tensor) -> None:
    """Put ``value`` in place of a parameter / buffer in every module holding it (no autograd)."""
    for module, attr, is_param in owners:
        if is_param:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value


def init_non_persistent_buffers(model: nn.Module, modules: Iterable[nn.Module], device: torch.device) -> None:
    """Give the non-persistent buffers of ``modules`` (rotary inv_freq, position_ids...) their values: computed
    on the CPU by the model's own _init_weights, exactly as from_pretrained does, then moved to ``device``."""
    init = getattr(model, "_init_weights", None)
    for module in modules:
        names = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
        if not names:
            continue
        for n in names:
            buf = module._buffers[n]
            module._buffers[n] = torch.empty_like(buf, device="cpu")
        if init is None:
            raise ValueError(f"{type(module).__name__} has non-persistent buffers {names} but the model has no "
                             "_init_weights to compute them; streaming needs a transformers model")
        with torch.no_grad():
            init(module)
        for n in names:
            if module._buffers[n].is_meta:
                raise ValueError(f"{type(module).__name__}.{n} was not initialized by {type(model).__name__}."
                                 "_init_weights; streaming cannot compute it")
            module._buffers[n] = module._buffers[n].to(device)


def release(module: nn.Module) -> None:
    """Send every tensor of ``module`` back to the meta device (frees its memory)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[k] = torch.empty_like(b, device="meta")


def config_bytes(model_dir: Path) -> bytes:
    return (model_dir / "config.json").read_bytes()


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
