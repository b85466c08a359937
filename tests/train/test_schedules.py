"""Learning-rate schedules at their boundaries (first and last warmup step, start and end of each decay, the
final step), the cooldown branch's decay, and the config errors of [schedule]."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moecpt.config import OptimizerSection, ScheduleSection, load_config
from moecpt.errors import UserError
from moecpt.train.schedule import Branch, decayed_share, lr_at, phases

OPT = OptimizerSection(lr=1e-3, min_lr=1e-4)
REPO = Path(__file__).resolve().parents[2]


def lrs(total: int, sched: ScheduleSection, branch: Branch | None = None) -> list[float]:
    return [lr_at(s, total, OPT, sched, branch) for s in range(branch.step if branch else 0, total)]


@pytest.mark.parametrize("shape, half", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", math.sqrt(0.5))])
def test_wsd_warms_up_holds_then_decays_over_the_last_fraction(shape, half):
    sched = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay=shape)
    v = lrs(100, sched)
    assert v[0] == pytest.approx(1e-4) and v[9] == pytest.approx(1e-3)  # first and last warmup step
    assert v[10:80] == [1e-3] * 70  # stable until the decay's first step, step 80 (the last 20 of 100)
    assert v[80] < 1e-3  # the decay's first step is already below the peak
    assert v[89] == pytest.approx(1e-3 - (1e-3 - 1e-4) * half)  # 10 of 20 decay steps done
    assert v[99] == pytest.approx(1e-4)  # the final step is at min_lr
    assert all(a >= b for a, b in zip(v[80:], v[81:], strict=False))
    assert [p[0] for p in phases(100, sched)] == ["warmup", "stable", "decay"]


def test_one_minus_sqrt_multiplies_the_peak_by_one_minus_sqrt_of_the_progress():
    assert decayed_share("1-sqrt", 0.25) == pytest.approx(0.5)  # the LR is 1 - sqrt(0.25) = half-way down
    assert decayed_share("1-sqrt", 0.5) > decayed_share("linear", 0.5)  # it drops fastest at its start


def test_infinite_cools_down_holds_a_constant_then_anneals():
    sched = ScheduleSection(kind="infinite", warmup_steps=10, cooldown_steps=20, constant_lr=4e-4,
                            anneal_steps=10, decay="linear")
    v = lrs(100, sched)
    assert v[9] == pytest.approx(1e-3)  # the peak at the last warmup step
    assert v[10] == pytest.approx(1e-3 - 6e-4 / 20)  # the cooldown's first step
    assert v[29] == pytest.approx(4e-4)  # the cooldown ends on the constant
    assert v[30:90] == [4e-4] * 60
    assert v[90] == pytest.approx(4e-4 - 3e-4 / 10)  # the anneal's first step
    assert v[99] == pytest.approx(1e-4)  # the final step at min_lr
    no_anneal = ScheduleSection(kind="infinite", warmup_steps=10, cooldown_steps=20, constant_lr=4e-4)
    assert lrs(100, no_anneal)[-1] == 4e-4  # without an anneal the run ends on the plateau, ready to branch
    assert [p[0] for p in phases(100, sched)] == ["warmup", "cooldown", "constant", "anneal"]


def test_constant_and_warmup_cosine():
    assert lrs(5, ScheduleSection(kind="constant", warmup_steps=2)) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    v = lrs(12, ScheduleSection(kind="warmup_cosine", warmup_steps=1))
    assert v[0] == v[1] == pytest.approx(1e-3)  # warmup of one step, then the cosine starts at the peak
    assert v[6] == pytest.approx(5.5e-4) and v[11] == pytest.approx(1e-4)  # halfway; min_lr at the last step
    one_sqrt = lrs(12, ScheduleSection(kind="warmup_cosine", warmup_steps=1, decay="1-sqrt"))
    assert one_sqrt[11] == pytest.approx(1e-4) and one_sqrt[6] < v[6]


def test_a_branch_decays_from_its_lr_like_the_wsd_run_that_decays_there():
    wsd = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.4, decay="1-sqrt")  # decays from step 60
    branch = Branch(step=60, lr=1e-3)
    assert lrs(100, wsd, branch) == pytest.approx(lrs(100, wsd)[60:])
    low = lrs(50, ScheduleSection(decay="linear"), Branch(step=40, lr=5e-4))  # from a mid-decay checkpoint
    assert low[0] == pytest.approx(5e-4 - 4e-4 / 10) and low[-1] == pytest.approx(1e-4)
    assert phases(50, wsd, Branch(40, 5e-4)) == [("cooldown branch", 40, 50)]


def test_existing_configs_keep_their_schedule():
    cfg = load_config(REPO / "configs" / "swallow-mx-8x7b.toml")
    assert (cfg.schedule.kind, cfg.schedule.decay) == ("warmup_cosine", "cosine")
    legacy = ScheduleSection(warmup_steps=0, decay="linear")
    assert lrs(5, legacy) == pytest.approx([1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4])


@pytest.mark.parametrize("overrides, message", [
    (["--schedule.kind=cosine"], "schedule.kind must be one of warmup_cosine, wsd, infinite, constant"),
    (["--schedule.kind=wsd", "--schedule.decay=constant"], "old spelling of schedule.kind = 'constant'"),
    (["--schedule.decay=exp"], "schedule.decay must be one of cosine, linear, 1-sqrt"),
    (["--schedule.kind=wsd", "--schedule.decay_fraction=0"], "decay_fraction must be above 0"),
    (["--schedule.kind=wsd", "--schedule.warmup_steps=9"], "leaves no room for the 9 warmup steps"),
    (["--schedule.kind=infinite", "--schedule.cooldown_steps=2"], "schedule.constant_lr must be positive and "
                                                                   "between optimizer.min_lr"),
    (["--schedule.kind=infinite", "--schedule.constant_lr=1e-3", "--schedule.cooldown_steps=8"], "must fit in "
                                                                                                 "training.steps"),
    (["--schedule.decay_only=true"], "schedule.decay_only needs init_from"),
])
def test_schedule_config_errors_name_the_key(write_config, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write_config(), overrides)


def test_the_wsd_replay_recipe_carries_its_schedule_and_stages():
    from moecpt.pipeline.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "swallow-mx-wsd-replay.toml")
    cfg = recipe.stage_config("cpt", {name: [] for name in ("ja", "ja_hq", "en", "code")})
    s = cfg.schedule
    assert (s.kind, s.warmup_steps, s.decay_fraction, s.decay) == ("wsd", 1000, 0.2, "1-sqrt")
    assert [(st.start_step, st.mixture.split()[1::2]) for st in cfg.data.stages] == [
        (2500, ["ja", "ja_hq", "en", "code"]), (20000, ["ja", "ja_hq", "en", "code"])]
    assert [float(st.mixture.split()[4]) for st in cfg.data.stages] == [0.25, 0.15]  # the English replay shrinks
    assert phases(cfg.training.steps, s)[-1] == ("decay", 20000, 25000)  # the last stage decays with the LR
    shorter = load_recipe(REPO / "recipes" / "swallow-mx-wsd-replay.toml", overrides=["--cpt.training.steps=15000"])
    with pytest.raises(UserError, match=r"data.stages\[1\].start_step = 20000 must be above .* below training.steps "
                                        r"\(15000\)"):
        shorter.stage_config("cpt", {name: [] for name in ("ja", "ja_hq", "en", "code")})
