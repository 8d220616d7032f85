"""The Triton column-loop kernel of fp4cal.gptq against the torch path and the float64 reference (interpreter on
the CPU; the larger case on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fp4cal.gptq import GPTQConfig, gptq_reference, gptq_round  # noqa: E402
from test_gptq import correlated  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest set TRITON_INTERPRET=1


def to_cpu(out):
    """A GPTQOutput with its tensors on the CPU (the reference runs there)."""
    return type(out)(**{f: (v.cpu() if isinstance(v, torch.Tensor) else v) for f, v in vars(out).items()})


@pytest.mark.parametrize(("scales", "cin"), [("mse", 144), ("local_hessian_dynamic", 144)])
def test_kernel_equals_torch_path_and_reference(scales, cin):
    """144 columns: a full 128-column block and a partial one (padding); dynamic: scales searched inside the
    kernel, group by group, in both blocks (the second reads the weight's group factors from group 8 on). On
    CUDA when there is one, else on the CPU under Triton's interpreter. Codes and values equal the torch fp32
    path's on the same device; decisions equal the float64 reference's except ties (counted)."""
    w, h = correlated(8, cin, seed=12)
    w, h = w.to(DEVICE), h.to(DEVICE)
    cfg = GPTQConfig(scales=scales)
    backend = "reference" if DEVICE == "cpu" else None
    k = gptq_round(w, h, cfg=cfg, backend=backend, kernel=True)
    t = gptq_round(w, h, cfg=cfg, backend=backend, kernel=False)
    assert torch.equal(k.codes, t.codes) and torch.equal(k.weight, t.weight)
    assert torch.equal(k.block_amax, t.block_amax)
    _, par = gptq_reference(w.cpu(), h.cpu(), cfg=cfg, follow=to_cpu(k))
    print(f"kernel {scales} cin {cin} on {DEVICE}: {par}")
    assert par.code_mismatches == 0 and par.scale_mismatches == 0, par


def test_kernel_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    """Triton kernels cannot read CPU tensors unless the interpreter is on: kernel=True says so, naming the
    device and both ways out, before touching Triton."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, h = correlated(8, 32)
    with pytest.raises(ValueError, match=r"CUDA tensors \(w is on cpu\).*kernel=False.*TRITON_INTERPRET=1"):
        gptq_round(w, h, kernel=True)
    assert gptq_round(w, h, kernel=None).codes.shape == (8, 32)  # the default picks the torch path on the CPU


def test_kernel_refuses_other_block_sizes():
    w, h = correlated(8, 32)
    with pytest.raises(ValueError, match="128-column"):
        gptq_round(w, h, cfg=GPTQConfig(block_size=64), kernel=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scales", ["local_hessian", "local_hessian_dynamic"])
def test_kernel_on_gpu_matches_reference(scales):
    w, h = correlated(256, 512, tokens=2048, seed=13)
    cfg = GPTQConfig(scales=scales)
    k = gptq_round(w.cuda(), h.cuda(), cfg=cfg)
    _, par = gptq_reference(w, h, cfg=cfg, follow=to_cpu(k))
    print(f"gpu kernel {scales}: {par}")
    assert par.code_mismatches + par.scale_mismatches <= 1e-3 * w.numel(), par


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scales", ["local_hessian", "local_hessian_dynamic"])
def test_host_syncs_do_not_grow_with_columns(scales):
    """Host waits happen per weight (validation, factorization), never per block or group: the count that
    torch's sync debug mode reports is the same for 2 and 8 lazy blocks (16 and 64 groups)."""
    import warnings

    cfg = GPTQConfig(scales=scales)
    counts = []
    for cin in (256, 1024):
        w, h = correlated(64, cin, tokens=2048, seed=14)
        w, h = w.cuda(), h.cuda()
        gptq_round(w, h, cfg=cfg)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                gptq_round(w, h, cfg=cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(r.message) for r in rec))
    print(f"host syncs per gptq_round ({scales}), 256 / 1024 columns: {counts}")
    assert counts[0] > 0, "the sync detector saw nothing (validation syncs at least once)"
    assert counts[0] == counts[1], counts
