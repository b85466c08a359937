"""Random tiny transformers Mixtral models saved to disk, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {
    # name: (experts, top_k, heads, kv_heads, tied)
    "e4-top2-gqa": (4, 2, 4, 2, False),
    "e8-top2-mha": (8, 2, 4, 4, False),
    "e4-top1-gqa-tied": (4, 1, 4, 1, True),
    "e8-top1-mha-tied": (8, 1, 4, 4, True),
}


def hf_config(experts=4, top_k=2, heads=4, kv_heads=2, tied=False, **kw):
    from transformers import MixtralConfig

    args = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                num_experts_per_tok=top_k, max_position_embeddings=128, tie_word_embeddings=tied,
                router_aux_loss_coef=0.02, output_router_logits=True, pad_token_id=0)
    args.update(kw)
    return MixtralConfig(**args)


def make_hf_model(path: Path, seed: int = 0, **kw):
    """Save a random transformers Mixtral to `path` and return it in eval mode."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_config(**kw)).eval()
    # transformers' init leaves the norms at 1: perturb them so that a swapped norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
