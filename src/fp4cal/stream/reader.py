"""Read a model's tensors from its safetensors shards, one group (a decoder layer) at a time.

Checkpoint names differ from parameter names where transformers converts at load time (Qwen3-MoE's
per-expert ``experts.{e}.gate_proj.weight`` become rows of the stacked ``experts.gate_up_proj``). The
mapping is the one export uses (fp4cal.export.layout.checkpoint_pieces, transformers' own reverse conversion):
each parameter is a set of checkpoint tensors, each filling whole rows of it, so reading is the exact inverse
of writing: allocate the parameter, copy each piece into its rows.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from fp4cal.export.io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from fp4cal.export.layout import Piece
from fp4cal.stream.skeleton import load_json

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointReader:
    """The safetensors files of ``model_dir`` (index or single file) and where each checkpoint tensor is.

    Missing shards, unknown tensors and shapes that disagree with the model's config raise errors that name
    the file. Files are opened once (memory-mapped) and read tensor by tensor.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / SAFE_WEIGHTS_INDEX_NAME
        single = self.model_dir / SAFE_WEIGHTS_NAME
        if index.is_file():
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'; expected a safetensors index file")
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) {missing[:5]} that are missing from {self.model_dir}")
            self.files = sorted(set(weight_map.values()))
            self.where = dict(weight_map)
            self.index_file: Path | None = index
        elif single.is_file():
            self.files = [SAFE_WEIGHTS_NAME]
            self.index_file = None
            with safe_open(str(single), framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
        else:
            raise FileNotFoundError(f"{self.model_dir} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; "
                                    "streaming reads safetensors checkpoints")
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()

    def shard_sizes(self) -> list[tuple[str, int]]:
        """(file name, bytes) of every shard: part of a run's fingerprint."""
        return [(f, (self.model_dir / f).stat().st_size) for f in self.files]

    def _handle(self, file: str):
        with self._lock:
            h = self._handles.get(file)
            if h is None:
                h = safe_open(str(self.model_dir / file), framework="pt")
                self._handles[file] = h
            return h

    def _locate(self, ckpt_name: str, param: str) -> str:
        file = self.where.get(ckpt_name)
        if file is None:
            src = self.index_file or self.model_dir / SAFE_WEIGHTS_NAME
            raise KeyError(f"checkpoint tensor {ckpt_name!r} (of parameter {param!r}) is not in {src}")
        return file

    def check(self, param: str, pieces: list[Piece], dtype: torch.dtype) -> None:
        """Raise ValueError naming the file when a piece's stored shape is not what the config says."""
        for piece in pieces:
            file = self._locate(piece.name, param)
            sl = self._handle(file).get_slice(piece.name)
            shape = tuple(sl.get_shape())
            if shape != tuple(piece.shape):
                raise ValueError(
                    f"{self.model_dir / file}: tensor {piece.name!r} has shape {shape}, but the model built from "
                    f"config.json expects {tuple(piece.shape)} (parameter {param!r}); the checkpoint and its "
                    "config.json disagree"
                )
            stored = _DTYPES.get(sl.get_dtype())
            if stored is not None and stored.is_floating_point != dtype.is_floating_point:
                raise ValueError(f"{self.model_dir / file}: tensor {piece.name!r} is {sl.get_dtype()}, but parameter "
                                 f"{param!r} is {dtype}")

    def read(self, param: str, shape: tuple[int, ...], dtype: torch.dtype, pieces: list[Piece]) -> torch.Tensor:
        """Parameter ``param`` [shape] in ``dtype`` on the CPU, assembled from its checkpoint pieces."""
        if len(pieces) == 1 and tuple(pieces[0].shape) == tuple(shape):
            t = self._get(pieces[0].name, param)
            return t if t.dtype == dtype else t.to(dtype)
        out = torch.empty(shape, dtype=dtype)
        last = shape[-1] if len(shape) else 1
        flat = out.view(-1, last)
        for piece in pieces:
            src = self._get(piece.name, param).reshape(-1, last)
            rows = piece.rows
            lo = int(rows[0])
            if rows.numel() == src.shape[0] and bool((rows == torch.arange(lo, lo + rows.numel())).all()):
                flat[lo : lo + rows.numel()].copy_(src)  # contiguous rows (stacked experts): a plain copy
            else:
                flat.index_copy_(0, rows, src.to(dtype))
        return out

    def _get(self, ckpt_name: str, param: str) -> torch.Tensor:
        file = self._locate(ckpt_name, param)
        try:
            return self._handle(file).get_tensor(ckpt_name)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise OSError(f"{self.model_dir / file}: reading tensor {ckpt_name!r} failed: {e}") from e


class Prefetcher:
    """Reads groups of tensors in a background thread while the caller computes: submit(key, fn) starts
    fn() (one at a time, in order), take(key) waits for it and returns its value (re-raising its error)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp4cal-read")
        self._pending: dict[object, Future] = {}

    def submit(self, key, fn) -> None:
        if key not in self._pending:
            self._pending[key] = self._pool.submit(fn)

    def take(self, key, fn=None):
        if key not in self._pending:
            if fn is None:
                raise KeyError(key)
            self.submit(key, fn)
        return self._pending.pop(key).result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy CPU tensors to ``device``. From the reading thread on CUDA: on a side stream, synchronized before
    returning, so the copy overlaps the main stream's kernels and the caller may use the tensors at once."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
    stream.synchronize()
    return out


def pin(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned CPU copies of CPU tensors when ``device`` is CUDA (a later copy to it is then asynchronous and at
    full bus speed); the tensors themselves otherwise."""
    if device.type != "cuda":
        return tensors
    return {k: v.pin_memory() for k, v in tensors.items()}


def to_host_async(tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], object]:
    """Pinned CPU copies of CUDA tensors, made on a side stream after the work queued so far, so that neither
    the compute stream nor the calling thread waits for them; returns (copies, event): read a copy only after
    event.synchronize(). CPU tensors come back as they are (event None when nothing is copied). Off CUDA:
    (tensors, None)."""
    if device.type != "cuda" or not any(t.device.type == "cuda" for t in tensors):
        return tensors, None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    out = [pinned_copy(t, stream) if t.device.type == "cuda" else t for t in tensors]
    done = torch.cuda.Event()
    done.record(stream)
    return out, done


def pinned_copy(t: torch.Tensor, stream) -> torch.Tensor:
    """A pinned CPU copy of the CUDA tensor ``t``, queued on ``stream`` (which the caller has ordered after the
    kernels that wrote t); valid once that stream reaches it."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # t's device memory is not reused before the copy has read it
    return host

