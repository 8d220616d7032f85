"""Checkpoint files: an atomic output directory, sharded safetensors writing, and reading back.

Nothing is written half: export() writes into a hidden temporary directory next to ``out_dir`` and
renames it into place only after every file is complete. An exception (or Ctrl-C) removes the
temporary directory and leaves ``out_dir`` exactly as it was; a hard kill can leave the hidden
``.<name>.*.fp4cal-partial`` directory behind, never a half checkpoint under ``out_dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Files copied from the source model directory: tokenizer, generation and processor files. Weights,
# config.json and quantization configs are written by export itself and never copied.
AUX_FILE_PATTERNS = (
    r"tokenizer.*",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab\..*",
    r"merges\.txt",
    r".*\.tiktoken",
    r".*\.model",  # sentencepiece
    r"spiece\.model",
    r"chat_template\..*",
    r"generation_config\.json",
    r"preprocessor_config\.json",
    r"processor_config\.json",
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Bytes from an int or a string like "5GB" (10^9, as Hugging Face counts) or "500MiB" (2^20)."""
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
        if not m or (m.group(2) or "") not in _UNITS:
            raise ValueError(f"{name} must look like '5GB', '500MB' or '2GiB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    else:
        raise TypeError(f"{name} must be an int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return value


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing directory (or a file) unless overwrite is set."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"out_dir {str(out_dir)!r} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True to replace it"
            )


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it replaces ``out_dir``.

    On any exception the temporary directory is deleted and ``out_dir`` is untouched. When replacing
    an existing directory, the old one is renamed aside first and deleted only after the new one is in
    place, so at every instant ``out_dir`` is either the old checkpoint or the complete new one.
    """
    out = Path(out_dir).absolute()
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".fp4cal-partial", dir=out.parent))
    try:
        yield tmp
        check_out_dir(out, overwrite)  # someone may have written there meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.fp4cal-old"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Write named tensors into safetensors shards of at most ``max_shard_bytes`` each (a single
    tensor larger than that gets a shard of its own), in the order given.

    One shard is kept in memory at a time. Shards are written as they fill, under provisional names,
    and renamed by close() to ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. ``metadata`` strings attached with add() go into the header
    of the shard holding that tensor (besides {"format": "pt"}, which transformers requires).
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._tensors: dict[str, torch.Tensor] = {}
        self._metadata: dict[str, dict] = {}
        self._bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor, metadata: dict[str, dict] | None = None) -> None:
        """Queue one tensor. metadata: {key: {entry: str}}; entries of the same key are merged per shard."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was written twice; checkpoint names must be unique")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        size = _nbytes(t)
        if self._tensors and self._bytes + size > self.max_shard_bytes:
            self._flush()
        self._tensors[name] = t
        self._bytes += size
        self.total_size += size
        for key, entries in (metadata or {}).items():
            self._metadata.setdefault(key, {}).update(entries)

    def _flush(self) -> None:
        if not self._tensors:
            return
        path = self.directory / f"shard-{len(self._files) + 1:05d}.partial.safetensors"
        meta = {"format": "pt", **{k: json.dumps(v, sort_keys=True) for k, v in self._metadata.items()}}
        self._write_shard(self._tensors, path, meta)
        self._files.append((path, list(self._tensors)))
        self._tensors, self._metadata, self._bytes = {}, {}, 0

    def _write_shard(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        save_file(tensors, str(path), metadata=metadata)

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names, write the index; returns file names."""
        self._flush()
        n = len(self._files)
        if n == 0:
            raise ValueError("no tensors were written; the checkpoint would be empty")
        names = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (path, tensor_names), final in zip(self._files, names, strict=True):
            os.rename(path, self.directory / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / SAFE_WEIGHTS_INDEX_NAME, index)
        return names


def write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys)
        f.write("\n")


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index file when there is one)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} does not exist")
    index = d / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
        return [d / f for f in files]
    single = d / SAFE_WEIGHTS_NAME
    if single.exists():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors files in {str(d)!r}; expected {SAFE_WEIGHTS_NAME} or an index")
    return found


def read_tensors(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """All tensors of a checkpoint, and the merged JSON metadata entries of its shard headers."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, dict] = {}
    for path in checkpoint_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key, value in (f.metadata() or {}).items():
                if key.startswith("fp4cal"):
                    metadata.setdefault(key, {}).update(json.loads(value))
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors, metadata


def copy_aux_files(source_dir: Path, target_dir: Path) -> list[str]:
    """Copy tokenizer / generation / processor files (AUX_FILE_PATTERNS) from source_dir; returns their names."""
    copied = []
    pattern = re.compile("|".join(f"(?:{p})" for p in AUX_FILE_PATTERNS))
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and pattern.fullmatch(path.name) and not path.name.endswith(".safetensors"):
            shutil.copy2(path, target_dir / path.name)
            copied.append(path.name)
    return copied
