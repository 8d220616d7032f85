"""fp4cal check (and the check at the end of every export): checkpoints of fp4cal, of compressed-tensors' own
compressor, and hand-broken copies, against the rules read from the engines' loaders (docs/export.md)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fp4cal
from fp4cal.cli import main
from fp4cal.export import modelopt as mo_format
from fp4cal.export.check import ENGINES, check_checkpoint
from fp4cal.export.io import SAFE_WEIGHTS_NAME, CheckpointError
from test_export_helpers import build_result, case, tiny_qwen3_moe

transformers = pytest.importorskip("transformers")
ATTN = "model.layers.0.self_attn"


def errors(findings, engine):
    return [f for f in findings if f.severity == "error" and engine in f.engines]


def _rewrite(d, edit):
    path = d / SAFE_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("check")
    llama, r = case("llama")
    moe, rm = case("moe")
    return {
        "ct": fp4cal.export(r, llama, base / "ct"),
        "ct-w4a4": fp4cal.export(r, llama, base / "ct4", w4a4=True),
        "mo-w4a4": fp4cal.export(r, llama, base / "mo4", format="modelopt", w4a4=True),
        "mo": fp4cal.export(r, llama, base / "mo", format="modelopt"),
        "moe-ct": fp4cal.export(rm, moe, base / "moe-ct"),
        "moe-mo-w4a4": fp4cal.export(rm, moe, base / "moe-mo4", format="modelopt", w4a4=True),
    }


def _copy(ckpts, key, tmp_path):
    return shutil.copytree(ckpts[key], tmp_path / key)


@pytest.mark.parametrize("key", ["ct", "ct-w4a4", "moe-ct"])
def test_fp4cal_compressed_tensors_exports_pass_serving_engines(ckpts, key):
    findings = check_checkpoint(ckpts[key])
    for engine in ("vllm", "sglang"):
        assert errors(findings, engine) == [], [f.line() for f in errors(findings, engine)]
    assert [f.rule for f in errors(findings, "tensorrt-llm")] == ["trtllm-format"]


@pytest.mark.parametrize("key", ["mo", "mo-w4a4", "moe-mo-w4a4"])
def test_fp4cal_modelopt_exports_pass_serving_engines(ckpts, key):
    findings = check_checkpoint(ckpts[key])
    for engine in ("vllm", "sglang", "tensorrt-llm"):
        assert errors(findings, engine) == [], [f.line() for f in errors(findings, engine)]
    assert [f.rule for f in errors(findings, "transformers")] == ["transformers-modelopt"]
    warned = [f.rule for f in findings if f.severity == "warning" and "tensorrt-llm" in f.engines]
    assert warned == ([] if "w4a4" in key else ["mo-tensors"])  # weight-only: TensorRT-LLM wants input_scale


@pytest.mark.parametrize("w4a4", [False, True])
def test_compressed_tensors_own_checkpoint_passes(tmp_path, w4a4):
    pytest.importorskip("compressed_tensors")
    from test_export_compressed_tensors import _reference_checkpoint

    _, result = case("llama")
    ref = _reference_checkpoint(tmp_path, "llama", result, w4a4)
    findings = check_checkpoint(ref)
    for engine in ("vllm", "sglang", "transformers"):
        assert errors(findings, engine) == [], [f.line() for f in errors(findings, engine)]
    # and a hand-broken copy of it: one module's global scale zeroed
    _rewrite(ref, lambda t: t.__setitem__(f"{ATTN}.o_proj.weight_global_scale", torch.zeros(1)))
    bad = errors(check_checkpoint(ref, "vllm"), "vllm")
    assert [(f.where, f.rule) for f in bad] == [(f"{ATTN}.o_proj.weight_global_scale", "values")]


def test_transformers_verdict_on_moe(ckpts, tmp_path):
    """check --engine transformers says plainly that this transformers version mis-loads MoE experts."""
    bad = errors(check_checkpoint(ckpts["moe-ct"], "transformers"), "transformers")
    assert [f.rule for f in bad] == ["transformers-moe"]
    assert f"transformers {transformers.__version__}" in bad[0].message and "#48371" in bad[0].message
    d = _copy(ckpts, "moe-ct", tmp_path)
    _edit_json(d / "config.json", lambda c: c.update(dtype="float32"))
    assert {f.rule for f in errors(check_checkpoint(d, "transformers"), "transformers")} == {
        "transformers-moe", "transformers-dtype"}
    assert errors(check_checkpoint(ckpts["ct"], "transformers"), "transformers") == []  # dense: exact


def test_float32_moe_export_loads_with_default_arguments(tmp_path):
    """The issue's case: a float32-calibrated Qwen3-MoE exported to compressed-tensors failed in
    from_pretrained(ckpt) with a dtype mismatch. Export now writes dtype bfloat16 for MoE: it loads and runs."""
    pytest.importorskip("compressed_tensors")  # transformers needs it to read a compressed-tensors checkpoint
    model = tiny_qwen3_moe(dtype=torch.float32)
    out = fp4cal.export(build_result(model), model, tmp_path / "moe32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = loaded(torch.zeros(1, 4, dtype=torch.long)).logits
    assert torch.isfinite(logits).all()
    with safe_open(str(out / SAFE_WEIGHTS_NAME), framework="pt") as f:  # the stored tensors keep their dtype
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_broken_copies_are_reported_per_tensor(ckpts, tmp_path):
    # fused q/k/v with different global scales (ModelOpt)
    d = _copy(ckpts, "mo-w4a4", tmp_path)
    _rewrite(d, lambda t: t.__setitem__(f"{ATTN}.k_proj.weight_scale_2", t[f"{ATTN}.k_proj.weight_scale_2"] * 2))
    got = [(f.where, f.engines) for f in errors(check_checkpoint(d), "vllm")]
    assert got == [(f"{ATTN}.qkv", ("vllm", "sglang", "tensorrt-llm"))]
    # different input scales inside a fused group: only TensorRT-LLM asserts
    d = _copy(ckpts, "mo-w4a4", tmp_path / "in")
    _rewrite(d, lambda t: t.__setitem__(f"{ATTN}.v_proj.input_scale", t[f"{ATTN}.v_proj.input_scale"] * 2))
    assert [f.where for f in errors(check_checkpoint(d), "tensorrt-llm")] == [f"{ATTN}.qkv"]
    assert errors(check_checkpoint(d), "vllm") == []
    # NaN block scale, infinite global scale
    d = _copy(ckpts, "ct", tmp_path / "nan")

    def nan(t):
        v = t[f"{ATTN}.q_proj.weight_scale"].view(torch.uint8).clone()
        v[1, 0] = 0xFF
        t[f"{ATTN}.q_proj.weight_scale"] = v.view(torch.float8_e4m3fn)
        t[f"{ATTN}.o_proj.weight_global_scale"] = torch.tensor([float("inf")])

    _rewrite(d, nan)
    assert sorted(f.where for f in errors(check_checkpoint(d), "sglang")) == [
        f"{ATTN}.o_proj.weight_global_scale", f"{ATTN}.q_proj.weight_scale"]
    # a quantized module's tensor missing, and lm_head no longer in the ignore list
    d = _copy(ckpts, "ct", tmp_path / "missing")
    _rewrite(d, lambda t: t.pop(f"{ATTN}.o_proj.weight_scale"))
    _edit_json(d / "config.json", lambda c: c["quantization_config"].update(ignore=[]))
    bad = {(f.where, f.rule) for f in errors(check_checkpoint(d, "vllm"), "vllm")}
    assert bad == {(f"{ATTN}.o_proj.weight_scale", "ct-tensors"), ("lm_head", "ignore-dense")}


def test_w4a4_expert_without_input_scale(ckpts, tmp_path):
    d = _copy(ckpts, "moe-mo-w4a4", tmp_path)
    name = "model.layers.0.mlp.experts.3.down_proj.input_scale"
    _rewrite(d, lambda t: t.pop(name))
    bad = errors(check_checkpoint(d), "vllm")
    assert [f.where for f in bad] == [name] and "no calibration token" in bad[0].message
    d = _copy(ckpts, "moe-mo-w4a4", tmp_path / "zero")
    _rewrite(d, lambda t: t.__setitem__(name, torch.tensor(0.0)))
    assert [f.where for f in errors(check_checkpoint(d), "tensorrt-llm")] == [name]


def test_config_violations(ckpts, tmp_path):
    d = _copy(ckpts, "mo", tmp_path)
    _edit_json(d / mo_format.HF_QUANT_CONFIG, lambda c: c["quantization"].pop("kv_cache_quant_algo"))
    bad = errors(check_checkpoint(d), "vllm")
    assert len(bad) == 1 and "kv_cache_quant_algo" in bad[0].message
    # weight-only tensors under a W4A4 quant_algo: every module lacks input_scale
    d = _copy(ckpts, "mo", tmp_path / "algo")
    for f in ("config.json", mo_format.HF_QUANT_CONFIG):
        _edit_json(d / f, lambda c: (c.get("quantization") or c["quantization_config"]).update(quant_algo="NVFP4"))
    bad = errors(check_checkpoint(d, "tensorrt-llm"), "tensorrt-llm")
    assert len(bad) == 7 and all(f.where.endswith(".input_scale") for f in bad)
    d = _copy(ckpts, "ct", tmp_path / "scheme")
    _edit_json(d / "config.json",
               lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="group"))
    bad = errors(check_checkpoint(d, "vllm"), "vllm")
    assert [f.where for f in bad] == ["config_groups.group_0.weights.strategy"]
    # a quantized router (vLLM MoE models build it unquantized)
    d = _copy(ckpts, "moe-ct", tmp_path / "router")

    def router(t):
        gate = "model.layers.0.mlp.gate"
        t.pop(f"{gate}.weight")
        for s in ("weight_packed", "weight_scale", "weight_global_scale"):
            src = t[f"model.layers.0.mlp.experts.0.up_proj.{s}"]
            t[f"{gate}.{s}"] = src.clone() if s == "weight_global_scale" else src[:4].clone()

    _rewrite(d, router)
    _edit_json(d / "config.json", lambda c: c["quantization_config"].update(ignore=["lm_head"]))
    assert [f.rule for f in errors(check_checkpoint(d, "sglang"), "sglang")] == ["router"]


def test_cli_exit_status(ckpts, tmp_path, capsys):
    assert main(["check", str(ckpts["ct"]), "--engine", "vllm", "--engine", "sglang"]) == 0
    out = capsys.readouterr().out
    assert "vllm          ok" in out and "sglang        ok" in out
    assert main(["check", str(ckpts["ct"]), "--engine", "tensorrt-llm"]) == 1
    assert "tensorrt-llm  FAIL  1 error(s)" in capsys.readouterr().out
    assert main(["check", str(ckpts["moe-ct"]), "--engine", "transformers", "--quiet"]) == 1
    assert capsys.readouterr().out.strip().startswith("transformers  FAIL")
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", str(ckpts["ct"]), "--engine", "tgi"])
    assert set(ENGINES) == {"vllm", "sglang", "tensorrt-llm", "transformers"}


def test_export_refuses_a_checkpoint_its_engines_would_reject(tmp_path, monkeypatch):
    """The end-of-export check: a W4A4 ModelOpt export missing one input_scale is not written."""
    model, result = case("llama")
    real = mo_format.module_tensors

    def drop(qm, w4a4):
        out, meta = real(qm, w4a4)
        if qm.module.endswith("o_proj"):
            out.pop(f"{qm.module}.input_scale")
        return out, meta

    monkeypatch.setattr(mo_format, "module_tensors", drop)
    with pytest.raises(CheckpointError, match=r"would not load in vllm, sglang, tensorrt-llm; nothing was written"
                       r"[\s\S]*o_proj.input_scale"):
        fp4cal.export(result, model, tmp_path / "bad", format="modelopt", w4a4=True)
    assert list(tmp_path.iterdir()) == []
