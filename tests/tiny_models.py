"""Tiny randomly initialised transformers models shared by the tests (built from configs, offline)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, intermediate: int = 128, dtype: torch.dtype = torch.float32,
               tie: bool = False):
    """A Llama-style causal LM: hidden 64, 4 heads (2 kv heads, head_dim 16), vocab 96, in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
