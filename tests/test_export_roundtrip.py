"""quantize -> export -> load -> dequantize is exact, for both formats, dense and MoE."""

from __future__ import annotations

import json

import pytest
import torch

import fp4cal
from fp4cal.export.io import SAFE_WEIGHTS_INDEX_NAME, checkpoint_files, read_tensors
from test_export_helpers import bits, build_result, case, fake_quantized_state, tiny_llama

FORMATS = ["compressed-tensors", "modelopt"]
GLOBAL = {"compressed-tensors": "weight_global_scale", "modelopt": "weight_scale_2"}


def _dense_checkpoint_names(model, tmp_path):
    """The tensor names transformers' own save_pretrained gives this (unquantized) model."""
    model.save_pretrained(tmp_path / "dense")
    tensors, _ = read_tensors(tmp_path / "dense")
    return tensors


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_round_trip_exact(tmp_path, fmt, kind):
    model, result = case(kind)
    out = fp4cal.export(result, model, tmp_path / "ckpt", format=fmt, w4a4=True)
    fq = fake_quantized_state(model, result)

    # As a model: every quantized parameter (stacked experts reassembled) is bit-identical to
    # fp4cal's fake quantization, every other parameter to the original.
    loaded = fp4cal.load(out, dtype=torch.float32)
    for name, p in model.named_parameters():
        want = fq[name] if name in fq else p.detach().float()
        assert torch.equal(bits(loaded.get_parameter(name).detach()), bits(want)), name

    # As a dict: the names transformers' save_pretrained uses, dequantized weights in float32.
    state = fp4cal.load(out, as_model=False)
    dense = _dense_checkpoint_names(model, tmp_path)
    assert set(state) == set(dense)
    quantized = {n for n in state if n.rsplit(".", 1)[0] in _modules(out, fmt)}
    assert len(quantized) == (7 if kind == "llama" else 4 + 3 * 4)
    for name, t in state.items():
        if name not in quantized:
            assert torch.equal(bits(t), bits(dense[name])), name  # copied unchanged (bf16)
        else:
            assert t.dtype == torch.float32
    if kind == "moe":  # per-expert tensors are the rows of the stacks: gate then up
        gate_up = fq["model.layers.0.mlp.experts.gate_up_proj"]
        i = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            assert torch.equal(state[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :i])
            assert torch.equal(state[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], gate_up[e, i:])


def _modules(out, fmt):
    tensors, _ = read_tensors(out)
    return {k.rsplit(".", 1)[0] for k in tensors if k.endswith(GLOBAL[fmt])}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_groups_share_one_global_scale(tmp_path, fmt):
    for kind in ("llama", "moe"):
        model, result = case(kind)
        out = fp4cal.export(result, model, tmp_path / kind, format=fmt, w4a4=True)
        tensors, _ = read_tensors(out)
        attn = "model.layers.0.self_attn"
        g = GLOBAL[fmt]
        q, k, v, o = (tensors[f"{attn}.{p}_proj.{g}"] for p in "qkvo")
        assert torch.equal(q, k) and torch.equal(q, v) and not torch.equal(q, o)
        if kind == "llama":
            gate, up = tensors[f"model.layers.0.mlp.gate_proj.{g}"], tensors[f"model.layers.0.mlp.up_proj.{g}"]
            assert torch.equal(gate, up)
        else:  # one stacked gate_up_proj: per expert, gate and up share that expert's global scale
            scales = []
            for e in range(4):
                gate = tensors[f"model.layers.0.mlp.experts.{e}.gate_proj.{g}"]
                assert torch.equal(gate, tensors[f"model.layers.0.mlp.experts.{e}.up_proj.{g}"])
                scales.append(float(gate))
            assert len(set(scales)) == 4  # and each expert has its own
        inputs = "input_global_scale" if fmt == "compressed-tensors" else "input_scale"
        assert torch.equal(tensors[f"{attn}.q_proj.{inputs}"], tensors[f"{attn}.v_proj.{inputs}"])


def test_sharding_index_and_extra_files(tmp_path):
    model, result = case("llama")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    (src / "special_tokens_map.json").write_text("{}")
    (src / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 7}')
    (src / "model.safetensors").write_text("not copied")
    (src / "README.md").write_text("not copied")
    model.config._name_or_path = str(src)  # found without source_dir, as after from_pretrained(local_dir)
    out = fp4cal.export(result, model, tmp_path / "ckpt", max_shard_size="20KB")
    files = checkpoint_files(out)
    assert len(files) > 2
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    tensors, _ = read_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    for f in files:
        assert f.stat().st_size < 20_000 + 4096 or len(read_tensors_of(f)) == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_text() == (src / name).read_text()
    assert not (out / "README.md").exists()
    assert torch.equal(fp4cal.load(out, as_model=False)["lm_head.weight"], model.lm_head.weight)


def read_tensors_of(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_llama(tie=True)
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    result = build_result(model, names=names, method="max")
    out = fp4cal.export(result, model, tmp_path / "tied", format="modelopt")
    tensors, _ = read_tensors(out)
    assert "lm_head.weight" not in tensors  # saved once, as transformers does
    loaded = fp4cal.load(out, dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())
    fq = fake_quantized_state(model, result)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, fq["model.layers.0.mlp.down_proj.weight"])
