"""Launching the search kernels with little host time.

A JIT launch, ``kernel[grid](*args, **options)``, binds and specializes every argument, builds a cache key from
the specialization and the options, compares each global constant the kernel reads with its value at compile time
(a Python ``!=`` on tl.constexpr objects, ~1 us each) and builds launch metadata for hooks: binder 14.7 us, cache
key 2.4, globals check 12.4 for the sweep's 27 arguments on an H200 machine's host (bench/tools/launch_cost.py),
three launches per search call. On a small weight (k/v, 1024 x 4096) that host time, not the GPU's, set the call's
time (issue 13); with this path a local-Hessian call's host time went from ~250 to ~180 us (BENCHMARKS.md).

``fast_launch`` keeps, per kernel, the compiled kernel of each specialization it has launched, and launches it
through the compiled kernel's own launcher, as the JIT does after its checks. The key is finer than Triton's
specialization (per tensor argument its dtype and whether its address is a multiple of 16, per integer whether it
is 1, a multiple of 16, and its range): ``arg_key`` keeps each int's value and each tensor's dtype and address mod
16, so two calls with one key have one specialization (tests/test_launch.py checks this against Triton's binder).
The constexprs and options are part of the key as given. The JIT's global check is not repeated: this project
never rebinds a kernel's globals at run time.

Used only where the call convention was read in Triton's source (3.6 to 3.9: ``CompiledKernel.run(grid_x, grid_y,
grid_z, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *all_params)``) and run on a GPU
(3.6), on CUDA, without launch hooks installed (profilers: the JIT path calls them); anything else, and
``FP4CAL_FAST_LAUNCH=0``, takes the JIT path.
"""

from __future__ import annotations

import os

try:
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # the torch backend needs no Triton
    triton = knobs = JITFunction = None


def _version_ok() -> bool:
    if triton is None:
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 6) <= (major, minor) < (3, 10)


ENABLED = _version_ok() and os.environ.get("FP4CAL_FAST_LAUNCH", "1") != "0"


def arg_key(args: tuple) -> tuple:
    """What a launch is specialized on, per positional argument: an int's value (Triton specializes on whether it is
    1, its multiples of 16 and its range: all functions of the value; a search's ints are shapes and strides, so a
    run holds a few keys per kernel), a tensor's (dtype, address mod 16). Any other argument raises AttributeError
    (fast_launch then takes the JIT path). 7 us for the sweep's 27 arguments where Triton's binder takes 15 (H200
    host)."""
    return tuple([a if type(a) is int else (a.dtype, a.data_ptr() & 15) for a in args])


def _hooks_installed() -> bool:
    """Launch hooks set (a profiler): the JIT path calls them, this one would not."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _Entry:
    __slots__ = ("launcher", "function", "metadata", "tail")

    def __init__(self, kernel, tail: tuple):
        self.launcher = kernel.run
        self.function = kernel.function
        self.metadata = kernel.packed_metadata
        self.tail = tail


_CACHE: dict[int, dict] = {}  # id(kernel) -> {key: _Entry}; kernels are module globals, never freed
_stream_of = None


def fast_launch(fn, grid: tuple, args: tuple, **options) -> None:
    """fn[grid](*args, **options), the constexprs among options; see the module docstring. args: the kernel's
    positional parameters, in order; options: its constexpr parameters by name and the compile options
    (num_warps, enable_fp_fusion, maxnreg)."""
    global _stream_of
    if not ENABLED or not isinstance(fn, JITFunction) or _hooks_installed():
        fn[grid](*args, **options)
        return
    from triton.runtime.driver import driver

    device = driver.active.get_current_device()
    cache = _CACHE.setdefault(id(fn), {})
    try:
        key = (device, arg_key(args), tuple(options.items()))
    except AttributeError:  # an argument that is neither an int nor a tensor
        fn[grid](*args, **options)
        return
    entry = cache.get(key)
    if entry is None:
        kernel = fn[grid](*args, **options)  # compiles on first use; launches like any JIT call
        if kernel is not None and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            names = [p.name for p in fn.params[len(args):]]
            defaults = {p.name: p.default for p in fn.params[len(args):]}
            tail = tuple(options[n] if n in options else defaults[n] for n in names)
            cache[key] = _Entry(kernel, tail)
        return
    if _stream_of is None:
        _stream_of = driver.active.get_current_stream
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    entry.launcher(grid[0], g1, g2, _stream_of(device), entry.function, entry.metadata, None, None, None,
                   *args, *entry.tail)
