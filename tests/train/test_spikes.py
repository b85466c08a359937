"""The loss-spike detector: a robust recent baseline (the median of the recent losses) that a lone spike
hardly moves and a lasting level shift moves within half its window."""

from __future__ import annotations

import math

from moecpt.train.metrics import SpikeDetector


def flags(detector: SpikeDetector, losses: list[float]) -> list[int]:
    return [i for i, x in enumerate(losses) if detector(x)]


def test_a_lone_spike_is_flagged_and_does_not_move_the_baseline():
    d = SpikeDetector(2.0, window=16)
    losses = [3.0 - 0.01 * i for i in range(30)]
    losses[20] = 9.0
    assert flags(d, losses) == [20]
    assert d.count == 1 and 2.7 < d.baseline < 2.9


def test_after_a_lasting_level_shift_the_flags_stop_within_half_the_window():
    d = SpikeDetector(1.5, window=16)
    found = flags(d, [2.0] * 20 + [5.0] * 40)
    assert found and found[0] == 20
    assert max(found) < 20 + 16 // 2 + 1  # then the baseline is the new level: no more flags
    assert d.baseline == 5.0


def test_non_finite_losses_are_ignored_and_the_state_round_trips():
    d = SpikeDetector(2.0, window=8)
    flags(d, [2.0, math.nan, 2.1, math.inf, 2.2, 2.0, 7.0])
    assert d.count == 1 and math.nan not in d.recent and len(d.recent) == 5
    e = SpikeDetector(2.0, window=8)
    e.load_state_dict(d.state_dict())
    assert [e(x) for x in (2.0, 9.0, 2.1)] == [d(x) for x in (2.0, 9.0, 2.1)] == [False, True, False]
    old = SpikeDetector(2.0)
    old.load_state_dict({"spikes": 3, "loss_ema": 2.0})  # a checkpoint from before the window
    assert old.count == 3 and old.baseline == 2.0 and old(7.0)
