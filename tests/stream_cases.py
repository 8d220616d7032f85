"""Tiny transformers checkpoints for the streaming tests: each saved with save_pretrained (as a user's
checkpoint directory is), built from configs offline."""

from __future__ import annotations

from pathlib import Path

import torch

V = 96  # vocabulary of every tiny model


def _common(**kw) -> dict:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=V, max_position_embeddings=64)
    base.update(kw)
    return base


def build(arch: str, seed: int = 0):
    """A randomly initialised tiny model of ``arch`` in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(**_common(intermediate_size=128, num_hidden_layers=3))
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**_common(intermediate_size=128))
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_common(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2))
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**_common(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2))
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
            topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, num_attention_heads=4, num_key_value_heads=4, vocab_size=V, max_position_embeddings=64,
        )
    elif arch == "gpt_oss":
        cfg = tf.GptOssConfig(**_common(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the init's 0.02 so that routers spread tokens and scales vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def save(arch: str, directory: Path, seed: int = 0, dtype: torch.dtype | None = None, shard: str | None = None):
    """Build ``arch`` and save it to ``directory`` (optionally in ``dtype``, sharded at ``shard``)."""
    model = build(arch, seed)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(directory, **kwargs)
    return directory


def batches(n: int = 2, b: int = 2, t: int = 8, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (b, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
