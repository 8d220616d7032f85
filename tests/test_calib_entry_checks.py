"""Issue 16: calibrate()/export() refuse None / str / int / bare tensors / meta tensors with an error naming the
argument before any forward, and an overflowing input Hessian names its layer."""

from __future__ import annotations

import pytest
import torch

import fp4cal


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))


@pytest.mark.parametrize("bad", [None, "abc", 5, b"xy", torch.randn(2, 16)])
def test_batches_must_be_an_iterable_of_batches(bad):
    with pytest.raises(TypeError, match=rf"batches must be an iterable of model inputs.*got {type(bad).__name__}"):
        fp4cal.calibrate(_model(), bad)


@pytest.mark.parametrize("bad", [None, "model", 5])
def test_model_must_be_a_module(bad):
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {type(bad).__name__}"):
        fp4cal.calibrate(bad, [torch.randn(2, 16)])


def test_meta_model_and_meta_batches_fail_before_any_forward():
    calls = []
    meta = torch.nn.Linear(16, 16, device="meta")
    meta.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"model tensor 'weight' is on the meta device \(shape \(16, 16\)"):
        fp4cal.calibrate(meta, [torch.randn(2, 16)])
    model = _model()
    model.register_forward_hook(lambda *a: calls.append(1))
    batches = [torch.randn(2, 16), {"input": torch.randn(2, 16, device="meta")}]
    with pytest.raises(ValueError, match=r"batches\[1\] holds a tensor on the meta device"):
        fp4cal.calibrate(model, batches)
    assert calls == []


def test_calibrate_has_no_dtype_argument():
    """The issue's calibrate(..., dtype=torch.int8): there is no such argument, so nothing is computed."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtype'"):
        fp4cal.calibrate(_model(), [torch.randn(2, 16)], dtype=torch.int8)


def test_overflowing_activations_name_the_layer():
    x = torch.randn(4, 16) * 1e19  # finite in float32, but x^T x is not
    with pytest.raises(ValueError, match=r"input Hessian of layer 0 .* not finite in float32.*2\.\d+e\+19"):
        fp4cal.calibrate(_model(), [x])
    with pytest.raises(ValueError, match=r"activations at the input of 0 contain non-finite values"):
        fp4cal.calibrate(_model(), [torch.full((4, 16), float("inf"))])
    fp4cal.calibrate(_model(), [torch.randn(4, 16)])  # control: ordinary activations calibrate


@pytest.mark.parametrize("bad", [None, "result", 5])
def test_export_result_must_be_a_calibration_result(tmp_path, bad):
    with pytest.raises(TypeError, match=f"result must be a fp4cal CalibrationResult .*got {type(bad).__name__}"):
        fp4cal.export(bad, _model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
