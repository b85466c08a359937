"""Random tiny dense transformers models (Llama, Mistral, Qwen3) saved to disk, for the upcycling tests."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def make_dense(kind: str, path: Path, seed: int = 0, **kw):
    """Save a random transformers dense model of `kind` (llama, mistral, qwen3) to `path`; returns it in eval
    mode. Norms (and biases) are perturbed so that a swapped or dropped one would show."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    args = dict(SHAPE, **({"head_dim": 8} if kind == "qwen3" else {}))
    args.update(kw)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
