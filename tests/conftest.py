"""Shared test fixtures: an independent NVFP4 oracle written from the format's definition.

Nothing here imports fp4cal. Every fp32 operation is one numpy float32 operation (IEEE, correctly rounded,
no reciprocal tricks); FP8-E4M3 and E2M1 rounding are written out in float64 from their definitions:

    s_g = fp32(g / 2688);  v = e4m3(fp32(fp32(a / 6) / s_g));  s_b = fp32(v * s_g)
    x = fp32(|w| / s_b);   deq = sign(w) * fp32(E2M1(x) * s_b)

Tests reach it through the ``nv`` fixture (a module-like namespace), so that it is defined once.
"""

from __future__ import annotations

import os
import types
from fractions import Fraction

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_patches_language_once_per_launch() -> None:
    """Make Triton's interpreter skip a repeated no-op: it patches triton.language for every call of a @triton.jit
    helper inside a kernel (triton.runtime.interpreter._patch_lang: inspect.getmembers over the language modules,
    about 2 ms a call), although the running launch has already patched those same modules and restores them when
    it ends. The search kernels call helpers tens of thousands of times per test (near ties: 22,000 calls, 51 s of
    131 s under cProfile). Here a helper's call skips the patch when every language module its globals hold was
    patched by the launch running in this thread; the launch's own patch and restore are untouched, so the kernels
    run exactly as before. Left as it is if the interpreter's internals differ from this."""
    import threading

    try:
        from triton.runtime import interpreter as ti

        launch_call, patch_lang, scope_type, lang = ti.GridExecutor.__call__, ti._patch_lang, ti._LangPatchScope, ti.tl
    except (ImportError, AttributeError):
        return
    local = threading.local()  # per thread, a stack of the running launches' patched modules (ids)

    def modules(fn):
        return {id(v) for v in fn.__globals__.values() if v is lang or v is lang.core}

    def launch(self, *args, **kwargs):
        stack = local.__dict__.setdefault("stack", [])
        stack.append(set())
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            stack.pop()

    def patch_once(fn):
        stack = local.__dict__.get("stack")
        mods = modules(fn)
        if stack and stack[-1] and mods <= stack[-1]:
            return scope_type()  # already patched by this launch, which restores them itself
        scope = patch_lang(fn)
        if stack:
            stack[-1].update(mods)
        return scope

    ti.GridExecutor.__call__ = launch
    ti._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_patches_language_once_per_launch()


def pytest_xdist_auto_num_workers(config) -> int | None:
    """Workers for pyproject's ``-n auto``: one per core without CUDA (the interpreter's kernel tests are CPU-bound;
    xdist's own count), one with CUDA, where the GPU tests would otherwise share one device's memory.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return 1 if torch.cuda.is_available() else None

F32 = np.float32
E2M1_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8_MAX = 448.0


def e2m1_index(x: np.ndarray) -> np.ndarray:
    """Magnitude code 0..7 of x >= 0, straight from the rounding table (ties to the even code)."""
    x = np.asarray(x, dtype=np.float64)
    conds = [x <= 0.25, x < 0.75, x <= 1.25, x < 1.75, x <= 2.5, x < 3.5, x <= 5.0]
    return np.select(conds, [0, 1, 2, 3, 4, 5, 6], default=7).astype(np.int64)


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """E2M1 value (float64) of magnitudes x >= 0."""
    return E2M1_LEVELS[e2m1_index(x)]


def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Nearest FP8-E4M3 value (ties to even) of x >= 0, saturating at 448; float64.

    Normals in [2^e, 2^(e+1)) have 3 mantissa bits: step 2^(e-3). Below 2^-6 (subnormals) the step is 2^-9.
    x / step is exact (a power-of-two scaling) and np.round rounds half to even.
    """
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # x = m * 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
    with np.errstate(over="ignore", invalid="ignore"):
        step = np.where(x < 2.0**-6, 2.0**-9, np.ldexp(1.0, e - 4))
        q = np.round(x / step) * step
    return np.where(x >= FP8_MAX, FP8_MAX, np.minimum(q, FP8_MAX))


