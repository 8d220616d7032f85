"""Bad input to every public function raises ValueError / TypeError naming the argument.

A second device on a CPU-only machine: the 'meta' device (tensors with shapes, no data). The checks compare
devices before they read values, so a meta tensor next to a CPU one must be refused by name.
"""

from __future__ import annotations

import pytest
import torch

from fp4cal import HessianAccumulator, NVFP4Tensor, dequantize, fake_quantize, quantize, scale_candidates, search_scales

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _w(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _meta_works() -> bool:
    try:
        torch.zeros(1, device="meta")
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return True


needs_meta = pytest.mark.skipif(not _meta_works(), reason="this torch build has no 'meta' device")


def _search_mse(w, **kw):
    return search_scales(w, "mse", **kw)


def _search_lh(w, **kw):
    nb = w.shape[-1] // 16 if isinstance(w, torch.Tensor) else 1
    return search_scales(w, "local_hessian", hessian=torch.eye(16).expand(nb, 16, 16), **kw)


W_FUNCS = {
    "fake_quantize": fake_quantize,
    "quantize": quantize,
    "search_max": lambda w, **kw: search_scales(w, "max", **kw),
    "search_mse": _search_mse,
    "search_lh": _search_lh,
}
BAD_WEIGHTS = {
    "nan": (lambda: _w(4, 32).index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan"))),
            ValueError, r"\bw\b.*non-finite"),
    "inf": (lambda: _w(4, 32).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
            ValueError, r"\bw\b.*non-finite"),
    "-inf": (lambda: _w(2, 4, 32).index_put_((torch.tensor([1]),), torch.tensor(float("-inf"))),
             ValueError, r"\bw\b.*non-finite"),
    "cin_not_16": (lambda: _w(4, 40), ValueError, r"\bw\b.*cin = 40.*16"),
    "cin_8": (lambda: _w(3, 2, 8), ValueError, r"\bw\b.*cin = 8"),
    "1d": (lambda: _w(32), ValueError, r"\bw\b.*shape \(32,\)"),
    "4d": (lambda: _w(2, 2, 2, 32), ValueError, r"\bw\b.*\[E, cout, cin\]"),
    "int32": (lambda: torch.ones(4, 32, dtype=torch.int32), TypeError, r"\bw\b.*int32"),
    "uint8": (lambda: torch.ones(4, 32, dtype=torch.uint8), TypeError, r"\bw\b.*uint8"),
    "float64": (lambda: _w(4, 32, dtype=torch.float64), TypeError, r"\bw\b.*float64"),
    "empty_rows": (lambda: torch.zeros(0, 32), ValueError, r"\bw\b.*empty"),
    "empty_cols": (lambda: torch.zeros(4, 0), ValueError, r"\bw\b.*empty"),
    "empty_experts": (lambda: torch.zeros(0, 4, 32), ValueError, r"\bw\b.*empty"),
    "list": (lambda: [[1.0] * 16], TypeError, r"\bw\b.*torch.Tensor.*list"),
}


@pytest.mark.parametrize("func", W_FUNCS)
@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_weights(func, case):
    make, exc, pattern = BAD_WEIGHTS[case]
    with pytest.raises(exc, match=pattern):
        W_FUNCS[func](make())


BAD_GLOBAL = {
    "nan": (float("nan"), ValueError, "global_amax.*non-finite"),
    "inf_tensor": (torch.tensor(float("inf")), ValueError, "global_amax.*non-finite"),
    "negative": (-1.0, ValueError, "global_amax.*>= 0"),
    "int_tensor": (torch.tensor(3), TypeError, "global_amax.*int64"),
    "wrong_shape": (torch.ones(3), ValueError, r"global_amax.*shape \(\).*\(3,\)"),
}


@pytest.mark.parametrize("func", W_FUNCS)
@pytest.mark.parametrize("case", BAD_GLOBAL)
def test_bad_global_amax(func, case):
    g, exc, pattern = BAD_GLOBAL[case]
    with pytest.raises(exc, match=pattern):
        W_FUNCS[func](_w(4, 32), global_amax=g)


@pytest.mark.parametrize("func", W_FUNCS)
def test_bad_global_amax_for_stacks(func):
    with pytest.raises(ValueError, match=r"global_amax.*\(3,\).*\(2,\)"):
        W_FUNCS[func](_w(3, 4, 32), global_amax=torch.ones(2))
    with pytest.raises(ValueError, match="global_amax.*non-finite"):
        W_FUNCS[func](_w(3, 4, 32), global_amax=torch.tensor([1.0, float("nan"), 1.0]))


@needs_meta
@pytest.mark.parametrize("func", W_FUNCS)
def test_global_amax_on_another_device(func):
    with pytest.raises(ValueError, match="global_amax is on meta but w is on cpu"):
        W_FUNCS[func](_w(4, 32), global_amax=torch.tensor(1.0, device="meta"))


BAD_BLOCK_AMAX = {
    "shape": (lambda: torch.ones(4, 3), ValueError, r"block_amax.*\(4, 2\).*\(4, 3\)"),
    "nan": (lambda: torch.tensor([[1.0, float("nan")]] * 4), ValueError, "block_amax.*non-finite"),
    "negative": (lambda: -torch.ones(4, 2), ValueError, "block_amax.*>= 0"),
    "int": (lambda: torch.ones(4, 2, dtype=torch.int64), TypeError, "block_amax.*int64"),
    "list": (lambda: [[1.0, 1.0]] * 4, TypeError, "block_amax.*list"),
}


@pytest.mark.parametrize("func", [fake_quantize, quantize])
@pytest.mark.parametrize("case", BAD_BLOCK_AMAX)
def test_bad_block_amax(func, case):
    make, exc, pattern = BAD_BLOCK_AMAX[case]
    with pytest.raises(exc, match=pattern):
        func(_w(4, 32), make())


@needs_meta
@pytest.mark.parametrize("func", [fake_quantize, quantize])
def test_block_amax_on_another_device(func):
    with pytest.raises(ValueError, match="block_amax is on meta but w is on cpu"):
        func(_w(4, 32), torch.ones(4, 2, device="meta"))


# ------------------------------------------------------------------------------------------------- search_scales

BAD_HESSIAN = {
    "missing": (lambda w: None, ValueError, "hessian is required"),
    "blocks": (lambda w: torch.eye(16).expand(3, 16, 16), ValueError, r"hessian.*\(2, 16, 16\).*cin = 32.*\(3, 16"),
    "size8": (lambda w: torch.ones(2, 8, 8), ValueError, r"hessian.*\(2, 16, 16\)"),
    "2d": (lambda w: torch.eye(32), ValueError, r"hessian.*\(2, 16, 16\)"),
    "nan": (lambda w: torch.eye(16).repeat(2, 1, 1).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))),
            ValueError, "hessian.*non-finite"),
    "inf": (lambda w: torch.full((2, 16, 16), float("inf")), ValueError, "hessian.*non-finite"),
    "int": (lambda w: torch.ones(2, 16, 16, dtype=torch.int32), TypeError, "hessian.*int32"),
    "empty": (lambda w: torch.zeros(0, 16, 16), ValueError, "hessian.*empty"),
    "numpy": (lambda w: torch.eye(16).repeat(2, 1, 1).numpy(), TypeError, "hessian.*ndarray"),
}


