"""fp4cal.search.launch: the key of a launch is at least as fine as Triton's own specialization (CPU: Triton's
binder for a CUDA target, built without a GPU); the fast path's launches on the GPU are in test_kernels_gpu.py."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from fp4cal.search import launch  # noqa: E402


def _one_arg(a):  # the kernel's Python source (the binder reads its signature only)
    pass


def _binder():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:  # Triton internals moved: the fast path is then off (launch.ENABLED's version range)
        pytest.skip(f"Triton's binder is not where 3.6-3.9 keep it: {e}")
    fn = JITFunction(_one_arg)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return create_function_from_signature(fn.signature, fn.params, backend)


def _values():
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, -1, -16, -17,
            -(2**31), -(2**31) - 16, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16]
    buf32 = torch.zeros(64, dtype=torch.float32)
    buf16 = torch.zeros(64, dtype=torch.bfloat16)
    tensors = [buf32[i:] for i in range(8)] + [buf16[i:] for i in range(16)] + [buf32.view(torch.int32)[i:]
                                                                                for i in range(4)]
    return ints + tensors


def test_arg_key_is_finer_than_triton_specialization():
    binder = _binder()
    groups: dict = {}
    for v in _values():
        groups.setdefault(launch.arg_key((v,)), []).append(v)
    checked = 0
    for key, vals in groups.items():
        specs = [repr(binder(v)[1]) for v in vals]
        for (a, sa), (b, sb) in itertools.combinations(zip(vals, specs, strict=True), 2):
            assert sa == sb, f"arg_key {key} groups {a!r} and {b!r}, which Triton specializes as {sa} and {sb}"
            checked += 1
    assert checked > 0  # tensors of one dtype and alignment share a key
    for other in (0.5, True, None):  # not keyed: fast_launch takes the JIT path for them
        with pytest.raises(AttributeError):
            launch.arg_key((other,))


def test_fast_launch_falls_back_without_jit_function():
    calls = []

    class Fake:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    launch.fast_launch(Fake(), (3,), (1, 2), X=4)
    assert calls == [((3,), (1, 2), {"X": 4})]
