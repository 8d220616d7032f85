"""Streaming runs are committed layer by layer: SIGKILL and re-run resumes; bad input and faults."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import stream_cases as cases  # noqa: E402
from fp4cal.stream import quantize_checkpoint  # noqa: E402
from fp4cal.stream import staging as staging_mod  # noqa: E402
from fp4cal.stream.skeleton import find_layers  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
RUN = """
import sys
sys.path.insert(0, {tests!r})
import stream_cases as cases
from fp4cal.stream import quantize_checkpoint
quantize_checkpoint({src!r}, {out!r}, cases.batches(), method="max", device="cpu", max_shard_size="40KB"{extra})
"""


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def run_killed(src: Path, out: Path, fault: str, extra: str = "") -> int:
    code = RUN.format(tests=str(Path(__file__).parent), src=str(src), out=str(out), extra=extra)
    env = {**os.environ, "PYTHONPATH": SRC, staging_mod.FAULT_ENV: fault}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream") / "src"
    return cases.save("llama", d)  # 3 layers: units 0, 1, 2 and 3 (outside the layers)


def test_sigkill_then_rerun_resumes_and_ends_byte_identical(llama_src, tmp_path):
    ref = quantize_checkpoint(llama_src, tmp_path / "ref", cases.batches(), method="max", device="cpu",
                              max_shard_size="40KB")
    expected = files(ref.out_dir)
    assert len([n for n in expected if n.endswith(".safetensors")]) > 4  # units split into several shards
    # killed after layer 1's shards were written but before its commit; after layer 2 was committed; after the
    # unit outside the layers (nothing in it quantized: written first, before layer 0) was committed
    for fault, resumed in (("shard:1", 1), ("commit:2", 3), ("commit:3", 0)):
        out = tmp_path / f"out-{fault.replace(':', '-')}"
        assert run_killed(llama_src, out, fault) == -9
        assert not out.exists()  # the final directory appears only when complete
        assert staging_mod.staging_path(out).is_dir()
        rep = quantize_checkpoint(llama_src, out, cases.batches(), method="max", device="cpu",
                                  max_shard_size="40KB")
        assert rep.resumed_layers == resumed, fault
        assert files(out) == expected, fault
        assert not staging_mod.staging_path(out).exists()


def test_resumed_after_the_last_unit_keeps_the_results_of_weights_outside_the_layers(llama_src, tmp_path):
    """lm_head quantized (exclude=()): its result comes from the committed last unit, not a new capture."""
    kw = dict(method="max", device="cpu", max_shard_size="40KB", exclude=())
    ref = quantize_checkpoint(llama_src, tmp_path / "ref", cases.batches(), **kw)
    out = tmp_path / "out"
    assert run_killed(llama_src, out, "commit:3", ", exclude=()") == -9
    rep = quantize_checkpoint(llama_src, out, cases.batches(), **kw)
    assert rep.resumed_layers == 3 and files(out) == files(ref.out_dir)
    a, b = ref.result.weights["lm_head.weight"], rep.result.weights["lm_head.weight"]
    assert torch.equal(a.block_amax, b.block_amax) and torch.equal(a.input_amax, b.input_amax)


def test_partial_run_of_another_model_is_refused(llama_src, tmp_path):
    out = tmp_path / "out"
    assert run_killed(llama_src, out, "commit:0") == -9
    other = cases.save("qwen3", tmp_path / "other")
    with pytest.raises(FileExistsError) as e:
        quantize_checkpoint(other, out, cases.batches(), method="max", device="cpu")
    msg = str(e.value)
    assert str(staging_mod.staging_path(out)) in msg and str(llama_src) in msg and "model_dir" in msg
    rep = quantize_checkpoint(other, out, cases.batches(), method="max", device="cpu", resume=False)
    assert rep.resumed_layers == 0 and (out / "config.json").exists()


def test_full_disk_names_the_file_and_leaves_the_users_directory(llama_src, tmp_path, monkeypatch):
    # overwrite=True no longer lets a user's own directory be replaced at all (refused before any work, see
    # test_export_safety), so the user's file sits beside out_dir, which must not appear half-written
    out = tmp_path / "out"
    (tmp_path / "mine.txt").write_text("keep")

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x")  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging_mod, "save_file", full)
    with pytest.raises(OSError) as e:
        quantize_checkpoint(llama_src, out, cases.batches(), method="max", device="cpu", overwrite=True)
    assert "part-00001.safetensors" in str(e.value) and "No space left" in str(e.value)
    assert not out.exists() and (tmp_path / "mine.txt").read_text() == "keep"
    assert not list(staging_mod.staging_path(out).glob("ckpt/*.tmp"))


def test_bad_checkpoints_name_the_file(llama_src, tmp_path):
    import json
    import shutil

    sharded = cases.save("qwen3", tmp_path / "sharded", shard="60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (sharded / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        quantize_checkpoint(sharded, None, cases.batches(), method="max", device="cpu")

    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        quantize_checkpoint(bad, tmp_path / "o", cases.batches(), method="max", device="cpu")
    assert "model.safetensors" in str(e.value) and "(96, 64)" in str(e.value) and "config.json" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_model_without_a_layer_list_is_named():
    with pytest.raises(ValueError, match="no decoder-layer list"):
        find_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