@pytest.mark.parametrize("case", BAD_HESSIAN)
def test_bad_hessian(case):
    make, exc, pattern = BAD_HESSIAN[case]
    w = _w(4, 32)
    with pytest.raises(exc, match=pattern):
        search_scales(w, "local_hessian", hessian=make(w))


def test_bad_hessian_for_stacks():
    w = _w(3, 4, 32)
    with pytest.raises(ValueError, match=r"hessian.*\(3, 2, 16, 16\).*\(2, 2, 16, 16\)"):
        search_scales(w, "local_hessian", hessian=torch.eye(16).expand(2, 2, 16, 16))
    with pytest.raises(ValueError, match=r"hessian.*\(3, 2, 16, 16\).*\(3, 1, 16, 16\)"):
        search_scales(w, "local_hessian", hessian=torch.eye(16).expand(3, 1, 16, 16))


@needs_meta
def test_hessian_on_another_device():
    with pytest.raises(ValueError, match="hessian is on meta but w is on cpu"):
        search_scales(_w(4, 32), "local_hessian", hessian=torch.zeros(2, 16, 16, device="meta"))


def test_bad_method_and_backend():
    with pytest.raises(ValueError, match="method must be one of.*'gptq'"):
        search_scales(_w(4, 32), "gptq")
    for method in ("max", "mse"):
        with pytest.raises(ValueError, match="backend must be.*'cuda'"):
            search_scales(_w(4, 32), method, backend="cuda")


# ---------------------------------------------------------------------------------------------- scale_candidates


@pytest.mark.parametrize(
    "g,exc,pattern",
    [
        (float("nan"), ValueError, "global_amax.*finite"),
        (float("inf"), ValueError, "global_amax.*finite"),
        (-2.0, ValueError, "global_amax.*>= 0"),
        (torch.tensor([1.0, float("nan")]), ValueError, "global_amax.*finite"),
        (torch.tensor(4), TypeError, "global_amax.*int64"),
        (torch.tensor(True), TypeError, "global_amax.*bool"),
    ],
)
def test_bad_scale_candidates(g, exc, pattern):
    with pytest.raises(exc, match=pattern):
        scale_candidates(g)


# ---------------------------------------------------------------------------------------------------- dequantize


def _q():
    return quantize(_w(4, 32))


def _replace(q, **kw):
    return NVFP4Tensor(**{"codes": q.codes, "block_scale": q.block_scale, "global_scale": q.global_scale,
                          "dtype": q.dtype, **kw})


