"""fp4cal's threaded safetensors writer: files that safetensors itself reads back, equal, deterministic."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fp4cal.export import safetensors_writer as sw


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(33, 48, generator=g).to(torch.bfloat16),
        "codes": torch.randint(0, 256, (17, 24), generator=g, dtype=torch.uint8),
        "scale.fp8": torch.rand(17, 3, generator=g).to(torch.float8_e4m3fn),
        "g": torch.tensor(3.5),
        "empty": torch.zeros(0, 16),
        "i64": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "strided": torch.randn(8, 6, generator=g).t(),  # not contiguous
    }


@pytest.mark.parametrize("threads", [1, 4])
def test_safetensors_reads_back_every_tensor_and_the_metadata(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(sw, "PIECE", 64)  # many pieces per tensor: the threads split tensors
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    sw.save_file(tensors, path, {"format": "pt", "b": "2", "a": "1"}, threads=threads)
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else back[name],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "a": "1", "b": "2"}
    # offsets are aligned to each tensor's element size; the header length is a multiple of 8
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    import json

    for name, spec in json.loads(raw[8:8 + n]).items():
        if name != "__metadata__":
            assert spec["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_equal_inputs_give_equal_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sw.save_file(_tensors(), a, {"x": "1", "format": "pt"})
    sw.save_file(dict(reversed(list(_tensors().items()))), b, {"format": "pt", "x": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(TypeError, match="'c'.*complex64"):
        sw.save_file({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        sw.save_file({"x": torch.zeros(2)}, tmp_path / "m.safetensors", {"k": 1})
    with pytest.raises(ValueError, match="'x' is on meta"):
        sw.save_file({"x": torch.zeros(2, device="meta")}, tmp_path / "d.safetensors")
