"""fp4cal.search.warmup: compiles in a background thread and reports its seconds (CPU: interpreter or nothing)."""

from __future__ import annotations

import pytest
import torch

from fp4cal import search


def test_warmup_runs_and_returns_seconds(monkeypatch):
    # On CPU without the interpreter there is nothing to compile: the handle returns at once. (The environment
    # variable is not unset here: Triton reads it once, and the other tests need the interpreter.)
    import fp4cal.search.precompile as wu

    monkeypatch.setattr(wu.os, "environ", {})
    assert not wu._needs_kernels(torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setattr(wu, "_needs_kernels", lambda device: False)
    h = search.warmup(["mse", "local_hessian"], torch.float32, "cpu")
    secs = h.wait()
    assert h.done() and 0.0 <= secs < 1.0


def _triton_version() -> tuple[int, int]:
    try:
        import triton
    except ImportError:
        return (0, 0)
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


# Triton 3.6's interpreter (the GPU image's) fails on this test with NumPy 2 ("only 0-dimensional arrays can be
# converted to Python scalars", inside the interpreter, with or without the tests' interpreter hook); 3.8 and 3.9
# run it.
@pytest.mark.skipif(_triton_version() < (3, 8), reason="Triton < 3.8's interpreter fails on NumPy 2")
def test_warmup_in_the_interpreter_runs_the_kernels(monkeypatch):
    """Under TRITON_INTERPRET=1 (CI) the warm-up runs the real entry point on tiny inputs and returns."""
    import fp4cal.search.precompile as wu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(wu, "_WARM_SHAPES", ((4, 32),))  # tiny: the interpreter runs every program in Python
    calls = []
    from fp4cal.search import kernels

    real = kernels.search_triton

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(kernels, "search_triton", counting)
    secs = search.warmup(["mse"], torch.bfloat16, "cpu").wait()
    assert secs >= 0.0 and calls.count("mse") == 8  # fused and two-launch, with losses or not, 2-D and stack


def test_warmup_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        search.warmup(["gptq"])
    with pytest.raises(TypeError, match="dtype must be"):
        search.warmup(["mse"], torch.int8)


def test_warmup_errors_reach_wait(monkeypatch):
    import fp4cal.search.precompile as wu

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def boom(device):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(wu, "_needs_kernels", boom)
    with pytest.raises(RuntimeError, match="compile failed"):
        search.warmup(["mse"], torch.float32, "cpu").wait()
