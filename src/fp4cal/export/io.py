"""Checkpoint files: an atomic output directory, sharded safetensors writing, and reading back.

Nothing is written half: export() writes into a hidden temporary directory next to ``out_dir`` and
renames it into place only after every file is complete. An exception (or Ctrl-C) removes the
temporary directory and leaves ``out_dir`` exactly as it was; a hard kill can leave the hidden
``.<name>.<pid>-*.fp4cal-partial`` directory behind, never a half checkpoint under ``out_dir``, and the next
export or load() of that directory removes it (recover_interrupted). A kill between the two renames of a
replacement is finished or rolled back the same way, from a journal written before the first rename.

Output paths are checked before any work (check_out_dir): unsafe paths (empty, ".", home, a filesystem
root, the working directory or its ancestors) are refused, and overwrite=True replaces only a directory
that is an NVFP4 checkpoint (checkpoint_kind). These helpers are public so every writer uses the same rule.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fp4cal.export.safetensors_writer import save_file

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


class UnsafeOutputError(ValueError):
    """An output path that fp4cal refuses to write or replace (it could destroy user data)."""


class CheckpointRecoveryWarning(UserWarning):
    """An interrupted export was finished or rolled back, or leftovers of a killed run were removed."""


NVFP4_CT_FORMATS = ("nvfp4-pack-quantized",)
NVFP4_MO_ALGOS = ("NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "MIXED_PRECISION")


def checkpoint_kind(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` counts as an NVFP4 checkpoint that export(overwrite=True) may replace, or None.

    The rule (written down in docs/reliability.md): a directory is replaceable when its config.json has a
    ``quantization_config`` that is compressed-tensors with format nvfp4-pack-quantized, or ModelOpt
    (quant_method "modelopt*") with an NVFP4 quant_algo, or when it has a ModelOpt hf_quant_config.json
    with an NVFP4 quant_algo. fp4cal writes both files on every export, so every fp4cal checkpoint qualifies;
    a directory of anything else (source code, a home directory, an unquantized model) never does.
    """
    d = Path(directory)
    try:
        q = read_json(d / "config.json").get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        q = {}
    if isinstance(q, dict):
        if q.get("quant_method") == "compressed-tensors" and q.get("format") in NVFP4_CT_FORMATS:
            return f"config.json has a compressed-tensors {q.get('format')} quantization_config"
        if str(q.get("quant_method", "")).lower().startswith("modelopt") and q.get("quant_algo") in NVFP4_MO_ALGOS:
            return f"config.json has a ModelOpt {q.get('quant_algo')} quantization_config"
    try:
        h = read_json(d / "hf_quant_config.json").get("quantization") or {}
    except (OSError, ValueError, AttributeError):
        h = {}
    if isinstance(h, dict) and h.get("quant_algo") in NVFP4_MO_ALGOS:
        return f"hf_quant_config.json has quant_algo {h.get('quant_algo')}"
    return None


def check_output_path(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """The absolute, resolved ``path``; UnsafeOutputError for a path that must never be written over.

    Refused: an empty string, a filesystem root, the home directory or an ancestor of it, the current
    working directory or an ancestor of it (``"."`` and ``".."`` included). ``what`` names the argument.
    """
    if path is None or isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if raw.strip() == "":
        raise UnsafeOutputError(f"{what} is an empty string; give the directory to write, e.g. 'out/model-nvfp4'")
    out = Path(raw).expanduser().resolve()
    if out.parent == out:
        raise UnsafeOutputError(f"{what} {raw!r} is a filesystem root ({out}); refusing to write there")
    home = Path.home().resolve()
    if out == home or out in home.parents:
        raise UnsafeOutputError(
            f"{what} {raw!r} is the home directory {home} or an ancestor of it; refusing to write there"
        )
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UnsafeOutputError(
            f"{what} {raw!r} is the current working directory {cwd} or an ancestor of it; refusing to write there "
            "(give a new sub-directory)"
        )
    return out


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, what: str = "out_dir") -> Path:
    """Check that ``out_dir`` may be written; returns it absolute and resolved. Raises before any work:

    - UnsafeOutputError for the paths check_output_path refuses;
    - FileExistsError for a file, or a non-empty directory when ``overwrite`` is False;
    - UnsafeOutputError for a non-empty directory that is not an NVFP4 checkpoint (checkpoint_kind), even
      with ``overwrite=True``: overwrite replaces checkpoints, never arbitrary directories.
    """
    out = check_output_path(out_dir, what)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"{what} {str(out_dir)!r} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{what} {str(out_dir)!r} exists and is not empty; pass overwrite=True to replace it "
                    "(only an existing NVFP4 checkpoint can be replaced)"
                )
            if checkpoint_kind(out) is None:
                names = sorted(p.name for p in out.iterdir())
                raise UnsafeOutputError(
                    f"{what} {str(out_dir)!r} is not an NVFP4 checkpoint (no config.json with an NVFP4 "
                    f"quantization_config, no NVFP4 hf_quant_config.json; it holds {names[:5]}"
                    f"{' ...' if len(names) > 5 else ''}); overwrite=True only replaces a checkpoint, so "
                    "nothing was written: choose a new or empty directory"
                )
    return out


