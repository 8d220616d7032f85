"""export.layout.checkpoint_pieces: which checkpoint tensors hold which rows of a (converted) parameter."""

import pytest
import torch

from fp4cal.export import layout

transformers = pytest.importorskip("transformers")


def tiny_qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, vocab_size=128, num_hidden_layers=1)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def check_gate_up(pieces) -> None:
    """gate_up_proj [4, 64, 64] = per expert e: gate rows e*64 + [0, 32), up rows e*64 + [32, 64)."""
    by_name = {p.name: p for p in pieces}
    assert len(by_name) == 8
    for e in range(4):
        gate = by_name[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]
        up = by_name[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]
        assert gate.shape == up.shape == (32, 64)
        assert torch.equal(gate.rows, torch.arange(e * 64, e * 64 + 32))
        assert torch.equal(up.rows, torch.arange(e * 64 + 32, e * 64 + 64))


def test_expert_stack_rows():
    model = tiny_qwen3_moe()
    check_gate_up(layout.checkpoint_pieces(model, "model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64)))


def test_pieces_squeezed_by_the_reverse_conversion(monkeypatch):
    """Some transformers releases (5.17) squeeze() each expert's piece: a size-1 trailing index dimension would
    vanish; the two-column index keeps the rows recoverable."""
    model = tiny_qwen3_moe()
    real = layout._revert

    def squeezing(model, state):
        return {k: (v[0] if isinstance(v, list) else v).squeeze() for k, v in real(model, state).items()}

    monkeypatch.setattr(layout, "_revert", squeezing)
    check_gate_up(layout.checkpoint_pieces(model, "model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64)))


def test_a_conversion_that_moves_the_last_dimension_is_refused(monkeypatch):
    model = tiny_qwen3_moe()
    monkeypatch.setattr(layout, "_revert", lambda model, state: {"x.weight": next(iter(state.values())).mT})
    with pytest.raises(ValueError, match="moves the input \\(last\\) dimension"):
        layout.checkpoint_pieces(model, "model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64))


@pytest.mark.parametrize("chunk_rows", [1, 100, 1 << 22])
def test_many_parameters_at_once_equal_one_at_a_time(monkeypatch, chunk_rows):
    """checkpoint_pieces_of reverts many parameters per call (their index values shifted apart): the same pieces,
    in the same order, as one call per parameter, whatever the chunking."""
    from fp4cal.export.exporter import model_tensors

    model = tiny_qwen3_moe()
    shapes = {n: tuple(t.shape) for n, t in model_tensors(model).items()}
    one = {n: layout._pieces_of_chunk(model, {n: s})[n] for n, s in shapes.items()}
    monkeypatch.setattr(layout, "_CHUNK_ROWS", chunk_rows)
    many = layout.checkpoint_pieces_of(model, shapes)
    assert list(many) == list(one)
    for n in shapes:
        assert [(p.name, p.shape, p.start) for p in many[n]] == [(p.name, p.shape, p.start) for p in one[n]], n
        assert all(torch.equal(a.rows, b.rows) for a, b in zip(many[n], one[n], strict=True)), n


def test_a_piece_mixing_two_parameters_is_refused(monkeypatch):
    model = tiny_qwen3_moe()
    monkeypatch.setattr(layout, "_revert", lambda model, state: {"x.weight": torch.cat(list(state.values()))})
    with pytest.raises(ValueError, match="rows of parameter 'a' and of another parameter"):
        layout.checkpoint_pieces_of(model, {"a": (4, 16), "b": (4, 16)})


def test_contiguous_pieces_know_their_start():
    assert layout.Piece("a", torch.arange(5, 9), (4, 16)).start == 5
    assert layout.Piece("b", torch.tensor([0, 2, 4]), (3, 16)).start is None
    assert layout.Piece("c", torch.tensor([3]), (1, 16)).start == 3


@pytest.mark.parametrize("shape, per_expert", [((48, 64), False), ((5, 12, 32), True), ((5, 12, 32), False)])
def test_quantize_in_chunks_is_quantize(monkeypatch, shape, per_expert):
    """Export quantizes big tensors some rows / experts at a time: the same bytes as one quantize call."""
    from fp4cal.export import exporter
    from fp4cal.numerics import quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.bfloat16)
    amax = w.float().abs().reshape(*shape[:-1], -1, 16).amax(-1) * 0.9
    glob = w.float().abs().amax(dim=(-2, -1)) if per_expert else w.float().abs().amax()
    monkeypatch.setattr(exporter, "QUANTIZE_CHUNK", 2 * shape[-1] * (shape[-2] if len(shape) == 3 else 1) + 1)
    a, b = exporter.quantize_in_chunks(w, amax, glob), quantize(w, amax, glob)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
    assert torch.equal(a.global_scale, b.global_scale)
