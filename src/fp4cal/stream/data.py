"""Calibration token ids for a streamed run, cached by content hash.

Tokenizing is cheap for a few samples but not free for many long ones, and the same model is often
quantized several times with the same data. The ids are cached under ``$FP4CAL_CACHE`` (default
``$XDG_CACHE_HOME/fp4cal`` or ``~/.cache/fp4cal``) in ``tokens/<sha256>.pt``, the hash covering the
tokenizer files, the text and the sampling arguments. The cache is never required: an unwritable or
damaged cache only costs the tokenization.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fp4cal.calib.data import load_texts, to_batches, token_windows

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model")


def cache_dir() -> Path:
    root = os.environ.get("FP4CAL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fp4cal"


def cached_calibration_batches(model_dir: Path, texts=None, samples: int = 32, seq_len: int = 128,
                               batch_size: int = 8, use_cache: bool = True) -> list[dict[str, torch.Tensor]]:
    """calibration_batches(tokenizer of model_dir, texts, ...) through the token cache (see module docstring)."""
    docs = load_texts(texts, "calib")
    h = hashlib.sha256(f"v1|{samples}|{seq_len}".encode())
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    path = cache_dir() / "tokens" / f"{h.hexdigest()}.pt"
    ids = None
    if use_cache and path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
            if not (isinstance(ids, torch.Tensor) and tuple(ids.shape) == (samples, seq_len)):
                ids = None
        except Exception:  # a damaged cache entry is rebuilt
            ids = None
    if ids is None:
        from transformers import AutoTokenizer

        ids = token_windows(AutoTokenizer.from_pretrained(model_dir), docs, samples, seq_len)
        if use_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                torch.save(ids, tmp)
                os.replace(tmp, path)
            except OSError:
                pass
    return to_batches(ids, batch_size)
