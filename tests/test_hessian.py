"""HessianAccumulator against per-block X^T X / n formed in float64 from the raw activations."""

from __future__ import annotations

import pytest
import torch

from fp4cal import HessianAccumulator, search_scales

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _reference(chunks: list[torch.Tensor], cin: int) -> torch.Tensor:
    """float64 [cin/16, 16, 16]: sum over every token of x_j x_j^T per 16-channel block, divided by the count."""
    x = torch.cat([c.double().reshape(-1, cin) for c in chunks])  # the raw values, exactly (any float dtype)
    xb = x.reshape(x.shape[0], cin // 16, 16).transpose(0, 1)  # [nb, T, 16]
    return xb.transpose(1, 2) @ xb / x.shape[0]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 accumulation of a few hundred products: relative error ~1e-6 of the block's scale."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().amax(dim=(-2, -1), keepdim=True)
    err = ((got.double() - want).abs() / scale).max().item()
    assert err < 2e-6, f"max relative error {err}"


def _acts(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cin = shape[-1]
    # uneven channel scales and an offset: a realistic, badly conditioned Hessian
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(cin, generator=g)) + 0.3
    return x.to(dtype)


def test_several_adds_2d_and_3d_inputs():
    cin = 48
    chunks = [_acts((7, cin), 1), _acts((2, 5, cin), 2), _acts((3, 2, 4, cin), 3), _acts((1, cin), 4)]
    acc = HessianAccumulator(cin)
    for c in chunks:
        acc.add(c)
    assert acc.n == 7 + 10 + 24 + 1
    assert acc.sum.shape == (3, 16, 16) and acc.sum.dtype == torch.float32
    _close(acc.normalized(), _reference(chunks, cin))
    _close(acc.sum / acc.n, _reference(chunks, cin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_and_float64_inputs(dtype):
    cin = 32
    chunks = [_acts((4, 6, cin), 5, dtype), _acts((9, cin), 6, dtype)]
    acc = HessianAccumulator(cin)
    for c in chunks:
        acc.add(c)
    assert acc.n == 33
    _close(acc.normalized(), _reference(chunks, cin))  # reference from the bf16/fp16 values as given


def test_merge_equals_one_accumulator():
    cin = 32
    a, b, both = HessianAccumulator(cin), HessianAccumulator(cin), HessianAccumulator(cin)
    xa, xb = _acts((11, cin), 7), _acts((3, 4, cin), 8)
    a.add(xa)
    b.add(xb)
    both.add(xa)
    both.add(xb)
    a.merge(b)
    assert a.n == both.n == 23
    _close(a.normalized(), _reference([xa, xb], cin))
    assert torch.allclose(a.sum, both.sum, rtol=1e-6, atol=0)


def test_zero_tokens():
    acc = HessianAccumulator(16, name="layer0.q_proj")
    acc.add(torch.zeros(0, 16))
    acc.add(torch.zeros(2, 0, 16))
    assert acc.n == 0 and torch.equal(acc.sum, torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="no tokens.*layer0.q_proj"):
        acc.normalized()
    x = _acts((5, 16), 9)
    acc.add(x)
    _close(acc.normalized(), _reference([x], 16))


def test_blocks_are_independent():
    """Block j only sees channels 16j..16j+15: changing block 1's channels leaves block 0's Hessian alone."""
    x = _acts((20, 32), 10)
    y = x.clone()
    y[:, 16:] *= -7.0
    a, b = HessianAccumulator(32), HessianAccumulator(32)
    a.add(x)
    b.add(y)
    assert torch.equal(a.sum[0], b.sum[0])
    assert not torch.allclose(a.sum[1], b.sum[1])


def test_normalized_feeds_the_search():
    x = _acts((64, 32), 11)
    acc = HessianAccumulator(32)
    acc.add(x)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(12))
    amax = search_scales(w, "local_hessian", hessian=acc.normalized())
    assert amax.shape == (8, 2) and torch.isfinite(amax).all()
