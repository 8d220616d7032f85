"""Where each model parameter lives in a Hugging Face checkpoint.

transformers 5 loads some checkpoint tensors into differently shaped parameters: e.g. Qwen3-MoE's
per-expert ``mlp.experts.{e}.gate_proj.weight`` and ``up_proj.weight`` [I, H] become one stacked
``mlp.experts.gate_up_proj`` [E, 2I, H] (its conversion mapping: MergeModulelist(dim=0) then
Concatenate(dim=1)), and ``save_pretrained`` reverts that. Serving engines (vLLM, SGLang, TensorRT-LLM)
read the per-expert names. We reuse transformers' own reverse conversion to learn, for each
parameter, which checkpoint tensors hold which of its rows: we feed it an index tensor (the row
numbers of the parameter, shape [..., rows, 2], both columns the row number) and read back where each
row went. Quantized weights are then split row-wise (codes, FP8 scales and the per-expert global scale
together), which is exact.
Conversions that touch the last (input) dimension are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Piece:
    """One checkpoint tensor cut out of a parameter: ``rows`` index the parameter viewed as
    [rows, last_dim] (leading dims flattened); the checkpoint tensor has shape ``shape``."""

    name: str
    rows: torch.Tensor  # int64 [k]
    shape: tuple[int, ...]
    start: int | None = None  # rows == start + arange(k) (a slice: cut without a copy), else None

    def __post_init__(self) -> None:
        k = self.rows.numel()
        if self.start is None and k and int(self.rows[-1]) - int(self.rows[0]) == k - 1 and bool(
                (self.rows.diff() == 1).all()):
            self.start = int(self.rows[0])


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: its parameters (tied duplicates dropped, the first name kept, as
    transformers saves them) and its persistent buffers."""
    out = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, buf in model.named_buffers():
        if name in persistent and name not in all_params:
            out[name] = buf
    return out


def _param_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    last = shape[-1] if len(shape) else 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, last


def _revert(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """transformers' reverse conversion of some tensors, or None when the model is not a transformers model."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers is optional: plain modules keep their parameter names
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    return revert_weight_conversion(model, state)


# parameters' rows per reverse conversion call: transformers rebuilds its conversion mapping at every call (~3 ms;
# one call per parameter was 1.3 s of a 36-layer 8B model's setup), and the index tensors are 16 bytes per row
_CHUNK_ROWS = 1 << 22


def checkpoint_pieces(model: nn.Module, name: str, shape: tuple[int, ...]) -> list[Piece]:
    """The checkpoint tensors holding parameter ``name`` of ``shape``, and the rows each one holds.

    Raises ValueError when the conversion does not split the parameter into whole rows.
    """
    return checkpoint_pieces_of(model, {name: tuple(shape)})[name]


def checkpoint_pieces_of(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """checkpoint_pieces for many parameters (name -> shape), a few reverse conversions for all of them: each
    parameter's index holds its row numbers shifted by the rows of the parameters before it, so every piece the
    conversion returns names its parameter by its values (a piece mixing two parameters is refused)."""
    out: dict[str, list[Piece]] = {}
    chunk: dict[str, tuple[int, ...]] = {}
    rows = 0
    for name, shape in shapes.items():
        chunk[name] = tuple(shape)
        rows += _param_rows(tuple(shape))[0]
        if rows >= _CHUNK_ROWS:
            out.update(_pieces_of_chunk(model, chunk))
            chunk, rows = {}, 0
    if chunk:
        out.update(_pieces_of_chunk(model, chunk))
    return out


def _pieces_of_chunk(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    names = list(shapes)
    starts, index, off = [], {}, 0
    for name in names:
        shape = shapes[name]
        n_rows, _ = _param_rows(shape)
        lead = tuple(shape[:-1]) if len(shape) >= 2 else ()
        if len(shape) >= 2:
            # two equal columns, not one: some transformers releases (5.17) squeeze() the per-expert pieces,
            # which would drop a last dimension of size 1
            rows = off + torch.arange(n_rows, dtype=torch.int64)
            index[name] = rows.reshape(*lead, 1).repeat(*([1] * len(lead)), 2)
        else:
            index[name] = torch.full((1,), off, dtype=torch.int64)
        starts.append(off)
        off += n_rows
    reverted = _revert(model, index)
    if reverted is None:
        reverted = index
    first = torch.tensor(starts, dtype=torch.int64)
    found: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in names}
    for ckpt_name, idx in reverted.items():
        idx = idx[0] if isinstance(idx, list) else idx
        if idx.numel() == 0:
            continue
        owner = names[int(torch.searchsorted(first, idx.min(), right=True)) - 1]
        found[owner].append((ckpt_name, idx))
    return {name: _pieces(name, shapes[name], starts[i], found[name]) for i, name in enumerate(names)}


def _pieces(name: str, shape: tuple[int, ...], start: int, found: list[tuple[str, torch.Tensor]]) -> list[Piece]:
    """One parameter's pieces from the reverted index tensors that hold its rows (shifted by ``start``)."""
    n_rows, last = _param_rows(shape)
    pieces = []
    seen = torch.zeros(n_rows, dtype=torch.int64)
    for ckpt_name, idx in found:
        if len(shape) >= 2:
            if idx.dim() < 1 or idx.shape[-1] != 2 or not torch.equal(idx[..., 0], idx[..., 1]):
                raise ValueError(
                    f"transformers' checkpoint conversion maps parameter {name!r} {tuple(shape)} to {ckpt_name!r} "
                    f"with a layout that moves the input (last) dimension (index shape {tuple(idx.shape)}); "
                    "exporting such a parameter is not supported"
                )
            idx = idx[..., :1]
        rows = idx.reshape(-1) - start
        if bool((rows >= n_rows).any()):
            raise ValueError(f"transformers' checkpoint conversion puts rows of parameter {name!r} and of another "
                             f"parameter into one checkpoint tensor {ckpt_name!r}; exporting it is not supported")
        piece_shape = (*idx.shape[:-1], last) if len(shape) >= 2 else tuple(shape)
        seen.index_add_(0, rows, torch.ones_like(rows))
        pieces.append(Piece(ckpt_name, rows, piece_shape))
    if not bool((seen == 1).all()):
        raise ValueError(
            f"transformers' checkpoint conversion of parameter {name!r} {tuple(shape)} does not cover each of its "
            f"{n_rows} rows exactly once; exporting it is not supported"
        )
    return pieces


def module_of(ckpt_name: str, param_name: str) -> str:
    """'a.b.weight' -> 'a.b'; raises if a quantized weight's checkpoint name does not end with '.weight'."""
    if not ckpt_name.endswith(".weight"):
        raise ValueError(
            f"quantized parameter {param_name!r} maps to checkpoint tensor {ckpt_name!r}, which does not end "
            "with '.weight'; serving engines expect quantized weights as '<module>.weight'"
        )
    return ckpt_name[: -len(".weight")]
