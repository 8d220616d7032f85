"""An interrupted export leaves no half checkpoint; existing directories are protected; bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import fp4cal
from fp4cal.export import exporter
from fp4cal.export import io as export_io
from fp4cal.export.io import parse_size
from test_export_helpers import case


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _siblings(directory):
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


class Boom(RuntimeError):
    pass


def _fail_on_shard(monkeypatch, n):
    """Make the n-th shard write raise, after n - 1 shards have been written to disk."""
    calls = []
    real = export_io.ShardedWriter._write_shard

    def write(self, tensors, path, metadata):
        calls.append(path)
        if len(calls) == n:
            raise Boom(f"injected failure writing shard {n}")
        real(self, tensors, path, metadata)

    monkeypatch.setattr(export_io.ShardedWriter, "_write_shard", write)
    return calls


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_failure_midway_leaves_no_directory(tmp_path, monkeypatch, fmt):
    model, result = case("llama")
    target = tmp_path / "parent" / "ckpt"
    calls = _fail_on_shard(monkeypatch, 3)
    with pytest.raises(Boom):
        fp4cal.export(result, model, target, format=fmt, max_shard_size="20KB")
    assert len(calls) == 3  # two shards were on disk when it failed
    assert not target.exists()
    assert _siblings(target) == []  # the temporary directory is gone too


def test_failure_midway_keeps_existing_checkpoint(tmp_path, monkeypatch):
    model, result = case("llama")
    target = fp4cal.export(result, model, tmp_path / "ckpt", max_shard_size="20KB")
    before = _snapshot(target)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    _fail_on_shard(monkeypatch, 2)
    with pytest.raises(Boom):
        fp4cal.export(result, other, target, overwrite=True, max_shard_size="20KB")
    assert _snapshot(target) == before
    assert _siblings(target) == []


def test_failure_after_weights_keeps_existing_checkpoint(tmp_path, monkeypatch):
    model, result = case("llama")
    target = fp4cal.export(result, model, tmp_path / "ckpt")
    before = _snapshot(target)

    def fail(*args, **kwargs):
        raise Boom("injected failure writing config.json")

    monkeypatch.setattr(exporter, "_write_config", fail)
    with pytest.raises(Boom):
        fp4cal.export(result, model, target, format="modelopt", overwrite=True)
    assert _snapshot(target) == before
    assert _siblings(target) == []


def test_overwrite_refused_then_allowed(tmp_path):
    model, result = case("llama")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        fp4cal.export(result, model, target)
    assert _snapshot(target) == {target.joinpath("keep.txt").relative_to(target): b"precious"}
    # overwrite=True replaces only an NVFP4 checkpoint: a directory of user files is refused, untouched
    with pytest.raises(export_io.UnsafeOutputError, match=r"not an NVFP4 checkpoint.*keep.txt"):
        fp4cal.export(result, model, target, overwrite=True)
    assert _snapshot(target) == {target.joinpath("keep.txt").relative_to(target): b"precious"}
    (target / "keep.txt").unlink()
    fp4cal.export(result, model, target)
    (target / "stale.txt").write_text("from the previous export")
    fp4cal.export(result, model, target, overwrite=True)  # an fp4cal checkpoint is replaced whole
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert _siblings(target) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    fp4cal.export(result, model, empty)  # an existing empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        fp4cal.export(result, model, tmp_path / "file", overwrite=True)


def _altered(result, name, **changes):
    r = copy.deepcopy(result)
    for key, value in changes.items():
        setattr(r.weights[name], key, value)
    return r


def test_bad_input_is_refused_with_clear_errors(tmp_path):
    model, result = case("llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    wr = result.weights[q]
    cases = [
        (dict(format="gguf"), result, ValueError, "format must be one of"),
        ({}, _altered(result, q, global_amax=wr.global_amax * 2), ValueError, "fused group .*qkv.* one global amax"),
        (dict(w4a4=True), _altered(result, q, input_amax=None), ValueError, "input_amax is None"),
        ({}, _altered(result, q, block_scale=torch.zeros_like(wr.block_scale)), ValueError, "block_scale disagrees"),
        ({}, _altered(result, q, shape=(1, 16)), ValueError, r"shape is \(1, 16\)"),
        (dict(max_shard_size="lots"), result, ValueError, "max_shard_size must look like"),
    ]
    for kwargs, res, exc, match in cases:
        with pytest.raises(exc, match=match):
            fp4cal.export(res, model, tmp_path / "bad", **kwargs)
        assert not (tmp_path / "bad").exists()
    renamed = copy.deepcopy(result)
    renamed.weights["nope.weight"] = renamed.weights.pop(q)
    with pytest.raises(ValueError, match="'nope.weight'.* names no parameter"):
        fp4cal.export(renamed, model, tmp_path / "bad")
    with pytest.raises(ValueError, match="not an NVFP4 checkpoint"):
        model.save_pretrained(tmp_path / "dense")
        fp4cal.load(tmp_path / "dense")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("0GB", "5XB", -1, True):
        with pytest.raises((ValueError, TypeError)):
            parse_size(bad)


def test_transposed_expert_stacks_are_refused(tmp_path):
    """gpt-oss-style [E, cin, cout] stacks calibrate, but export must refuse them clearly, writing nothing."""
    import pytest
    import torch

    import fp4cal
    from fp4cal.calib.result import CalibrationResult, WeightResult

    z = torch.zeros(1)
    res = CalibrationResult("mse")
    res.weights["experts.gate_up_proj"] = WeightResult(
        "experts.gate_up_proj", "experts", "experts", (2, 32, 16), "mse", z, z, z, transposed=True
    )
    with pytest.raises(NotImplementedError, match=r"\[E, cin, cout\]"):
        fp4cal.export(res, torch.nn.Linear(16, 16), tmp_path / "out")
    assert not (tmp_path / "out").exists()