BAD_Q = {
    "not_q": (lambda q: q.codes, TypeError, "q must be an NVFP4Tensor.*Tensor"),
    "codes_dtype": (lambda q: _replace(q, codes=q.codes.to(torch.int32)), TypeError, "q.codes.*uint8.*int32"),
    "scale_dtype": (lambda q: _replace(q, block_scale=q.block_scale.float()), TypeError,
                    "q.block_scale.*float8_e4m3fn.*float32"),
    "global_dtype": (lambda q: _replace(q, global_scale=torch.tensor(1)), TypeError, "q.global_scale.*int64"),
    "codes_1d": (lambda q: _replace(q, codes=q.codes[0]), ValueError, r"q.codes.*\(16,\)"),
    "codes_empty": (lambda q: _replace(q, codes=q.codes[:0]), ValueError, r"q.codes.*\(0, 16\)"),
    "scale_shape": (lambda q: _replace(q, block_scale=q.block_scale[:, :1]), ValueError,
                    r"q.block_scale.*\(4, 1\).*\(4, 2\)"),
    "global_shape": (lambda q: _replace(q, global_scale=torch.ones(3)), ValueError, r"q.global_scale.*\(\).*\(3,\)"),
    "global_nan": (lambda q: _replace(q, global_scale=torch.tensor(float("nan"))), ValueError,
                   "q.global_scale.*non-finite"),
    "global_negative": (lambda q: _replace(q, global_scale=torch.tensor(-1.0)), ValueError, "q.global_scale.*>= 0"),
    "scale_nan": (lambda q: _replace(q, block_scale=torch.full((4, 2), 0x7F, dtype=torch.uint8).view(
        torch.float8_e4m3fn)), ValueError, "q.block_scale.*non-finite"),
    "scale_negative": (lambda q: _replace(q, block_scale=(-q.block_scale.float()).to(torch.float8_e4m3fn)),
                       ValueError, "q.block_scale.*>= 0"),
}


@pytest.mark.parametrize("case", BAD_Q)
def test_bad_dequantize_input(case):
    make, exc, pattern = BAD_Q[case]
    q = _q()
    assert float(q.block_scale.float().max()) > 0  # the "negative" case really is negative
    with pytest.raises(exc, match=pattern):
        dequantize(make(q))


@needs_meta
def test_dequantize_parts_on_different_devices():
    q = _q()
    with pytest.raises(ValueError, match="q.global_scale is on meta but q.codes is on cpu"):
        dequantize(_replace(q, global_scale=q.global_scale.to("meta")))
    with pytest.raises(ValueError, match="q.block_scale is on meta but q.codes is on cpu"):
        dequantize(_replace(q, block_scale=q.block_scale.to("meta")))


# -------------------------------------------------------------------------------------------- HessianAccumulator


@pytest.mark.parametrize("cin", [0, -16, 20, 8, 32.0, True])
def test_accumulator_bad_cin(cin):
    with pytest.raises(ValueError, match="cin of mlp.up .*multiple of 16"):
        HessianAccumulator(cin, name="mlp.up")


BAD_ACTS = {
    "int": (lambda: torch.ones(4, 32, dtype=torch.int64), TypeError, "activations of mlp.up.*int64"),
    "list": (lambda: [[0.0] * 32], TypeError, "activations of mlp.up.*list"),
    "last_dim": (lambda: torch.ones(4, 48), ValueError, r"activations of mlp.up.*cin = 32.*\(4, 48\)"),
    "scalar": (lambda: torch.tensor(1.0), ValueError, r"activations of mlp.up.*cin = 32.*\(\)"),
    "nan": (lambda: torch.zeros(2, 3, 32).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), ValueError,
            "activations of mlp.up.*non-finite"),
    "inf": (lambda: torch.full((1, 32), float("inf"), dtype=torch.bfloat16), ValueError,
            "activations of mlp.up.*non-finite"),
}


@pytest.mark.parametrize("case", BAD_ACTS)
def test_accumulator_bad_activations(case):
    make, exc, pattern = BAD_ACTS[case]
    acc = HessianAccumulator(32, name="mlp.up")
    with pytest.raises(exc, match=pattern):
        acc.add(make())
    assert acc.n == 0 and torch.equal(acc.sum, torch.zeros(2, 16, 16))  # a refused batch leaves no trace


@needs_meta
def test_accumulator_device_mismatch():
    acc = HessianAccumulator(32, device="meta", name="mlp.up")
    with pytest.raises(ValueError, match="activations of mlp.up are on cpu, the accumulator is on meta"):
        acc.add(torch.ones(2, 32))


def test_accumulator_merge_and_normalize_errors():
    acc = HessianAccumulator(32, name="mlp.up")
    with pytest.raises(ValueError, match=r"merge.*\(1, 16, 16\).*\(2, 16, 16\)"):
        acc.merge(HessianAccumulator(16))
    with pytest.raises(TypeError, match="merge.*mlp.up.*Tensor"):
        acc.merge(torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="no tokens were accumulated for mlp.up"):
        acc.normalized()
