"""ModelOpt-format export: layout, config files, and compressed-tensors' ModelOpt NVFP4 converter."""

from __future__ import annotations

import json

import pytest
import torch

import fp4cal
from fp4cal.export.io import read_tensors
from fp4cal.numerics import GLOBAL_DIVISOR, quantize
from test_export_helpers import bits, case


@pytest.mark.parametrize("w4a4", [False, True])
def test_modelopt_layout(tmp_path, w4a4):
    model, result = case("llama")
    out = fp4cal.export(result, model, tmp_path / "mo", format="modelopt", w4a4=w4a4)
    tensors, _ = read_tensors(out)
    algo = "NVFP4" if w4a4 else "W4A16_NVFP4"
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "fp4cal"
    assert hf_quant["quantization"] == {
        "quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"],
    }
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["ignore"], qc["group_size"]) == ("modelopt", algo, ["lm_head"], 16)
    assert ("input_activations" in qc["config_groups"]["group_0"]) == w4a4
    for name, wr in result.weights.items():
        m = wr.module_name
        w = model.get_parameter(name).detach()
        q = quantize(w, wr.block_amax, wr.global_amax)
        assert tensors[f"{m}.weight"].dtype == torch.uint8 and torch.equal(tensors[f"{m}.weight"], q.codes)
        assert torch.equal(tensors[f"{m}.weight_scale"].view(torch.uint8), wr.block_scale.view(torch.uint8))
        s2 = tensors[f"{m}.weight_scale_2"]
        assert s2.dtype == torch.float32 and s2.shape == () and torch.equal(bits(s2), bits(q.global_scale))
        assert torch.equal(bits(s2), bits(wr.global_amax.float() / GLOBAL_DIVISOR))
        if w4a4:
            assert tensors[f"{m}.input_scale"].shape == ()
            assert torch.equal(bits(tensors[f"{m}.input_scale"]), bits(wr.input_amax.float() / GLOBAL_DIVISOR))
        else:
            assert f"{m}.input_scale" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # excluded modules stay as they were


@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_compressed_tensors_converter_turns_our_modelopt_export_into_our_ct_export(tmp_path, kind):
    """compressed-tensors 0.20's ModelOptNvfp4Converter (1 / weight_scale_2 -> weight_global_scale,
    1 / input_scale -> input_global_scale, weight -> weight_packed) applied to our ModelOpt checkpoint
    gives our compressed-tensors checkpoint: same names, same bits (scalars stay 0-dim there, [1] in ours)."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import ModelOptNvfp4Converter
    from compressed_tensors.quantization import QuantizationConfig

    model, result = case(kind)
    ours_ct = fp4cal.export(result, model, tmp_path / "ct", w4a4=True, max_shard_size="40KB")
    ours_mo = fp4cal.export(result, model, tmp_path / "mo", format="modelopt", w4a4=True, max_shard_size="40KB")
    ignore = json.loads((ours_mo / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    converter = ModelOptNvfp4Converter(ignore=ignore, targets=["Linear"])
    convert_checkpoint(ours_mo, tmp_path / "converted", converter, device="cpu", max_workers=1)

    a, _ = read_tensors(ours_ct)
    b, _ = read_tensors(tmp_path / "converted")
    assert set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, name
        assert tuple(x.shape) == tuple(y.shape) or (x.shape == (1,) and y.shape == ()), name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8)), name

    ours_cfg = QuantizationConfig.model_validate(
        json.loads((ours_ct / "config.json").read_text())["quantization_config"]
    )
    conv_cfg = QuantizationConfig.model_validate(
        json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]
    )
    assert list(ours_cfg.config_groups.values()) == list(conv_cfg.config_groups.values())  # group names differ
    assert (ours_cfg.ignore, ours_cfg.format, ours_cfg.quantization_status) == (
        conv_cfg.ignore, conv_cfg.format, conv_cfg.quantization_status,
    )
