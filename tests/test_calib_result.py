"""WeightResult's own (de)serialisation: to_dict / from_dict, plain and with FP8 tensors as bytes."""

import pickle

import pytest
import torch

from fp4cal.calib.result import FP8_TAG, WeightResult


def result() -> WeightResult:
    amax = torch.rand(4, 2) + 0.1
    return WeightResult(name="m.weight", module_name="m", kind="linear", shape=(4, 32), method="mse",
                        global_amax=torch.tensor(1.5), block_amax=amax,
                        block_scale=(amax * 100).to(torch.float8_e4m3fn), tokens=7, expert_fallback={3: "few"})


@pytest.mark.parametrize("fp8_as_bytes", [False, True])
def test_round_trip(fp8_as_bytes):
    wr = result()
    d = wr.to_dict(fp8_as_bytes=fp8_as_bytes)
    if fp8_as_bytes:  # what an object collective pickles: no fp8 storage left in it
        assert d["block_scale"][0] == FP8_TAG and d["block_scale"][1].dtype == torch.uint8
        d = pickle.loads(pickle.dumps(d))
    back = WeightResult.from_dict(d)
    assert back.block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(back.block_scale.view(torch.uint8), wr.block_scale.view(torch.uint8))
    assert torch.equal(back.block_amax, wr.block_amax) and back.shape == wr.shape
    assert back.expert_fallback == {3: "few"} and back.tokens == 7


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="unknown field"):
        WeightResult.from_dict({**result().to_dict(), "colour": 1})
