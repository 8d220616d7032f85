"""Streaming on CUDA: activations kept in pinned CPU memory (copied on side streams, overlapping compute) give the
same results, bit for bit, as activations kept on the device and as whole-model calibrate() on the device."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import stream_cases as cases  # noqa: E402
from fp4cal.calib.calibrate import calibrate  # noqa: E402
from fp4cal.export import export  # noqa: E402
from fp4cal.stream import quantize_checkpoint  # noqa: E402
from test_stream_engine import same_checkpoint, same_weights  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("propagation", ["float", "quantized"])
def test_pinned_activations_equal_device_activations(tmp_path, arch, propagation):
    src = cases.save(arch, tmp_path / "src", dtype=torch.bfloat16)
    b = cases.batches(n=4, b=2, t=32)
    runs = {}
    for name, budget in (("device", "1GB"), ("pinned", 0)):
        rep = quantize_checkpoint(src, tmp_path / name, b, method="local_hessian", device="cuda",
                                  activation_budget=budget, propagation=propagation, min_expert_tokens=2)
        assert rep.activations_on_device == (name == "device")
        assert rep.peak_gpu_by_phase and rep.peak_gpu_bytes == max(rep.peak_gpu_by_phase.values())
        runs[name] = rep
    # the losses are summed by atomic adds across programs on the GPU: equal to rounding, not bit for bit
    assert same_weights(runs["device"].result, runs["pinned"].result, loss_rtol=1e-9) == []
    same_checkpoint(tmp_path / "device", tmp_path / "pinned")
    if propagation == "float":  # the one-forward calibrate on the device sees the same statistics
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = calibrate(model, b, "local_hessian", min_expert_tokens=2)
            export(ref, model, tmp_path / "whole")
        assert same_weights(ref, runs["pinned"].result, loss_rtol=1e-9) == []
        same_checkpoint(tmp_path / "whole", tmp_path / "pinned")


def test_results_leave_the_device_layer_by_layer(tmp_path):
    """A streamed run's results are moved to the CPU after each layer (kept on the device they grew to ~2 GiB
    of the GPU peak on a 36-layer Qwen3-8B-shaped model)."""
    src = cases.save("llama", tmp_path / "src", dtype=torch.bfloat16)
    rep = quantize_checkpoint(src, None, cases.batches(n=2, b=2, t=32), method="local_hessian", device="cuda")
    assert rep.result.weights
    assert all(w.block_amax.device.type == "cpu" for w in rep.result.weights.values())
