"""Learning-rate schedules: warmup + cosine (Swallow-MX), warmup-stable-decay, "infinite", constant, and the
decay of a cooldown branch. When to use which: docs/cpt.md.

Every schedule is a pure function of the 0-based optimizer step. Warmup is linear (step s < warmup_steps uses
lr * (s + 1) / warmup_steps, so the last warmup step is at the peak). A decay phase of D steps that starts at
step d uses progress p = (s - d + 1) / D (its last step, p = 1, is at the phase's end value), except
warmup_cosine, whose decay starts at the peak at step warmup_steps (p = (s - warmup) / (steps - 1 - warmup)).
The shapes give the share of the drop done at progress p: cosine (1 - cos(pi p)) / 2, linear p, and 1-sqrt
sqrt(p), i.e. the LR is start - (start - end) sqrt(p): a multiplier 1 - sqrt(p) on the peak when the end is
0 (Hägele et al. 2024's cooldown, which drops fastest at its start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moecpt.config import OptimizerSection, ScheduleSection


@dataclass(frozen=True)
class Branch:
    """A cooldown branch: it starts after optimizer step `step` of the run it branches from (the checkpoint's
    step), whose last update used learning rate `lr`, and decays from there to min_lr at its last step."""

    step: int
    lr: float
    source: str = ""  # the checkpoint it branched from


def decayed_share(shape: str, p: float) -> float:
    """The share of a decay done at progress p in [0, 1]."""
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        return p
    if shape == "1-sqrt":
        return math.sqrt(p)
    if shape == "constant":  # the old spelling of kind = "constant": no decay
        return 0.0
    return 0.5 * (1.0 - math.cos(math.pi * p))


def _decay(start: float, end: float, shape: str, done: int, length: int) -> float:
    """The value after `done` of `length` decay steps, from `start` towards `end`."""
    return start + (end - start) * decayed_share(shape, done / max(1, length))


def wsd_decay_start(total_steps: int, sched: ScheduleSection) -> int:
    """The first step of a WSD run's decay: it decays over the last round(decay_fraction x steps) steps."""
    return total_steps - max(1, round(sched.decay_fraction * total_steps))


def phases(total_steps: int, sched: ScheduleSection, branch: Branch | None = None) -> list[tuple[str, int, int]]:
    """The schedule's phases as (name, first step, end step exclusive), for plots and the report."""
    warm = min(sched.warmup_steps, total_steps)
    if branch is not None:
        return [("cooldown branch", branch.step, total_steps)]
    out = [("warmup", 0, warm)] if warm else []
    if sched.kind == "wsd":
        d = wsd_decay_start(total_steps, sched)
        out += [("stable", warm, d), ("decay", d, total_steps)]
    elif sched.kind == "infinite":
        c, a = warm + sched.cooldown_steps, total_steps - sched.anneal_steps
        out += [("cooldown", warm, c), ("constant", c, a), ("anneal", a, total_steps)]
    else:
        out.append(("constant" if sched.kind == "constant" or sched.decay == "constant" else "decay",
                    warm, total_steps))
    return [p for p in out if p[2] > p[1]]


def lr_at(step: int, total_steps: int, opt: OptimizerSection, sched: ScheduleSection,
          branch: Branch | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if branch is not None:  # a cooldown branch: no warmup, one decay from the branch point's LR
        return _decay(branch.lr, opt.min_lr, sched.decay, step - branch.step + 1, total_steps - branch.step)
    warm = sched.warmup_steps
    if step < warm:
        return opt.lr * (step + 1) / warm
    if sched.kind == "constant":
        return opt.lr
    if sched.kind == "wsd":
        d = wsd_decay_start(total_steps, sched)
        return opt.lr if step < d else _decay(opt.lr, opt.min_lr, sched.decay, step - d + 1, total_steps - d)
    if sched.kind == "infinite":
        return _infinite(step, total_steps, opt, sched)
    span = max(1, total_steps - 1 - warm)  # warmup_cosine: from the peak at step `warm` to min_lr at the last
    return _decay(opt.lr, opt.min_lr, sched.decay, step - warm, span)


def _infinite(step: int, total_steps: int, opt: OptimizerSection, sched: ScheduleSection) -> float:
    """Ibrahim et al. 2024's infinite schedule after warmup: cooldown to constant_lr, constant, final anneal."""
    cool_end = sched.warmup_steps + sched.cooldown_steps
    anneal_start = total_steps - sched.anneal_steps
    if step < cool_end:
        return _decay(opt.lr, sched.constant_lr, sched.decay, step - sched.warmup_steps + 1, sched.cooldown_steps)
    if step < anneal_start:
        return sched.constant_lr
    return _decay(sched.constant_lr, opt.min_lr, sched.decay, step - anneal_start + 1, sched.anneal_steps)
