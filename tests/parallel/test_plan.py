"""`moecpt plan`: the activation estimate against the tensors autograd actually saves, the sharded state
against the Mixtral-8x7B arithmetic, and the command's output. (The per-rank parameter, gradient and AdamW
bytes are checked exactly against real sharded models in test_expert_parallel.py.)"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from moecpt.cli import main
from moecpt.model import MixtralForCausalLM, build_model
from moecpt.model.config import MixtralConfig
from moecpt.model.families import preset_config
from moecpt.model.layers import rope_cos_sin
from moecpt.parallel.plan import (
    Layout,
    activation_bytes_per_token_layer,
    parameter_shapes,
    parse_memory,
    plan_memory,
)

from .conftest import REPO


def saved_bytes_per_token(c, dtype: torch.dtype, layer_index: int = 0, batch: int = 2, seq: int = 64) -> float:
    """Bytes of the distinct tensors autograd saves in one decoder layer's forward, per token (weights and
    the layer input excluded)."""
    torch.manual_seed(0)
    model = build_model(c, "cpu").to(dtype)
    layer = model.layers[layer_index]
    x = torch.randn(batch, seq, c.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(seq).expand(batch, seq), c.attn_head_dim, c.rope_theta)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, None, None)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in skip) / (batch * seq)


SMALL = dict(vocab_size=512, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
SHAPES = {  # none of these is one the coefficients were counted on
    "mixtral": ("tiny", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=3,
                             num_local_experts=6, num_experts_per_tok=2, num_hidden_layers=1), 0),
    "mixtral wide q": ("tiny", dict(hidden_size=128, intermediate_size=96, num_attention_heads=8, head_dim=24,
                                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3,
                                    num_hidden_layers=1), 0),
    "qwen3 moe + qk-norm": ("qwen3-moe-tiny", dict(SMALL, intermediate_size=200, moe_intermediate_size=120,
                                                   head_dim=24, num_experts=8, num_experts_per_tok=3,
                                                   num_hidden_layers=2, mlp_only_layers=(0,)), 1),
    "qwen3 dense": ("qwen3-moe-tiny", dict(SMALL, intermediate_size=200, moe_intermediate_size=120, head_dim=24,
                                           num_experts=8, num_experts_per_tok=3, num_hidden_layers=2,
                                           mlp_only_layers=(0,)), 0),
    "qwen2 shared expert": ("qwen2-moe-tiny", dict(SMALL, intermediate_size=200, moe_intermediate_size=120,
                                                   shared_expert_intermediate_size=176, num_experts=6,
                                                   num_experts_per_tok=2, num_hidden_layers=1, mlp_only_layers=()), 0),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_saved_tensors(shape, dtype):
    preset, fields, layer = SHAPES[shape]
    c = preset_config(preset, **fields)
    measured = saved_bytes_per_token(c, dtype, layer)
    estimate = activation_bytes_per_token_layer(c, 4 if dtype == torch.float32 else 2)[layer]
    assert estimate == pytest.approx(measured, rel=0.03)


def test_sharded_state_is_16_bytes_per_parameter_over_the_gpus():
    c = MixtralConfig.from_preset("mixtral-8x7b")
    n_params = sum(torch.Size(s).numel() for _, s in parameter_shapes(c))
    with torch.device("meta"):
        assert n_params == MixtralForCausalLM(c).num_params()
    for ep in (1, 8):
        p = plan_memory(c, Layout(gpus=128, expert_parallel=ep), seq_len=4096, gpu_memory=80e9)
        assert (p.params + p.grads + p.optimizer) / 16 == pytest.approx(n_params / 128, rel=1e-3)
    single = plan_memory(c, Layout(gpus=1), seq_len=4096, gpu_memory=80e9)
    assert single.params == 4 * n_params and single.max_micro_batch == 0  # 747 GB: nothing fits one GPU


def test_plan_command_prints_the_swallow_mx_layouts(capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "swallow-mx-8x7b.toml"), "--gpus", "128",
                 "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "46.70B parameters" in out and "128 GPUs, 72.0 GB usable per GPU" in out
    assert "seq_len 4096, global batch 1024 sequences" in out
    rows = [line for line in out.splitlines() if "|" in line and not line.lstrip().startswith("EP")]
    assert len(rows) == 16  # EP 1, 2, 4, 8 x reshard or not x checkpointing or not
    assert "suggested: --parallel.expert_parallel=" in out


def test_plan_command_errors(capsys):
    assert main(["plan", "--gpus", "0", "--config", str(REPO / "configs" / "tiny.toml")]) == 2
    assert main(["plan", "--gpus", "2", "--gpu-memory", "lots", "--config", str(REPO / "configs" / "tiny.toml")]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err
    assert parse_memory("80GB") == 80e9 and parse_memory("80GiB") == 80 * 2**30


def test_plan_says_when_the_global_batch_does_not_split_over_the_gpus(capsys):
    from moecpt.cli import main

    from .conftest import REPO

    assert main(["plan", "--config", str(REPO / "configs" / "swallow-mx-8x7b.toml"), "--gpus", "96",
                 "--gpu-memory", "80GB"]) == 0
    assert "does not split evenly over 96 GPUs" in capsys.readouterr().out
