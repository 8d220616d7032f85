"""Issue 16: load() of a missing, truncated, corrupt or inconsistent checkpoint names the file, the tensor and
what was expected; scales that would give NaN / inf / silent zeros are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fp4cal
from fp4cal.export.io import SAFE_WEIGHTS_NAME, CheckpointError
from test_export_helpers import case

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    model, result = case("llama")
    base = tmp_path_factory.mktemp("load")
    return {fmt: fp4cal.export(result, model, base / fmt, format=fmt) for fmt in ("compressed-tensors", "modelopt")}


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def _rewrite(d, edit):
    """Rewrite model.safetensors with edit(tensors, metadata) applied."""
    path = d / SAFE_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _foreign(tensors, meta):
    meta.pop("fp4cal_global_scale", None)  # as compressed-tensors or another tool writes it


@pytest.mark.parametrize("as_model", [False, True])
def test_missing_directory(tmp_path, as_model):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory '.*nope' does not exist"):
        fp4cal.load(tmp_path / "nope", as_model=as_model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; expected a checkpoint directory"):
        fp4cal.load(tmp_path / "file", as_model=as_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        fp4cal.load(tmp_path / "empty", as_model=as_model)


@pytest.mark.parametrize("bad", [None, 3, 3.5])
def test_load_path_type(bad):
    with pytest.raises(TypeError, match="path must be a checkpoint directory"):
        fp4cal.load(bad)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool, "float32"])
def test_load_refuses_integer_dtypes(ckpts, dtype):
    for as_model in (False, True):
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            fp4cal.load(ckpts["modelopt"], as_model=as_model, dtype=dtype)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_truncated_shard(tmp_path, ckpts, fmt):
    d = _copy(ckpts[fmt], tmp_path)
    data = (d / SAFE_WEIGHTS_NAME).read_bytes()
    (d / SAFE_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read as safetensors.*truncated or corrupt"):
        fp4cal.load(d, as_model=False)


def test_corrupt_safetensors_header(tmp_path, ckpts):
    d = _copy(ckpts["compressed-tensors"], tmp_path)
    data = bytearray((d / SAFE_WEIGHTS_NAME).read_bytes())
    data[8:20] = b"#" * 12  # the JSON header
    (d / SAFE_WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read as safetensors"):
        fp4cal.load(d)


def test_corrupt_fp4cal_header_entry(tmp_path, ckpts):
    d = _copy(ckpts["compressed-tensors"], tmp_path)

    def edit(tensors, meta):
        entries = json.loads(meta["fp4cal_global_scale"])
        entries[Q] = "zz"
        meta["fp4cal_global_scale"] = json.dumps(entries)

    _rewrite(d, edit)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: header metadata .*{Q}.* is 'zz'; expected"):
        fp4cal.load(d, as_model=False)
    _rewrite(d, lambda t, m: m.update(fp4cal_global_scale="{not json"))
    with pytest.raises(CheckpointError, match="header metadata 'fp4cal_global_scale' is corrupt"):
        fp4cal.load(d, as_model=False)


@pytest.mark.parametrize("fmt,suffix", [("compressed-tensors", "weight_global_scale"), ("compressed-tensors",
                         "weight_packed"), ("modelopt", "weight_scale"), ("modelopt", "weight_scale_2")])
def test_missing_tensor(tmp_path, ckpts, fmt, suffix):
    d = _copy(ckpts[fmt], tmp_path)
    _rewrite(d, lambda t, m: t.pop(f"{Q}.{suffix}"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: quantized module '{Q}' has .* no tensor "
                       rf"'{Q}\.{suffix}'"):
        fp4cal.load(d, as_model=False)


def test_index_points_at_missing_shard(tmp_path):
    model, result = case("llama")
    d = fp4cal.export(result, model, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"index.json lists shard\(s\) \['{shard.name}'\] that are missing"):
        fp4cal.load(d, as_model=False)


@pytest.mark.parametrize("value", [0.0, float("inf"), float("nan"), -1.0])
def test_foreign_compressed_tensors_global_scale(tmp_path, ckpts, value):
    d = _copy(ckpts["compressed-tensors"], tmp_path)

    def edit(tensors, meta):
        _foreign(tensors, meta)
        tensors[f"{Q}.weight_global_scale"] = torch.tensor([value])

    _rewrite(d, edit)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{Q}\.weight_global_scale' is "
                       r"(0|inf|nan|-1\.0); expected a (finite, )?positive global scale"):
        fp4cal.load(d, as_model=False)


def test_foreign_compressed_tensors_loads_when_valid(tmp_path, ckpts):
    """Control: the same foreign edit with a valid scale loads, finite (the checks refuse only bad values)."""
    d = _copy(ckpts["compressed-tensors"], tmp_path)
    _rewrite(d, _foreign)
    dense = fp4cal.load(d, as_model=False)
    assert all(bool(torch.isfinite(t.float()).all()) for t in dense.values())


@pytest.mark.parametrize("value", [0.0, float("inf")])
def test_modelopt_global_scale(tmp_path, ckpts, value):
    d = _copy(ckpts["modelopt"], tmp_path)
    _rewrite(d, lambda t, m: t.__setitem__(f"{Q}.weight_scale_2", torch.tensor(value)))
    with pytest.raises(CheckpointError, match=rf"tensor '{Q}\.weight_scale_2' is (0|inf)"):
        fp4cal.load(d, as_model=False)


def test_nan_block_scale_and_bad_shapes(tmp_path, ckpts):
    d = _copy(ckpts["modelopt"], tmp_path)

    def nan(tensors, meta):
        v = tensors[f"{Q}.weight_scale"].view(torch.uint8).clone()
        v[0, 0] = 0x7F  # the E4M3 NaN code
        tensors[f"{Q}.weight_scale"] = v.view(torch.float8_e4m3fn)

    _rewrite(d, nan)
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight_scale' has 1 NaN FP8 code"):
        fp4cal.load(d, as_model=False)
    d = _copy(ckpts["modelopt"], tmp_path, "shape")
    _rewrite(d, lambda t, m: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"][:, :1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight_scale' is torch.float8_e4m3fn \(64, 1\); expected"):
        fp4cal.load(d, as_model=False)
    d = _copy(ckpts["modelopt"], tmp_path, "dtype")
    _rewrite(d, lambda t, m: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].to(torch.int16)))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight' is torch.int16 .*expected uint8"):
        fp4cal.load(d, as_model=False)
