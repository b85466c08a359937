"""Learning-rate schedule values and weight-decay groups."""

from __future__ import annotations

import math

import pytest

from moecpt.config import OptimizerSection, ScheduleSection
from moecpt.model import MixtralConfig, MixtralForCausalLM
from moecpt.train.optim import lr_at, param_groups


def test_swallow_schedule_at_chosen_steps():
    opt, sched = OptimizerSection(lr=2e-5, min_lr=2e-6), ScheduleSection(warmup_steps=1000, decay="cosine")
    total = 25000
    assert lr_at(0, total, opt, sched) == pytest.approx(2e-8)  # warmup starts at lr / warmup
    assert lr_at(499, total, opt, sched) == pytest.approx(1e-5)
    assert lr_at(999, total, opt, sched) == pytest.approx(2e-5)  # peak at the last warmup step
    assert lr_at(1000, total, opt, sched) == pytest.approx(2e-5)  # cosine starts at the peak
    mid = 1000 + (total - 1 - 1000) / 2
    assert lr_at(int(mid), total, opt, sched) == pytest.approx(1.1e-5, rel=1e-3)  # halfway: (peak + min) / 2
    assert lr_at(total - 1, total, opt, sched) == pytest.approx(2e-6)  # the last step is at the minimum
    values = [lr_at(s, total, opt, sched) for s in range(1000, total)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def test_linear_and_constant_decay():
    opt = OptimizerSection(lr=1.0, min_lr=0.0)
    lin = ScheduleSection(warmup_steps=0, decay="linear")
    assert [lr_at(s, 5, opt, lin) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = ScheduleSection(warmup_steps=2, decay="constant")
    assert [lr_at(s, 5, opt, const) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    cos = ScheduleSection(warmup_steps=0, decay="cosine")
    assert lr_at(1, 3, opt, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_only_on_matrices_never_norms_or_router():
    model = MixtralForCausalLM(MixtralConfig.from_preset("tiny", vocab_size=64, tie_word_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "layers.0.self_attn.q_proj.weight" in decayed
    assert "layers.1.moe.experts.gate_up_proj" in decayed and "layers.1.moe.experts.down_proj" in decayed
    assert "embed_tokens.weight" in decayed  # tied with lm_head: counted once
    assert "layers.0.moe.gate.weight" in plain  # the router
    assert "layers.0.input_layernorm.weight" in plain and "norm.weight" in plain
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
