"""export(): a CalibrationResult and its model -> an NVFP4 checkpoint directory that serving engines load.

The steps are public so that a caller can write a checkpoint piece by piece with the same names and bytes
(fp4cal.stream writes one decoder layer at a time):

    tensors = model_tensors(model)                       what a checkpoint holds (tied duplicates dropped)
    entries = checkpoint_entries(model, tensors, ...)    per model tensor: its checkpoint pieces
    for e in entries: entry_tensors(e, format, w4a4, input_amax)   -> (checkpoint name, tensor, header entries)
    write_side_files(model, directory, format, ignore_list(...), w4a4, source)   config.json & co.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.export import compressed_tensors as ct_format
from fp4cal.export import modelopt as mo_format
from fp4cal.export.base import QuantizedModule
from fp4cal.export.check import check_export
from fp4cal.export.io import (
    ShardedWriter,
    check_out_dir,
    copy_aux_files,
    parse_size,
    staged_directory,
    write_json,
)
from fp4cal.export.layout import Piece, checkpoint_pieces_of, model_tensors, module_of
from fp4cal.numerics import NVFP4Tensor, quantize
from fp4cal.validation import BLOCK

FORMATS = {ct_format.NAME: ct_format, mo_format.NAME: mo_format}


@dataclass
class Entry:
    """One model tensor to write: its name, value and checkpoint pieces; ``weight`` when quantized."""

    name: str
    tensor: torch.Tensor
    pieces: list[Piece]
    weight: WeightResult | None = None


def _is_linear_type(module: nn.Module) -> bool:
    """Module types that compressed-tensors' config treats as "Linear" (and vLLM loads as linear layers):
    nn.Linear, plus MoE routers / gates by class name (compressed_tensors get_vllm_module_type: a name
    containing "Router" or "Gating", or "Gate" not followed by a lowercase letter, unless "ExpertMLP")."""
    cls = type(module).__name__
    if cls == "Linear" or isinstance(module, nn.Linear):
        return True
    gate_like = "Router" in cls or "Gating" in cls or re.search(r"Gate(?![a-z])", cls) is not None
    return gate_like and "ExpertMLP" not in cls



def _check_result(result: CalibrationResult, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"result must be a fp4cal CalibrationResult, got {type(result).__name__}")
    if not result.weights:
        raise ValueError("result.weights is empty: nothing was quantized, so there is nothing to export")
    check_weights(result.weights, tensors, model)


def check_weights(weights: dict[str, WeightResult], tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Each WeightResult names an untied tensor of ``tensors`` (model_tensors) with its shape, and carries
    block_amax / block_scale / global_amax of the shapes export needs. Raises ValueError / TypeError naming it."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(tensors)
    for name, wr in weights.items():
        if name in tied:
            raise ValueError(
                f"result.weights[{name!r}] is tied to another parameter (e.g. lm_head tied to the embeddings); "
                "tied weights cannot be exported quantized, leave them out of calibration"
            )
        if name not in tensors:
            raise ValueError(f"result.weights[{name!r}] names no parameter of the model")
        shape = tuple(tensors[name].shape)
        if tuple(wr.shape) != shape:
            raise ValueError(f"result.weights[{name!r}].shape is {tuple(wr.shape)} but the model parameter is {shape}")
        if len(shape) not in (2, 3) or shape[-1] % BLOCK:
            raise ValueError(
                f"result.weights[{name!r}] has shape {shape}; expected [cout, cin] or [E, cout, cin] with cin % 16 == 0"
            )
        want = shape[:-1] + (shape[-1] // BLOCK,)
        for field in ("block_amax", "block_scale"):
            got = tuple(getattr(wr, field).shape)
            if got != want:
                raise ValueError(f"result.weights[{name!r}].{field} has shape {got}, expected {want}")
        if wr.block_scale.dtype != torch.float8_e4m3fn:
            raise TypeError(f"result.weights[{name!r}].block_scale must be float8_e4m3fn, got {wr.block_scale.dtype}")
        if tuple(wr.global_amax.reshape(-1).shape) != ((shape[0],) if len(shape) == 3 else (1,)):
            raise ValueError(
                f"result.weights[{name!r}].global_amax has shape {tuple(wr.global_amax.shape)}, expected "
                f"{'[E] = [' + str(shape[0]) + ']' if len(shape) == 3 else '[] (a scalar)'}"
            )


def _fused_groups(weights: dict[str, WeightResult]) -> dict[str, list[WeightResult]]:
    groups: dict[str, list[WeightResult]] = {}
    for wr in weights.values():
        if wr.fused_group is not None:
            groups.setdefault(wr.fused_group, []).append(wr)
    return groups


def _check_fused(groups: dict[str, list[WeightResult]]) -> None:
    """Engines fuse q/k/v and gate/up into one GEMM with ONE global scale (vLLM takes the max and
    would then dequantize the other members wrongly): members must share their global amax."""
    for group, members in groups.items():
        first = members[0].global_amax.float().reshape(-1).cpu()
        for wr in members[1:]:
            other = wr.global_amax.float().reshape(-1).cpu()
            if other.shape != first.shape or not torch.equal(other, first):
                raise ValueError(
                    f"fused group {group!r}: {members[0].name!r} has global_amax {first.tolist()} but {wr.name!r} has "
                    f"{other.tolist()}; members of a fused group must share one global amax"
                )


def fused_checks(weights: dict[str, WeightResult], w4a4: bool) -> dict[str, torch.Tensor]:
    """Check that fused groups share their global amax; for W4A4, the input amax to export per weight (see
    _input_amax), else {}. ``weights`` must hold whole fused groups (a decoder layer's weights do)."""
    groups = _fused_groups(weights)
    _check_fused(groups)
    return _input_amax(weights, groups) if w4a4 else {}


def _input_amax(weights: dict[str, WeightResult], groups: dict[str, list[WeightResult]]) -> dict[str, torch.Tensor]:
    """Per weight, the input amax to export for W4A4: the max over its fused group (the members read the
    same input; engines use one activation scale for the fused GEMM), [1] or [E] fp32 on CPU."""
    out = {}
    for name, wr in weights.items():
        members = groups.get(wr.fused_group, [wr]) if wr.fused_group else [wr]
        amaxes = []
        for m in members:
            if m.input_amax is None:
                raise ValueError(
                    f"w4a4=True needs the input amax of every quantized weight, but result.weights[{m.name!r}]"
                    ".input_amax is None (calibrate with activation statistics, or export with w4a4=False)"
                )
            amaxes.append(m.input_amax.float().reshape(-1).cpu())
        a = torch.stack(torch.broadcast_tensors(*amaxes)).amax(0)
        if len(wr.shape) == 3:
            a = a.expand(wr.shape[0]).clone()
            # An expert that saw no token has amax 0 (scale 1/0 = inf): give it the layer's max instead.
            a = torch.where(a > 0, a, a.max())
        if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
            raise ValueError(f"result.weights[{name!r}].input_amax must be finite and > 0 for W4A4, got {a.tolist()}")
        out[name] = a
    return out


QUANTIZE_CHUNK = 1 << 25  # weights quantized at once by export: ~0.5 GiB of fp32 temporaries, not 4 x a whole stack


def quantize_in_chunks(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor) -> NVFP4Tensor:
    """numerics.quantize of w [cout, cin] or [E, cout, cin], some rows (or experts) at a time: the same bytes
    (each 16-weight block is quantized on its own, with the tensor's global scale), with fp32 temporaries
    bounded by QUANTIZE_CHUNK weights instead of several copies of a whole expert stack (1.5 GiB each for a
    Qwen3-30B-A3B layer's gate_up_proj: the streaming engine ran out of a 6 GiB GPU budget there)."""
    if w.numel() <= QUANTIZE_CHUNK:
        return quantize(w, block_amax, global_amax)
    stacked = w.dim() == 3
    step = max(1, QUANTIZE_CHUNK // (w.shape[-2] * w.shape[-1] if stacked else w.shape[-1]))
    per_expert = stacked and global_amax.dim() > 0
    parts = [quantize(w[i:i + step], block_amax[i:i + step], global_amax[i:i + step] if per_expert else global_amax)
             for i in range(0, w.shape[0], step)]
    g = torch.cat([p.global_scale for p in parts]) if stacked else parts[0].global_scale  # stacks: [E]
    return NVFP4Tensor(torch.cat([p.codes for p in parts]), torch.cat([p.block_scale for p in parts]), g, w.dtype)


def _quantized_modules(entry: Entry, input_amax: torch.Tensor | None) -> list[QuantizedModule]:
    """Quantize one weight with the calibrated scales and cut it into per-module checkpoint pieces."""
    wr = entry.weight
    w = entry.tensor.detach()
    if w.is_meta:
        raise ValueError(f"parameter {entry.name!r} is on the meta device; load its weights before exporting")
    q = quantize_in_chunks(w, wr.block_amax.to(w.device), wr.global_amax.to(w.device).float())
    stored = wr.block_scale.to(q.block_scale.device).view(torch.uint8)
    if not torch.equal(q.block_scale.view(torch.uint8), stored):
        bad = int((q.block_scale.view(torch.uint8) != stored).sum())
        raise ValueError(
            f"result.weights[{entry.name!r}]: block_scale disagrees with block_amax in {bad} block(s); "
            "block_scale must be fp4cal.numerics.quantize(w, block_amax, global_amax).block_scale"
        )
    if wr.codes is not None:  # GPTQ moved codes: write them, not round-to-nearest of w
        if wr.codes.dtype != torch.uint8 or tuple(wr.codes.shape) != tuple(q.codes.shape):
            raise ValueError(
                f"result.weights[{entry.name!r}].codes must be uint8 {tuple(q.codes.shape)} (packed E2M1 codes), got "
                f"{wr.codes.dtype} {tuple(wr.codes.shape)}"
            )
        q = NVFP4Tensor(wr.codes.to(q.codes.device), q.block_scale, q.global_scale, q.dtype)
    cout, cin = w.shape[-2], w.shape[-1]
    if w.dim() == 3 and len(entry.pieces) == 1:
        raise ValueError(
            f"{entry.name!r} is a stacked expert parameter {tuple(w.shape)} but no per-expert checkpoint names are "
            "known for it (transformers has no conversion mapping for this model); serving engines expect one "
            "'<module>.weight' per expert"
        )
    codes = q.codes.reshape(-1, cin // 2).cpu()
    scales = q.block_scale.reshape(-1, cin // BLOCK).cpu()
    s_g = q.global_scale.reshape(-1).cpu()
    modules = []
    for piece in entry.pieces:
        rows = piece.rows
        if piece.start is not None:  # a run of rows (a whole tensor, an expert, its gate or up half): a view
            run = slice(piece.start, piece.start + rows.numel())
            piece_codes, piece_scales = codes[run], scales[run]
            experts = {run.start // cout, (run.stop - 1) // cout}
        else:
            piece_codes = codes.index_select(0, rows).contiguous()
            piece_scales = scales.index_select(0, rows).contiguous()
            experts = set(torch.unique(rows // cout).tolist())
        if len(experts) != 1:
            raise ValueError(
                f"checkpoint tensor {piece.name!r} takes rows of several experts of {entry.name!r}; not supported"
            )
        e = experts.pop()
        modules.append(
            QuantizedModule(
                module=module_of(piece.name, entry.name),
                codes=piece_codes,
                block_scale=piece_scales,
                global_scale=s_g[e].clone(),
                input_amax=None if input_amax is None else input_amax[e if input_amax.numel() > 1 else 0].clone(),
            )
        )
    return modules


def _dense_pieces(entry: Entry) -> dict[str, torch.Tensor]:
    t = entry.tensor.detach()
    if t.is_meta:
        raise ValueError(f"tensor {entry.name!r} is on the meta device; load the weights before exporting")
    if len(entry.pieces) == 1 and entry.pieces[0].shape == tuple(t.shape):
        return {entry.pieces[0].name: t}
    rows, last = t.reshape(-1, t.shape[-1] if t.dim() else 1).shape
    flat = t.reshape(rows, last)
    return {p.name: (flat[p.start:p.start + p.rows.numel()] if p.start is not None
                     else flat.index_select(0, p.rows.to(t.device))).reshape(p.shape) for p in entry.pieces}


def entry_tensors(
    entry: Entry, format: str, w4a4: bool = False, input_amax: torch.Tensor | None = None
) -> list[tuple[str, torch.Tensor, dict | None]]:
    """The checkpoint tensors of one model tensor, in the order export writes them: (checkpoint name, tensor,
    shard-header entries or None). Dense tensors are cut into their checkpoint pieces; a quantized one
    (entry.weight set) is quantized with its calibrated scales and written per module in ``format``.
    input_amax: (W4A4) the weight's exported input amax (fused_checks). Tensors stay on their device."""
    if entry.weight is None:
        return [(name, t, None) for name, t in _dense_pieces(entry).items()]
    fmt = FORMATS[format]
    out = []
    for qm in _quantized_modules(entry, input_amax):
        module_tensors, meta = fmt.module_tensors(qm, w4a4)
        for ckpt_name, t in module_tensors.items():
            out.append((ckpt_name, t, meta))
            meta = None  # header entries go with the module's first tensor
    return out


def checkpoint_entries(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights: dict[str, WeightResult | None]
) -> list[Entry]:
    """One Entry per model tensor (model_tensors order), with its checkpoint pieces (layout.checkpoint_pieces)
    and its WeightResult when ``weights`` has one. Tensors may be on the meta device (only shapes are read)."""
    pieces = checkpoint_pieces_of(model, {name: tuple(t.shape) for name, t in tensors.items()})
    return [Entry(name, t, pieces[name], weights.get(name)) for name, t in tensors.items()]


def ignore_list(model: nn.Module, entries: list[Entry], quantized: set[str] | None = None) -> list[str]:
    """Checkpoint names of Linear-type modules left unquantized (lm_head, routers, skipped layers) and of
    the experts of unquantized expert stacks, as compressed-tensors' config lists them. quantized: names of
    the quantized model tensors (default: the entries whose weight is set)."""
    if quantized is None:
        quantized = {e.name for e in entries if e.weight is not None}
    by_name = {e.name: e for e in entries}
    ignore = []
    for mod_name, module in model.named_modules():
        wname = f"{mod_name}.weight" if mod_name else "weight"
        if _is_linear_type(module) and wname in by_name and wname not in quantized:
            ignore.extend(module_of(p.name, wname) for p in by_name[wname].pieces if p.name.endswith(".weight"))
    for e in entries:
        if e.name not in quantized and e.tensor.dim() == 3 and len(e.pieces) > 1:
            ignore.extend(module_of(p.name, e.name) for p in e.pieces if p.name.endswith(".weight"))
    return list(dict.fromkeys(ignore))  # unique, in model order


def source_directory(model: nn.Module, source_dir: str | os.PathLike | None) -> Path | None:
    if source_dir is not None:
        d = Path(source_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"source_dir {str(source_dir)!r} is not a directory")
        return d
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def _write_config(model: nn.Module, directory: Path, qconfig: dict, bf16_default: bool = False) -> None:
    """config.json with ``quantization_config``. bf16_default: a float32 config gets dtype bfloat16 (MoE
    compressed-tensors checkpoints: transformers decompresses fused experts to bfloat16, so a float32 default
    fails in from_pretrained with a dtype mismatch; the stored tensors keep their dtype)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        data = {}
    else:
        config.save_pretrained(directory)
        with open(directory / "config.json") as f:
            data = json.load(f)
    if bf16_default:
        for key in ("dtype", "torch_dtype"):
            if str(data.get(key, "")).endswith("float32"):
                data[key] = "bfloat16"
    data["quantization_config"] = qconfig
    write_json(directory / "config.json", data)


def _write_generation_config(model: nn.Module, directory: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained") and not (directory / "generation_config.json").exists():
        gen.save_pretrained(directory)


def export(
    result: CalibrationResult,
    model: nn.Module,
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    w4a4: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` quantized with ``result``'s scales as an NVFP4 checkpoint directory.

    result: the CalibrationResult of ``model`` (parameter names, block amaxes, FP8 block scales, global amaxes).
    model: the calibrated model with its original (unquantized) weights; a transformers model gets its
        config.json (plus quantization_config) and generation_config.json written, and per-expert
        checkpoint names for stacked MoE experts (as transformers' save_pretrained names them).
    format: "compressed-tensors" (vLLM, SGLang, transformers) or "modelopt" (TensorRT-LLM, vLLM, SGLang).
    w4a4: also store static input (activation) scales, from each weight's input_amax, for W4A4 serving.
    overwrite: replace a non-empty out_dir (atomically); otherwise such a directory is refused.
    max_shard_size: largest safetensors shard, bytes or "5GB"-style; larger models get an index file.
    source_dir: where to copy tokenizer / generation files from (default: model.config._name_or_path
        when that is a local directory).
    Returns the checkpoint directory. Nothing is written under out_dir unless the export completes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"result must be a fp4cal CalibrationResult (from calibrate), got {type(result).__name__}")
    shard_bytes = parse_size(max_shard_size)
    check_out_dir(out_dir, overwrite)  # fail before any work: unsafe paths, non-checkpoint directories
    src = source_directory(model, source_dir)

    transposed = [n for n, wr in result.weights.items() if getattr(wr, "transposed", False)]
    if transposed:  # gpt-oss-style [E, cin, cout] expert stacks: no engine layout is written for them yet
        raise NotImplementedError(
            f"export of expert stacks stored as [E, cin, cout] is not supported yet: {transposed[:3]}; "
            "calibrate() handles them, export() does not"
        )
    tensors = model_tensors(model)
    _check_result(result, tensors, model)
    input_amax = fused_checks(result.weights, w4a4)
    entries = checkpoint_entries(model, tensors, result.weights)
    ignore = ignore_list(model, entries)

    with staged_directory(out_dir, overwrite) as tmp:
        with ShardedWriter(tmp, shard_bytes) as writer:  # shards go to disk in a thread while the next is made
            for entry in tqdm(entries, desc=f"export {format}", unit="tensor", disable=None):
                for ckpt_name, t, meta in entry_tensors(entry, format, w4a4, input_amax.get(entry.name)):
                    writer.add(ckpt_name, t, meta)
            writer.close()
        moe = any(e.weight is not None and e.tensor.dim() == 3 for e in entries)
        write_side_files(model, tmp, format, ignore, w4a4, src, moe=moe)
        check_export(tmp, format)  # what the engines' loaders need (docs/export.md); raises before the rename
    return Path(out_dir)


def write_side_files(
    model: nn.Module, directory: Path, format: str, ignore: list[str], w4a4: bool, source: Path | None,
    moe: bool = False,
) -> None:
    """Everything but the weights: config.json with its quantization_config, the format's extra files (e.g.
    hf_quant_config.json), tokenizer / generation files copied from ``source``, generation_config.json.
    moe: quantized expert stacks were written; a compressed-tensors config then says dtype bfloat16 (what
    transformers decompresses experts to), so from_pretrained(ckpt) loads with default arguments."""
    fmt = FORMATS[format]
    _write_config(model, directory, fmt.quantization_config(ignore, w4a4), bf16_default=moe and fmt is ct_format)
    for filename, data in fmt.extra_files(ignore, w4a4).items():
        write_json(directory / filename, data)
    if source is not None:
        copy_aux_files(source, directory)
    _write_generation_config(model, directory)
