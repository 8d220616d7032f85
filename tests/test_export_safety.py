"""Issue 16, data loss: unsafe output paths are refused, overwrite replaces only checkpoints, files get the
user's umask, a kill between the renames of the swap is finished or rolled back, leftovers are removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fp4cal
from fp4cal.export import io as export_io
from fp4cal.export.io import CheckpointRecoveryWarning, UnsafeOutputError, checkpoint_kind
from test_export_helpers import case


def _tree(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["", ".", "cwd", "cwd-parent", "home", "home-parent", "root"])
def test_unsafe_out_dir_is_refused_and_nothing_changes(tmp_path, monkeypatch, where):
    model, result = case("llama")
    work = tmp_path / "project" / "src"
    work.mkdir(parents=True)
    (work / "main.py").write_text("precious source")
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    out = {"": "", ".": ".", "cwd": str(work), "cwd-parent": "..", "home": "~", "home-parent": str(home.parent),
           "root": os.path.abspath(os.sep)}[where]
    before = _tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UnsafeOutputError, match="refusing to write there|empty string") as e:
            fp4cal.export(result, model, out, overwrite=overwrite)
        assert "out_dir" in str(e.value)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in work.parent.iterdir()) == ["src"]  # no staging directory either


def test_overwrite_refuses_a_plain_model_directory(tmp_path):
    model, result = case("llama")
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    before = _tree(dense)
    assert checkpoint_kind(dense) is None
    with pytest.raises(UnsafeOutputError, match=r"not an NVFP4 checkpoint.*config.json"):
        fp4cal.export(result, model, dense, overwrite=True)
    assert _tree(dense) == before
    for fmt in ("compressed-tensors", "modelopt"):
        out = fp4cal.export(result, model, tmp_path / fmt, format=fmt)
        assert checkpoint_kind(out) is not None
        fp4cal.export(result, model, out, format=fmt, overwrite=True)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_directories_follow_the_umask(tmp_path, mask):
    model, result = case("llama")
    old = os.umask(mask)
    try:
        out = fp4cal.export(result, model, tmp_path / "new" / "ckpt", max_shard_size="20KB")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert (out.parent.stat().st_mode & 0o777) == 0o777 & ~mask
    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) > 3
    for p in files:
        assert (p.stat().st_mode & 0o777) == 0o666 & ~mask, p.name


_CHILD = textwrap.dedent("""
    import os, shutil, sys
    from fp4cal.export import io
    out, source, die_at = sys.argv[1:4]
    real = os.rename
    calls = []
    def rename(a, b):
        calls.append(a)
        if die_at == "between" and len(calls) == 2:
            os._exit(9)  # killed after out -> old, before new -> out
        return real(a, b)
    io.os.rename = rename
    with io.staged_directory(out, overwrite=True) as tmp:
        for p in os.listdir(source):
            shutil.copy(os.path.join(source, p), tmp)
        if die_at == "write":
            os._exit(9)  # killed while writing
""")


def _killed_export(out: Path, source: Path, die_at: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fp4cal.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(source), die_at], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """(old, new): two modelopt checkpoints of the tiny Llama with different embeddings."""
    model, result = case("llama")
    base = tmp_path_factory.mktemp("two")
    old = fp4cal.export(result, model, base / "old", format="modelopt")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    new = fp4cal.export(result, model, base / "new", format="modelopt")
    return old, new


def _embed(d: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointRecoveryWarning)
        return fp4cal.load(d, as_model=False)["model.embed_tokens.weight"]


def test_kill_between_renames_is_finished_by_load(tmp_path, two_checkpoints):
    old, new = two_checkpoints
    out = tmp_path / "ckpt"
    shutil.copytree(old, out)
    _killed_export(out, new, "between")
    assert not out.exists()  # the state the issue reports: out_dir gone, both halves hidden beside it
    assert (tmp_path / ".ckpt.fp4cal-swap.json").exists()
    with pytest.warns(CheckpointRecoveryWarning, match="finished an interrupted export"):
        dense = fp4cal.load(out, as_model=False)
    assert torch.equal(dense["model.embed_tokens.weight"], _embed(new))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_between_renames_rolls_back_when_new_is_lost(tmp_path, two_checkpoints):
    old, new = two_checkpoints
    out = tmp_path / "ckpt"
    shutil.copytree(old, out)
    _killed_export(out, new, "between")
    journal = json.loads((tmp_path / ".ckpt.fp4cal-swap.json").read_text())
    shutil.rmtree(tmp_path / journal["new"])
    with pytest.warns(CheckpointRecoveryWarning, match="rolled back an interrupted export"):
        export_io.recover_interrupted(out)
    assert torch.equal(_embed(out), _embed(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_a_killed_export_are_removed_by_the_next(tmp_path, two_checkpoints):
    old, new = two_checkpoints
    out = tmp_path / "ckpt"
    shutil.copytree(old, out)
    _killed_export(out, new, "write")
    partial = [p.name for p in tmp_path.iterdir() if p.name.endswith(".fp4cal-partial")]
    assert len(partial) == 1 and (out / "config.json").exists()
    # a sibling checkpoint whose name extends ours keeps its own (live-looking or not) staging directory
    other = tmp_path / f".ckpt.v2.{os.getpid()}-abc.fp4cal-partial"
    other.mkdir()
    model, result = case("llama")
    with pytest.warns(CheckpointRecoveryWarning, match=rf"removed {partial[0]}.*killed fp4cal run"):
        fp4cal.export(result, model, out, format="modelopt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", other.name])
    assert not torch.equal(_embed(out), _embed(new))  # the model of this export, not the killed one's


def test_load_removes_leftovers_and_says_so(tmp_path, two_checkpoints):
    old, new = two_checkpoints
    out = tmp_path / "ckpt"
    shutil.copytree(old, out)
    _killed_export(out, new, "write")
    with pytest.warns(CheckpointRecoveryWarning, match="killed fp4cal run"):
        dense = fp4cal.load(out, as_model=False)
    assert torch.equal(dense["model.embed_tokens.weight"], _embed(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_live_staging_directory_is_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    live = tmp_path / f".ckpt.{os.getpid()}-xyz.fp4cal-partial"  # our own pid: a run in progress
    live.mkdir()
    assert export_io.recover_interrupted(out) == []
    assert live.exists()