def e4m3_positive_values() -> np.ndarray:
    """The 126 finite positive E4M3 values, bytes 0x01..0x7E, decoded from the bit layout; float64 ascending."""
    out = []
    for byte in range(1, 0x7F):
        exp, man = byte >> 3, byte & 7
        out.append(man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return np.array(out)


def to_np32(t: torch.Tensor) -> np.ndarray:
    """Any float tensor -> float32 numpy (exact for fp16/bf16/fp32 values)."""
    return t.detach().cpu().to(torch.float64).numpy().astype(F32)


def fp32_round_fraction(q: Fraction) -> float:
    """Correctly rounded (ties to even) fp32 value of an exact rational q >= 0, as a Python float."""
    if q == 0:
        return 0.0
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    e = max(e, -126)  # subnormals share the exponent of the smallest normal
    scaled = q / Fraction(2) ** (e - 23)  # 24-bit significand
    m = round(scaled)  # Fraction.__round__ rounds half to even
    return float(Fraction(m) * Fraction(2) ** (e - 23))


def global_amax(w32: np.ndarray) -> np.ndarray:
    """max |w| per tensor: [] for [cout, cin], [E] for [E, cout, cin]; float32."""
    return np.abs(w32).max(axis=(-2, -1)).astype(F32)


def scales(w32: np.ndarray, block_amax: np.ndarray | None = None, g: np.ndarray | float | None = None):
    """(s_g [...], v [..., cout, nb] float32, s_b [..., cout, nb] float32) by the two-level rule."""
    lead = w32.shape[:-2]
    blocks = w32.reshape(*w32.shape[:-1], -1, 16)
    a = np.abs(blocks).max(-1) if block_amax is None else np.asarray(block_amax, dtype=F32)
    g = global_amax(w32) if g is None else np.broadcast_to(np.asarray(g, dtype=F32), lead)
    s_g = (np.asarray(g, dtype=F32) / F32(2688.0)).astype(F32)
    sg = s_g.reshape(*s_g.shape, 1, 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = (a.astype(F32) / F32(6.0)) / sg
    ratio = np.where(sg > 0, ratio, F32(0.0))
    v = e4m3_round(ratio.astype(np.float64)).astype(F32)
    s_b = (v * sg).astype(F32)
    return s_g, v, s_b


def quant_blocks(w32: np.ndarray, s_b: np.ndarray):
    """Round float32 weights [..., cout, cin] with block scales s_b [..., cout, nb].

    Returns (codes uint8 [..., cout, cin] with the sign in bit 3, dequantized float32 [..., cout, cin]).
    """
    blocks = w32.reshape(*w32.shape[:-1], -1, 16)
    s = s_b[..., None].astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = (np.abs(blocks) / s).astype(F32)
    x = np.where(s > 0, x, F32(0.0))
    idx = e2m1_index(x)
    mag = (E2M1_LEVELS[idx].astype(F32) * s).astype(F32)
    neg = blocks < 0
    deq = np.where(neg, -mag, mag).astype(F32)
    codes = (idx | (neg.astype(np.int64) << 3)).astype(np.uint8)
    return codes.reshape(w32.shape), deq.reshape(w32.shape)


def fake_quantize(w: torch.Tensor, block_amax=None, g=None) -> np.ndarray:
    """Oracle fake-quantization of a torch weight; float32 numpy of w's shape."""
    w32 = to_np32(w)
    ba = None if block_amax is None else to_np32(block_amax) if isinstance(block_amax, torch.Tensor) else block_amax
    gg = None if g is None else to_np32(g) if isinstance(g, torch.Tensor) else g
    _, _, s_b = scales(w32, ba, gg)
    return quant_blocks(w32, s_b)[1]


def candidate_amax(g: float) -> np.ndarray:
    """The 126 candidate block amaxes fp32(g * v / 448) from exact rationals; float64 holding fp32 values."""
    gf = Fraction(float(F32(g)))
    return np.array([fp32_round_fraction(gf * Fraction(float(v)) / 448) for v in e4m3_positive_values()])


def block_losses(w32: np.ndarray, g: float, hessian: np.ndarray | None = None) -> np.ndarray:
    """Loss of every candidate for every block of a 2-D weight: float64 [126, cout, nb].

    dw = fp32(w - deq) (the error a serving engine sees, formed in fp32), loss = sum dw^2 or dw^T H_j dw
    with hessian [nb, 16, 16] in float64.
    """
    s_g = F32(F32(g) / F32(2688.0))
    cout, cin = w32.shape
    out = np.empty((126, cout, cin // 16))
    for c, v in enumerate(e4m3_positive_values()):
        s_c = np.full((cout, cin // 16), F32(F32(v) * s_g), dtype=F32)
        _, deq = quant_blocks(w32, s_c)
        dw = (w32 - deq).astype(F32).astype(np.float64).reshape(cout, -1, 16)
        if hessian is None:
            out[c] = (dw * dw).sum(-1)
        else:
            out[c] = np.einsum("rnk,nkl,rnl->rn", dw, np.asarray(hessian, dtype=np.float64), dw)
    return out


def brute_force_search(w: torch.Tensor, method: str, g=None, hessian: torch.Tensor | None = None) -> np.ndarray:
    """Oracle scale search over all 126 candidates (first minimum wins = smaller candidate); float32 amax.

    w: [cout, cin] or [E, cout, cin]; g: scalar / [E] (default max |w| per tensor); hessian [nb,16,16] or
    [E, nb, 16, 16] (local_hessian only).
    """
    w32 = to_np32(w)
    if method == "max":
        return np.abs(w32.reshape(*w32.shape[:-1], -1, 16)).max(-1)
    gg = global_amax(w32) if g is None else np.broadcast_to(to_np32(torch.as_tensor(g)), w32.shape[:-2])
    h = None if (hessian is None or method != "local_hessian") else hessian.detach().cpu().double().numpy()

    def search_2d(w2: np.ndarray, g2: float, h2: np.ndarray | None) -> np.ndarray:
        losses = block_losses(w2, g2, h2)
        return candidate_amax(g2)[losses.argmin(0)].astype(F32)  # argmin: the first (smallest) minimum

    if w32.ndim == 2:
        return search_2d(w32, float(gg), h)
    hs = [None if h is None else (h[e] if h.ndim == 4 else h) for e in range(w32.shape[0])]
    return np.stack([search_2d(w32[e], float(gg[e]), hs[e]) for e in range(w32.shape[0])])


def weighted_loss(w: torch.Tensor, block_amax: torch.Tensor, g, hessian: torch.Tensor | None) -> np.ndarray:
    """Per-block loss (float64 [..., cout, nb]) of quantizing w with the given block amaxes, by the oracle."""
    w32 = to_np32(w)
    deq = fake_quantize(w, block_amax, g)
    dw = (w32 - deq).astype(F32).astype(np.float64)
    dw = dw.reshape(*dw.shape[:-1], -1, 16)
    if hessian is None:
        return (dw * dw).sum(-1)
    h = hessian.detach().cpu().double().numpy()
    if dw.ndim == 4 and h.ndim == 3:
        h = np.broadcast_to(h, (dw.shape[0], *h.shape))
    if dw.ndim == 4:
        return np.einsum("ernk,enkl,ernl->ern", dw, h, dw)
    return np.einsum("rnk,nkl,rnl->rn", dw, h, dw)


ORACLE = types.SimpleNamespace(
    F32=F32,
    E2M1_LEVELS=E2M1_LEVELS,
    e2m1_index=e2m1_index,
    e2m1_round=e2m1_round,
    e4m3_round=e4m3_round,
    e4m3_positive_values=e4m3_positive_values,
    to_np32=to_np32,
    fp32_round_fraction=fp32_round_fraction,
    global_amax=global_amax,
    scales=scales,
    quant_blocks=quant_blocks,
    fake_quantize=fake_quantize,
    candidate_amax=candidate_amax,
    block_losses=block_losses,
    brute_force_search=brute_force_search,
    weighted_loss=weighted_loss,
)


@pytest.fixture(scope="session")
def nv() -> types.SimpleNamespace:
    """The independent NVFP4 oracle (see the module docstring)."""
    return ORACLE


@pytest.fixture(scope="module")
def device_for_kernels():
    """Where the Triton kernels run: 'cpu' under the interpreter (TRITON_INTERPRET=1, set above without a GPU),
    'cuda' on a GPU; the test is skipped otherwise."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-tensor tests on one torch thread, then restore the thread count.

    These tests issue thousands of small ops; on a shared CPU, each multi-threaded op can stall on a barrier
    while a worker thread is descheduled (seen: 1.8 s single-threaded vs 22 s with 2 threads under load).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, as each torchrun child runs (OMP_NUM_THREADS=1): a one-process run that
    must equal a multi-process one bit for bit makes the same CPU matmul calls only on the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
