"""Write one safetensors file with several threads.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length N, N
bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, padded with
spaces), then the tensors' bytes, back to back, offsets relative to the end of the header, covering the buffer
without holes. Any reader of the format reads these files (the tests read them with safetensors itself).

Why not safetensors.torch.save_file: it writes from one thread, and an export's shards are gigabytes (a 5 GB
shard took seconds, serialized after the shard was assembled). Here the file is sized first and the tensors'
bytes are written with ``os.pwrite`` at their offsets from a few threads in 64 MiB pieces; pwrite releases the
GIL, so the copies into the page cache run in parallel. The bytes are a deterministic function of the tensors
and the metadata: tensors ordered by element size (largest first, so every tensor's offset is a multiple of its
element size: the header length is a multiple of 8) then name, metadata keys sorted, so two runs with equal
inputs write equal files (streaming's resume relies on it).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
PIECE = 64 << 20  # bytes per pwrite: small enough to spread one large tensor over the threads
THREADS = 4


def _bytes_of(t: torch.Tensor):
    """A uint8 numpy view of a contiguous CPU tensor's bytes (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
              threads: int = THREADS) -> None:
    """Write ``tensors`` (name -> CPU tensor; made contiguous) and string ``metadata`` to ``path`` as safetensors.

    Raises TypeError for a dtype the format has no name for, or for non-string metadata, ValueError for a tensor
    that is not on the CPU; OSError from the file system (the caller removes a partial file)."""
    items = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"tensor {name!r}: safetensors has no dtype for {got}")
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {t.device}; copy it to the CPU before writing")
        items.append((name, t.contiguous()))
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not so for {bad[:3]}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(start + offset)
    pieces = []  # (tensor bytes, begin, end, file offset)
    for name, t in items:
        begin, end = header[name]["data_offsets"]
        if end > begin:
            data = _bytes_of(t)
            for a in range(0, end - begin, PIECE):
                pieces.append((data, a, min(a + PIECE, end - begin), start + begin + a))

    def write(piece) -> None:
        data, a, b, pos = piece
        view = memoryview(data)[a:b]
        while view:
            done = os.pwrite(fd, view, pos)
            view, pos = view[done:], pos + done

    fd = os.open(path, os.O_WRONLY)
    try:
        if len(pieces) <= 1 or threads <= 1:
            for p in pieces:
                write(p)
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(pieces))) as pool:
                for _ in pool.map(write, pieces):
                    pass
    finally:
        os.close(fd)