def user_mode(directory: bool = True) -> int:
    """The permission bits a new directory (0o777) or file (0o666) gets under the process umask."""
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    if mask is None:  # not Linux: os.umask is the only portable read (it sets, so set it back)
        mask = os.umask(0o22)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def make_staging_dir(out: Path, kind: str = "partial") -> Path:
    """A new hidden directory ``.<name>.<pid>-<random>.fp4cal-<kind>`` beside ``out``, with the umask's mode
    (mkdtemp alone gives 0700, which other users of a shared model directory could not read)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=f".fp4cal-{kind}", dir=out.parent))
    os.chmod(tmp, user_mode(True))
    return tmp


def apply_user_mode(directory: Path) -> None:
    """Give every file and directory under ``directory`` (itself included) the umask's mode: some writers
    (safetensors' save_file, tempfile) create 0600 files, which other users of a shared model store cannot read."""
    dmode, fmode = user_mode(True), user_mode(False)
    os.chmod(directory, dmode)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), dmode)
        for name in files:
            os.chmod(os.path.join(root, name), fmode)


def _journal(out: Path) -> Path:
    return out.parent / f".{out.name}.fp4cal-swap.json"


def _pid_alive(name: str) -> bool:
    """Whether the process whose pid is encoded in a staging name (``.<out>.<pid>-<rand>.fp4cal-*``) still runs."""
    m = re.search(r"\.(\d+)-[^.]*\.fp4cal-(?:partial|old)$", name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(out_dir: str | os.PathLike, warn: bool = True) -> list[str]:
    """Finish or roll back a replacement of ``out_dir`` that a killed process left half done, and remove the
    staging directories of killed runs. Returns what was done (one sentence each), also issued as a
    CheckpointRecoveryWarning when ``warn``. Called by export (before writing) and load (before reading).

    The swap (staged_directory) writes a journal ``.<name>.fp4cal-swap.json`` naming the complete new
    directory and the place of the old one before renaming anything, and removes it after. With a journal:
    out_dir missing and the new directory present -> the new one is renamed into place (finished); out_dir
    missing and only the old one present -> the old one is renamed back (rolled back); out_dir present ->
    the leftover old (or unused new) directory is removed. Without a journal, staging directories whose
    writer process no longer runs are removed (a partial one was never complete).
    """
    out = Path(out_dir).expanduser().absolute()
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    journal = _journal(out)
    if journal.exists():
        try:
            j = read_json(journal)
            new, old = out.parent / j["new"], out.parent / j["old"]
        except (OSError, ValueError, KeyError, TypeError):
            new = old = None
        if new is None:
            done.append(f"removed the unreadable swap journal {journal.name}")
        elif not out.exists():
            if new.is_dir():
                os.rename(new, out)
                done.append(f"finished an interrupted export: moved the complete new checkpoint {new.name} to {out}")
                if old.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    done.append(f"removed the replaced checkpoint {old.name}")
            elif old.is_dir():
                os.rename(old, out)
                done.append(f"rolled back an interrupted export: restored the previous checkpoint {out} "
                            f"from {old.name}")
        else:
            for leftover, what in ((old, "replaced checkpoint"), (new, "unused new checkpoint")):
                if leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)
                    done.append(f"removed the {what} {leftover.name} left by an interrupted export of {out}")
        journal.unlink(missing_ok=True)
    own = re.compile(rf"\.{re.escape(out.name)}\.[^.]+\.fp4cal-(?:partial|old)")  # not those of 'name.x'
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.fp4cal-*")):
        if not own.fullmatch(p.name) or not p.is_dir() or _pid_alive(p.name):
            continue
        if p.name.endswith(".fp4cal-old") and not out.exists():
            os.rename(p, out)  # a pre-journal run died between its renames: the old checkpoint is all there is
            done.append(f"rolled back an interrupted export: restored the previous checkpoint {out} from {p.name}")
            continue
        if p.name.endswith((".fp4cal-partial", ".fp4cal-old")):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left beside {out.name} by a killed fp4cal run")
    if warn:
        for msg in done:
            warnings.warn(f"fp4cal: {msg}", CheckpointRecoveryWarning, stacklevel=3)
    return done


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it replaces ``out_dir``.

    out_dir is checked first (check_out_dir: unsafe paths and non-checkpoint directories are refused) and
    leftovers of interrupted runs are recovered (recover_interrupted). On any exception the temporary
    directory is deleted and ``out_dir`` is untouched. When replacing an existing directory, a journal is
    written, the old one renamed aside, the new one renamed in, and the old one deleted: at every instant
    ``out_dir`` is the old checkpoint, the complete new one, or (after a kill between the two renames)
    missing with the journal saying which of the two to restore, which the next export or load() does.
    Directories get the user's umask.
    """
    out = check_out_dir(out_dir, overwrite)
    recover_interrupted(out)
    out = check_out_dir(out_dir, overwrite)  # recovery may have restored a directory
    out.parent.mkdir(parents=True, exist_ok=True)  # mkdir applies the umask itself
    tmp = make_staging_dir(out)
    try:
        yield tmp
        swap_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete directory ``new`` (on out's filesystem) to ``out``, recoverably: files get the
    user's umask; an existing ``out`` (allowed by overwrite, checked again here) is replaced through a journal
    ``.<name>.fp4cal-swap.json`` naming both directories (relative to out's parent), the old one renamed
    aside, the new one renamed in, the old one deleted; a kill between the renames is finished or rolled back
    by recover_interrupted. Shared by staged_directory and the streaming engine's staging directory."""
    apply_user_mode(new)
    check_out_dir(out, overwrite)  # someone may have written there meanwhile
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.fp4cal-old"
    journal = _journal(out)
    write_json_atomic(journal, {"out": out.name, "new": os.path.relpath(new, out.parent), "old": old.name})
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        journal.unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Write named tensors into safetensors shards of at most ``max_shard_bytes`` each (a single
    tensor larger than that gets a shard of its own), in the order given.

    Shards are written as they fill, under provisional names, by a background thread: while one shard goes to
    disk the caller quantizes and copies the next (safetensors writes without holding the GIL). At most two
    shards are in memory, the one being written and the one being filled (the write itself is threaded:
    fp4cal.export.safetensors_writer). close() writes the last shard, waits,
    and renames them to ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. ``metadata`` strings attached with add() go into the header of the shard
    holding that tensor (besides {"format": "pt"}, which transformers requires). Use it as a context manager (or
    call wait()) so that a failure elsewhere does not leave a write running into a directory being removed; a
    failed write raises from the next add(), close() or wait().
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._tensors: dict[str, torch.Tensor] = {}
        self._metadata: dict[str, dict] = {}
        self._bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._pending = None  # the background write of the previous shard (concurrent.futures.Future)
        self._pool = None
        self.total_size = 0

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.wait()
        except BaseException:
            if exc_type is None:
                raise  # nothing else is propagating: the write's own failure is the error
        finally:
            self._shutdown()

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

    def wait(self) -> None:
        """Wait for the shard being written; re-raises its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _flush(self) -> None:
        if not self._tensors:
            return
        self.wait()  # one shard in flight at a time; a failed write stops the export here
        path = self.directory / f"shard-{len(self._files) + 1:05d}.partial.safetensors"
        meta = {"format": "pt", **{k: json.dumps(v, sort_keys=True) for k, v in self._metadata.items()}}
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp4cal-shard-writer")
        self._pending = self._pool.submit(self._write_shard, self._tensors, path, meta)
        self._files.append((path, list(self._tensors)))
        self._tensors, self._metadata, self._bytes = {}, {}, 0

    def _write_shard(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        save_file(tensors, path, metadata)  # threaded (safetensors_writer): the shard's bytes in parallel

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names, write the index; returns file names."""
        self._flush()
        try:
            self.wait()
        finally:
            self._shutdown()
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to a temporary name in ``path``'s directory, flushed to disk, then renamed over ``path``: a reader
    never sees half a file, and a failed write leaves no temporary behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """write_json's text, written by write_bytes_atomic (never a half file)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as what it claims to be; the message names the file."""


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index file when there is one)."""
    d = Path(directory)
    if not d.is_dir():
        what = "is a file, not a directory" if d.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} {what}")
    index = d / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        try:
            weight_map = read_json(index)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); expected JSON with a "
                "'weight_map' of tensor name -> shard file"
            ) from None
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) {missing[:3]} that are missing from {str(d)!r}")
        return [d / f for f in files]
    single = d / SAFE_WEIGHTS_NAME
    if single.exists():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors files in {str(d)!r}; expected {SAFE_WEIGHTS_NAME} or an index")
    return found


@dataclass
class CheckpointTensors:
    """Everything read from a checkpoint's shards.

    tensors: name -> tensor as stored. metadata: fp4cal header entries (key -> {module: value}) merged over
    shards. file_of: name -> the shard file it came from (for error messages).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, dict]
    file_of: dict[str, Path]


