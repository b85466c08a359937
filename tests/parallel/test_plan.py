"""`moecpt plan`: the activation estimate against the tensors autograd actually saves, the sharded state
against the Mixtral-8x7B arithmetic, the verdicts for gpt-oss-120b and DeepSeek-V3 against hand arithmetic,
and the command's output. (The per-rank parameter, gradient and AdamW bytes are checked exactly against real
sharded models in test_expert_parallel.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from moecpt.cli import main
from moecpt.model import MixtralForCausalLM, build_model
from moecpt.model.config import MixtralConfig
from moecpt.model.families import preset_config
from moecpt.model.layers import sdpa_mask
from moecpt.model.rope import rope_tables
from moecpt.parallel.plan import (
    Layout,
    activation_bytes_per_token_layer,
    gathered_numels,
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
    positions = torch.arange(seq).expand(batch, seq)
    if hasattr(layer.self_attn, "kv_b_proj") or hasattr(layer.self_attn, "sinks"):  # the family's own RoPE
        cos, sin = model.rope(positions)
    else:
        cos, sin = rope_tables(positions, c.attn_head_dim, c.rope_theta)
    mask = sdpa_mask(positions, None, positions, False, 0, layer.self_attn.window)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, mask, None)
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


# ---- MLA, attention sinks, clamped-SwiGLU experts -------------------------------------------------------
_SDPA = F.scaled_dot_product_attention


class FusedAttention(torch.autograd.Function):
    """Stands in for a GPU's fused attention (memory-efficient or flash) in what it keeps for backward: q, k,
    v as given, the output (in [B, T, heads, D] memory, as those kernels return it, so o_proj's input is a
    view of it), the fp32 logsumexp and a boolean mask as an additive bias in q's dtype. On a CPU, SDPA takes
    its math path for a v head dim other than q's (MLA) or an explicit mask (sinks) and keeps the T x T
    probabilities, which the GPU kernels never do."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, gqa):
        out = _SDPA(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32)
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: only what the forward keeps is measured
        raise NotImplementedError


def fused_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return FusedAttention.apply(q, k, v, attn_mask, scale, enable_gqa)


MLA_SMALL = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                 kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=48,
                 first_k_dense_replace=1, num_hidden_layers=2, vocab_size=512)
FUSED_SHAPES = {  # v_head_dim (48) differs from qk_nope + qk_rope (48 = 32 + 16 here, 40 below) on purpose
    "deepseek-v3 dense layer": ("deepseek-v3-tiny", dict(MLA_SMALL), 0, 2),
    "deepseek-v3 moe + shared": ("deepseek-v3-tiny", dict(MLA_SMALL, qk_nope_head_dim=24), 1, 2),
    "deepseek-v3 no q lora": ("deepseek-v3-tiny", dict(MLA_SMALL, q_lora_rank=None, v_head_dim=32), 1, 2),
    "deepseek-v2 moe": ("deepseek-v2-tiny", dict(hidden_size=128, moe_intermediate_size=96, kv_lora_rank=64,
                                                 v_head_dim=24, vocab_size=512), 1, 2),
    # batch 1: the mask (one [T, T + 1] bias per layer) is counted per sequence
    "gpt-oss sliding": ("gpt-oss-tiny", dict(hidden_size=128, intermediate_size=96, head_dim=24, vocab_size=512),
                        0, 1),
    "gpt-oss full": ("gpt-oss-tiny", dict(hidden_size=128, intermediate_size=96, num_key_value_heads=4,
                                          vocab_size=512), 1, 1),
}


