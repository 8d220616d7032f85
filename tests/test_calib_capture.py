"""Activation capture on a tiny Llama-style model: coverage, exact Hessians, sharing, one forward per batch."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp4cal.calib.capture import ActivationCapture, capture_statistics  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402


def tiny_llama(seed: int = 0):
    return _tiny_llama(seed)
def batches(n=3, b=2, t=12, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def block_hessian(x: torch.Tensor) -> torch.Tensor:
    """X^T X / n per 16-channel block, float64 [cin/16, 16, 16], from recorded inputs (..., cin)."""
    xb = x.reshape(-1, x.shape[-1] // 16, 16).double()
    return torch.einsum("tnk,tnl->nkl", xb, xb) / xb.shape[0]


def test_targets_cover_every_linear_but_lm_head():
    model = tiny_llama()
    targets, skipped = find_targets(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {t.module_name for t in targets} == linears - {"lm_head"}
    assert set(skipped) == {"lm_head.weight"} and "excluded" in skipped["lm_head.weight"]
    groups = {t.module_name: t.fused_group for t in targets}
    assert groups["model.layers.0.self_attn.q_proj"] == groups["model.layers.0.self_attn.v_proj"] is not None
    assert groups["model.layers.0.mlp.gate_proj"] == groups["model.layers.0.mlp.up_proj"] is not None
    assert groups["model.layers.0.self_attn.o_proj"] is None and groups["model.layers.0.mlp.down_proj"] is None
    assert groups["model.layers.0.self_attn.q_proj"] != groups["model.layers.1.self_attn.q_proj"]


def test_hooks_see_every_target_and_hessians_are_exact():
    model = tiny_llama()
    targets, _ = find_targets(model)
    data = batches()
    recorded: dict[str, list[torch.Tensor]] = {}
    watch = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    handles = []
    for name in watch:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, name=name: recorded.setdefault(name, []).append(args[0].detach().clone())))
    stats = capture_statistics(model, data, targets)
    for h in handles:
        h.remove()
    tokens = sum(b.numel() for b in data)
    assert stats.forward_calls == len(data)
    for t in targets:
        assert stats.inputs[t.module_name].tokens == tokens, t.module_name
    for name in watch:
        x = torch.cat([r.reshape(-1, r.shape[-1]) for r in recorded[name]])
        acc = stats.inputs[name].hessian
        assert acc.n == tokens
        torch.testing.assert_close(acc.normalized().double(), block_hessian(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.inputs[name].amax, x.abs().amax())


def test_qkv_and_gate_up_share_one_hessian_object():
    model = tiny_llama()
    targets, _ = find_targets(model)
    stats = capture_statistics(model, batches(n=2), targets)
    for layer in range(2):
        p = f"model.layers.{layer}."
        q, k, v, o = (stats.inputs[p + f"self_attn.{s}_proj"] for s in "qkvo")
        assert q is k is v and q.hessian is k.hessian is v.hessian
        assert sorted(q.members) == sorted(p + f"self_attn.{s}_proj" for s in "qkv")
        assert o is not q
        g, u, d = (stats.inputs[p + f"mlp.{s}_proj"] for s in ("gate", "up", "down"))
        assert g is u and g.hessian is u.hessian and d is not g
    # distinct inputs: 4 per layer (qkv, o, gate/up, down)
    assert len({id(s) for s in stats.inputs.values()}) == 8


def test_capture_does_not_change_outputs_and_removes_hooks():
    model = tiny_llama()
    targets, _ = find_targets(model)
    x = batches(n=1)[0]
    with torch.no_grad():
        ref = model(x).logits
        with ActivationCapture(model, targets, hessians=True):
            out = model(x).logits
        after = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("hessians", [True, False])
def test_non_finite_activations_name_the_layer(hessians):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    targets, _ = find_targets(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*non-finite"):
        capture_statistics(model, batches(n=1), targets, hessians=hessians)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_different_tensors_for_shared_members_are_detected():
    """If two linears share an input in one forward and get different tensors in the next, sharing would
    double-count: capture must refuse rather than return a wrong Hessian."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x.clone())

    model = Pair()
    targets, _ = find_targets(model)
    with pytest.raises(RuntimeError, match="shares its input"):
        capture_statistics(model, [torch.randn(4, 16), torch.randn(4, 16)], targets)
