"""fp4cal.search.launch: the key of a launch is at least as fine as Triton's own specialization (CPU: Triton's
binder for a CUDA target, built without a GPU); the fast path's launches on the GPU are in test_kernels_gpu.py."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fp4cal.search import launch  # noqa: E402


def _one_arg(a):  # the kernel's Python source (the binder reads its signature only)
    pass


def _with_constexprs(x_ptr, n, A: tl.constexpr, B: tl.constexpr = 7):  # a signature: never compiled here
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


def test_fast_launch_caches_by_key_and_passes_every_parameter(monkeypatch):
    """The cache logic without a GPU: Triton's JIT run and driver replaced by recorders. The first launch of a key
    goes through the JIT (which compiles); the next ones call the compiled kernel's launcher with the JIT's
    argument convention (grid, stream, function, metadata, no hooks, then every parameter in order, constexprs and
    defaults included); a new int value, tensor alignment or constexpr is a new key."""
    import sys

    from triton.runtime.jit import JITFunction

    driver_mod = sys.modules["triton.runtime.driver"]  # (triton.runtime.driver the name is the driver object)

    fn = JITFunction(_with_constexprs)
    direct, jit = [], []

    class Compiled:
        function = "function handle"
        packed_metadata = "metadata"

        def run(self, *a):
            direct.append(a)

    def jit_run(*args, grid, warmup, **options):
        jit.append((grid, args, options))
        return Compiled()

    class Active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 1234

    monkeypatch.setattr(fn, "run", jit_run)
    monkeypatch.setattr(driver_mod, "driver", type("Driver", (), {"active": Active()})())
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_CACHE", {})
    monkeypatch.setattr(launch, "_stream_of", None)
    x = torch.zeros(8)
    launch.fast_launch(fn, (3,), (x, 16), A=5, num_warps=1)  # JIT: fills the cache
    launch.fast_launch(fn, (3, 2), (x, 16), A=5, num_warps=1)  # direct
    assert len(jit) == 1 and len(direct) == 1
    a = direct[0]
    assert a[:9] == (3, 2, 1, 1234, "function handle", "metadata", None, None, None)
    assert a[9] is x and a[10:] == (16, 5, 7)  # x_ptr, n, A, B's default
    for args, options in (((x, 17), {"A": 5}), ((x[1:], 16), {"A": 5}), ((x, 16), {"A": 6})):
        launch.fast_launch(fn, (3,), args, num_warps=1, **options)
    assert len(jit) == 4 and len(direct) == 1  # three new keys: an int's value, an alignment, a constexpr
