"""The staging directory of a streamed run: shards committed layer by layer, a manifest, resume, publish.

    .<out>.fp4cal-stream/              beside out_dir, hidden, one per output directory
        manifest.json                  fingerprint of the run + what is committed (written last, atomically)
        results/unit-00003.pt          the committed layer's WeightResults (WeightResult.to_dict)
        ckpt/part-00007.safetensors    output shards under provisional names
        ckpt/...                       config.json & co., written when all layers are done

A unit (one decoder layer, or the tensors outside the layers) is committed when its shards and results are
on disk and the manifest lists it; a killed run leaves at most uncommitted files, which the next run with
the same fingerprint deletes before resuming after the last committed unit. A different fingerprint (another
model, other arguments) is refused with a message naming the directory. The final directory appears only
when everything is written: ckpt/ is renamed to out_dir (publish).

Shards: each unit's tensors are split into shards of at most max_shard_bytes (a tensor larger than that
gets its own), in the order given, and never shared between units, so a committed unit never has to be
rewritten. publish() gives them their final names (model.safetensors, or model-0000i-of-0000n.safetensors
plus model.safetensors.index.json, as fp4cal.export.io.ShardedWriter names them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch

from fp4cal.calib.result import WeightResult
from fp4cal.export.io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    swap_into_place,
    write_json,
)
from fp4cal.export.safetensors_writer import save_file

MANIFEST = "manifest.json"
VERSION = 1
FAULT_ENV = "FP4CAL_STREAM_FAULT"  # tests: "shard:N" / "commit:N" SIGKILLs this process there (unit N)


def staging_path(out_dir: Path) -> Path:
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.fp4cal-stream"


def fingerprint_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensors) -> str:
    """sha256 over the bytes, shapes and dtypes of a sequence of CPU tensors (the calibration ids)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fault(kind: str, unit: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{kind}:{unit}":
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_json(tmp, data)
    os.replace(tmp, path)


class Staging:
    """One run's staging directory. ``fingerprint``: what makes two runs the same (config, shards, arguments,
    calibration data); ``resume``: pick up a matching earlier run (else start afresh)."""

    def __init__(self, out_dir: Path, fingerprint: dict, max_shard_bytes: int, resume: bool = True):
        self.out_dir = Path(out_dir).absolute()
        self.dir = staging_path(self.out_dir)
        self.ckpt = self.dir / "ckpt"
        self.results = self.dir / "results"
        self.max_shard_bytes = max_shard_bytes
        self.fingerprint = fingerprint
        self.key = fingerprint_hash(fingerprint)
        self.files: list[dict] = []  # committed shards: {"file", "names", "bytes"}
        self.units: list[int] = []  # committed unit numbers, in order
        if self.dir.exists():
            self._open_existing(resume)
        else:
            self._create()

    # -- opening ---------------------------------------------------------------------------------------
    def _create(self) -> None:
        self.dir.mkdir(parents=True)
        self.ckpt.mkdir()
        self.results.mkdir()
        self._write_manifest()

    def _open_existing(self, resume: bool) -> None:
        manifest = self.dir / MANIFEST
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            data = None
        if data is None or data.get("version") != VERSION:
            raise FileExistsError(
                f"{self.dir} exists but holds no readable fp4cal streaming manifest ({manifest}); it is not a "
                "partial run of this version: remove it, or choose another output directory"
            )
        if data.get("key") != self.key:
            theirs = data.get("fingerprint", {})
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            if resume:
                raise FileExistsError(
                    f"{self.dir} holds a partial run of a different job (model {theirs.get('model_dir')!r}; "
                    f"differs in: {', '.join(diff) or 'fingerprint'}); refusing to mix them. Remove it, or pass "
                    "resume=False (--restart) to discard it"
                )
        if not resume or data.get("key") != self.key:
            shutil.rmtree(self.dir)
            self._create()
            return
        self.files = list(data["files"])
        self.units = list(data["units"])
        # drop what a killed run wrote after its last commit
        keep = {f["file"] for f in self.files}
        for p in self.ckpt.iterdir():
            if p.name not in keep:
                p.unlink()
        done = {self._result_path(u).name for u in self.units}
        for p in self.results.iterdir():
            if p.name not in done:
                p.unlink()
        for f in self.files:
            size = (self.ckpt / f["file"]).stat().st_size
            if size != f["bytes"]:
                raise ValueError(f"{self.ckpt / f['file']} has {size} bytes but the manifest recorded {f['bytes']}; "
                                 f"the partial run in {self.dir} is damaged: remove it")

    def _write_manifest(self) -> None:
        _atomic_json(self.dir / MANIFEST, {"version": VERSION, "key": self.key, "fingerprint": self.fingerprint,
                                           "units": self.units, "files": self.files})

    def _result_path(self, unit: int) -> Path:
        return self.results / f"unit-{unit:05d}.pt"

    # -- committing ------------------------------------------------------------------------------------
    def committed(self, unit: int) -> bool:
        return unit in self.units

    def load_results(self, unit: int, device=None) -> dict[str, WeightResult]:
        data = torch.load(self._result_path(unit), map_location="cpu", weights_only=True)
        return {n: WeightResult.from_dict(d, device) for n, d in data.items()}

    def commit(self, unit: int, tensors: list[tuple[str, torch.Tensor, dict | None]],
               results: dict[str, WeightResult]) -> None:
        """Write one unit's tensors as shards and its results, then record it in the manifest (in that order,
        so a unit is listed only when all of it is on disk). Tensors may be on any device."""
        records = []
        for group in self._split(tensors):
            name = f"part-{len(self.files) + len(records) + 1:05d}.safetensors"
            records.append(self._write_shard(self.ckpt / name, group))
        _fault("shard", unit)
        path = self._result_path(unit)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({n: wr.to_dict() for n, wr in results.items()}, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        self.files.extend(records)
        self.units.append(unit)
        self._write_manifest()
        _fault("commit", unit)

    def _split(self, tensors):
        group, size = [], 0
        for item in tensors:
            n = item[1].numel() * item[1].element_size()
            if group and size + n > self.max_shard_bytes:
                yield group
                group, size = [], 0
            group.append(item)
            size += n
        if group:
            yield group

    @staticmethod
    def _write_shard(path: Path, group) -> dict:
        tensors, metadata, names, nbytes = {}, {}, [], 0
        for name, t, meta in group:
            if name in tensors:
                raise ValueError(f"tensor {name!r} was written twice; checkpoint names must be unique")
            tensors[name] = t.detach().to("cpu").contiguous()
            names.append(name)
            nbytes += tensors[name].numel() * tensors[name].element_size()
            for key, entries in (meta or {}).items():
                metadata.setdefault(key, {}).update(entries)
        header = {"format": "pt", **{k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}}
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, tmp, header)  # deterministic bytes (sorted metadata): a resumed run ends identical
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        return {"file": path.name, "names": names, "bytes": path.stat().st_size, "tensor_bytes": nbytes}

    # -- finishing -------------------------------------------------------------------------------------
    def finalize_shards(self) -> list[str]:
        """Give the committed shards their final names and write the index (several shards)."""
        n = len(self.files)
        if n == 0:
            raise ValueError("no tensors were written; the checkpoint would be empty")
        finals = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map, total = {}, 0
        for rec, final in zip(self.files, finals, strict=True):
            os.replace(self.ckpt / rec["file"], self.ckpt / final)
            weight_map.update(dict.fromkeys(rec["names"], final))
            total += rec["tensor_bytes"]
        if n > 1:
            write_json(self.ckpt / SAFE_WEIGHTS_INDEX_NAME,
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        return finals

    def publish(self, overwrite: bool) -> Path:
        """Rename ckpt/ to out_dir (recoverably, as export does: fp4cal.export.io.swap_into_place), then remove
        the staging directory."""
        out = self.out_dir
        swap_into_place(self.ckpt, out, overwrite)
        shutil.rmtree(self.dir, ignore_errors=True)
        return out