@pytest.mark.parametrize("shape", sorted(FUSED_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_and_sink_activations_match_saved_tensors(shape, dtype, monkeypatch):
    """MLA keeps q and k of qk_nope + qk_rope per head and v of v_head_dim (with its latent norms); sink
    attention its padded q, k, v and the mask; gpt-oss's experts more per routed row (biases, clamps)."""
    preset, fields, layer, batch = FUSED_SHAPES[shape]
    c = preset_config(preset, **fields)
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_sdpa)
    measured = saved_bytes_per_token(c, dtype, layer, batch=batch)
    estimate = activation_bytes_per_token_layer(c, 4 if dtype == torch.float32 else 2, 64)[layer]
    assert estimate == pytest.approx(measured, rel=0.03)


def test_mtp_layers_are_fsdp_units_of_their_own_and_trained_only_with_their_loss():
    c = preset_config("deepseek-v3-tiny", num_nextn_predict_layers=1, vocab_size=512)
    shapes = dict(parameter_shapes(c))
    mtp = sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("mtp."))
    assert mtp > 0 and any(n.startswith("mtp.0.block.moe.experts.") for n in shapes)
    lay = Layout(gpus=1)
    off = plan_memory(c, lay, seq_len=64, gpu_memory=80e9)
    on = plan_memory(dataclasses.replace(c, mtp_loss_coef=0.3), lay, seq_len=64, gpu_memory=80e9)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert off.params == 4 * total and off.grads == 4 * (total - mtp) and on.grads == 4 * total
    assert on.optimizer == 8 * total and off.optimizer == 8 * (total - mtp)
    # trained, the MTP depth adds its decoder layer's activations and more
    assert on.activations_per_sample - off.activations_per_sample > 64 * activation_bytes_per_token_layer(c, 2, 64)[-1]
    # Sharded, every block kept gathered (no resharding): an untrained MTP depth is never gathered (as if the
    # model had none); a trained one is gathered as a block of its own, its routed experts split over EP.
    kept = Layout(gpus=4, expert_parallel=2, reshard_after_forward=False)
    none = plan_memory(dataclasses.replace(c, num_nextn_predict_layers=0), kept, seq_len=64, gpu_memory=80e9)
    off = plan_memory(c, kept, seq_len=64, gpu_memory=80e9)
    on_c = dataclasses.replace(c, mtp_loss_coef=0.3)
    on = plan_memory(on_c, kept, seq_len=64, gpu_memory=80e9)
    mtp_gathered = sum(torch.Size(s).numel() // (2 if ".experts." in n else 1) for n, s in shapes.items()
                       if n.startswith("mtp."))
    assert off.gathered == none.gathered and on.gathered > off.gathered
    (blocks_off, root_off), (blocks_on, root_on) = gathered_numels(c, 2), gathered_numels(on_c, 2)
    assert "mtp.0" not in blocks_off and blocks_on["mtp.0"] == mtp_gathered and root_on == root_off


GB = 1e9


@pytest.fixture
def plan_of(capsys):
    def run(preset: str, gpus: int) -> tuple[str, dict]:
        assert main(["plan", "--config", str(REPO / "configs" / "tiny.toml"), f"--model.preset={preset}",
                     "--data.seq_len=4096", "--training.global_batch=1024", "--training.dtype=bfloat16",
                     "--gpus", str(gpus), "--gpu-memory", "80GB"]) == 0
        out = capsys.readouterr().out
        rows = {}
        for line in out.splitlines():
            if "|" in line and not line.lstrip().startswith("EP"):
                left, mid, right = line.split("|")
                ep, reshard, ac = left.split()
                rows[int(ep), reshard == "yes", ac == "on"] = ([float(x) for x in mid.split()], right.split())
        return out, rows
    return run


def test_gpt_oss_120b_fits_on_64_and_256_gpus(plan_of):
    """By hand. gpt-oss-120b: 36 layers x (128 experts x (2880 x 5760 + 5760 + 2880 x 2880 + 2880) = 3.186B,
    attention 2 x 2880 x 4096 + 2 x 2880 x 512 + biases = 26.5M, router 0.37M) + embedding and LM head
    2 x 201,088 x 2880 = 1.158B: P = 116.8B. fp32 weights 4 B, fp32 grads 4 B, AdamW 8 B: 16 B x P = 1,869 GB.
    - 64 GPUs: 1,869 / 64 = 29.2 GB per GPU of the 72 GB usable (80 GB less 10%). EP 64: 2 experts per GPU, a
      block gathered = 26.5M + 2 x 24.9M = 76M; the root (embedding, head) 1.158B: bf16 2 x (2 x 76M + 1,158M)
      + (2 + 4) x 76M = 3.1 GB, plus one loss chunk 2048 x 201,088 x 6 B = 2.5 GB. 34.8 GB static leaves
      37 GB: with activation checkpointing a 4,096-token sequence keeps 36 x 2 x 2880 x 4096 B = 0.85 GB of
      layer inputs plus one recomputed layer (~1.2 GB): the 16 sequences per GPU of the global batch fit.
      Without checkpointing a sequence keeps every layer's expert rows, at least 36 x 4096 x 4 x 14 x 2880 B
      = 23.8 GB, and its attention: over 37 GB: out of memory.
    - 256 GPUs: 7.3 GB of state; even EP 1 fits with checkpointing (a whole block of 3.21B gathered:
      2 x (2 x 3.21 + 1.16) + 6 x 3.21 = 34.5 GB + 2.5 GB)."""
    out, rows = plan_of("gpt-oss-120b", 64)
    assert "116.83B parameters" in out and "64 GPUs, 72.0 GB usable per GPU" in out
    (params, grads, optim, gathered, act), _ = rows[64, True, True]
    assert params + grads + optim == pytest.approx(16 * 116.83e9 / 64 / GB, rel=0.01)
    assert gathered == pytest.approx(3.1 + 2.47, rel=0.03)
    assert 0.85 < act < 2.5 and rows[64, True, False][0][4] > 23.8
    assert rows[64, True, False][1][0] == "0" and int(rows[64, True, True][1][1]) == 16
    assert "verdict: FSDP + EP fits on 64 GPUs; no pipeline parallelism needed" in out
    assert "--parallel.activation_checkpointing=true --training.micro_batch=16" in out
    out, rows = plan_of("gpt-oss-120b", 256)
    (params, grads, optim, gathered, _), (max_mb, _, _, _) = rows[1, True, True]
    assert params + grads + optim == pytest.approx(16 * 116.83e9 / 256 / GB, rel=0.05)  # 128 experts: padded
    assert gathered == pytest.approx(34.5 + 2.47, rel=0.03) and int(max_mb) >= 4
    assert "verdict: FSDP + EP fits on 256 GPUs" in out