def open_shard(path: Path):
    """safe_open(path) for torch tensors; CheckpointError naming the file when it is truncated or corrupt."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a bad file
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"{path}: cannot read as safetensors ({e}); the file ({size} bytes) is truncated or corrupt "
            "(an interrupted download or copy?): expected an 8-byte header length, a JSON header and the "
            "tensor data it describes"
        ) from None


def read_checkpoint(directory: str | os.PathLike) -> CheckpointTensors:
    """All tensors of a checkpoint with their shard file, and the merged fp4cal metadata of the shard headers.

    Raises FileNotFoundError (no directory / no shards) or CheckpointError naming the file for truncated or
    corrupt shards, bad header metadata, duplicate tensor names across shards, and index entries that point
    at the wrong shard.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, dict] = {}
    file_of: dict[str, Path] = {}
    for path in checkpoint_files(directory):
        with open_shard(path) as f:
            for key, value in (f.metadata() or {}).items():
                if key.startswith("fp4cal"):
                    try:
                        entries = json.loads(value)
                        if not isinstance(entries, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:
                        raise CheckpointError(
                            f"{path}: header metadata {key!r} is corrupt ({e}); expected a JSON object of "
                            "module -> value as fp4cal writes it"
                        ) from None
                    metadata.setdefault(key, {}).update(entries)
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {file_of[name]} and in {path}")
                try:
                    tensors[name] = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(
                        f"{path}: cannot read tensor {name!r} ({e}); the file is truncated or corrupt"
                    ) from None
                file_of[name] = path
    index = Path(directory) / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        for name, shard in read_json(index)["weight_map"].items():
            if name not in tensors:
                raise CheckpointError(f"{index} maps tensor {name!r} to {shard}, which does not hold it")
    return CheckpointTensors(tensors, metadata, file_of)


def read_tensors(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """All tensors of a checkpoint, and the merged JSON metadata entries of its shard headers."""
    ck = read_checkpoint(directory)
    return ck.tensors, ck.metadata


def copy_aux_files(source_dir: Path, target_dir: Path) -> list[str]:
    """Copy tokenizer / generation / processor files (AUX_FILE_PATTERNS) from source_dir; returns their names."""
    copied = []
    pattern = re.compile("|".join(f"(?:{p})" for p in AUX_FILE_PATTERNS))
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and pattern.fullmatch(path.name) and not path.name.endswith(".safetensors"):
            shutil.copy2(path, target_dir / path.name)
            copied.append(path.name)
    return copied