def test_deepseek_v3_needs_pipeline_parallelism_on_64_gpus_and_fits_on_256(plan_of):
    """By hand. DeepSeek-V3: 671B parameters in its 61 layers, embedding and head, plus one multi-token
    prediction layer of 11.6B (kept, not trained at mtp_loss_coef 0: fp32 weights only).
    - 64 GPUs: fp32 weights + grads + AdamW of the 671B alone are 16 x 671e9 / 64 = 167.8 GB per GPU, over
      the 72 GB usable, whatever the EP size or resharding: FSDP + EP cannot train it; it needs pipeline
      parallelism (not in moecpt) or more GPUs.
    - 256 GPUs: 16 x 671e9 / 256 = 41.9 GB (+ 4 x 11.6e9 / 256 = 0.2 GB of MTP weights). EP 256, one routed
      expert per GPU; the largest block is a dense first layer: MLA 7168 x 1536 + 1536 x 128 x 192 +
      7168 x 576 + 512 x 128 x 256 + 128 x 128 x 7168 = 187M plus its MLP 3 x 7168 x 18432 = 396M: 584M. The
      root: embedding and head 2 x 129,280 x 7168 = 1,853M; the MTP layer, a unit of its own, is never
      gathered (not trained). bf16: 2 x (2 x 584M + 1,853M) + 6 x 584M = 9.55 GB, plus a loss chunk
      2048 x 129,280 x 6 B = 1.6 GB. 53 GB static leaves 19 GB: with
      checkpointing a sequence keeps 61 x 2 x 7168 x 4096 B = 3.6 GB of layer inputs plus one recomputed
      layer (the eight routed rows per token alone 8 x 8 x 2048 x 4096 B = 1.1 GB): two sequences fit.
      Without checkpointing the routed rows alone are 58 x 4096 x 8 x 8 x 2048 B = 31 GB: out of memory."""
    out, rows = plan_of("deepseek-v3-671b", 64)
    assert "layers: 3 dense + 58 MoE + 1 multi-token prediction" in out
    for (params, grads, optim, _, _), right in rows.values():
        assert params + grads + optim == pytest.approx(16 * 671e9 / 64 / GB, rel=0.01) and right[0] == "0"
    assert "verdict: FSDP + EP does not fit on 64 GPUs: the sharded training state alone" in out
    assert "needs: pipeline parallelism, which moecpt does not have" in out
    assert "or FSDP + EP on at least 256 such GPUs" in out
    out, rows = plan_of("deepseek-v3-671b", 256)
    (params, grads, optim, gathered, act), (max_mb, _, _, _) = rows[256, True, True]
    assert params + grads + optim == pytest.approx((16 * 671e9 + 4 * 11.6e9) / 256 / GB, rel=0.01)
    assert gathered == pytest.approx(9.55 + 1.6, rel=0.03)
    assert 3.6 + 1.1 < act < 9 and int(max_mb) == 2
    assert all(right[0] == "0" for (_, _, ac), (_, right) in rows.items() if not ac)
    assert "verdict: FSDP + EP fits on 256 GPUs" in out
    assert "--parallel.activation_checkpointing=true --training.micro_batch=2" in out
