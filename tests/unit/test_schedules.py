"""LR schedules (tunelab/train/schedules.py) against hand-computed values.

Convention (train/loop.py): steps are 0-based, the run takes steps 0 .. total-1, and the
multiplier for step s is used for the update made at step s. Warmup: step s < w gives (s+1)/w.
"""

from __future__ import annotations

import math

import pytest

from tunelab.config import ScheduleConfig
from tunelab.train.schedules import SCHEDULES, constant, cosine, inverse_sqrt, linear, lr_multiplier, wsd

approx = lambda x: pytest.approx(x, rel=0, abs=1e-12)  # noqa: E731


def cfg(name, **kw) -> ScheduleConfig:
    return ScheduleConfig(name=name, **kw)


def test_registry_matches_config_literal():
    names = set(ScheduleConfig.model_fields["name"].annotation.__args__)
    assert set(SCHEDULES) == names


# ---------------------------------------------------------------- warmup (shared)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd", "inverse_sqrt"])
def test_warmup_is_linear_from_1_over_w_to_1(name):
    c = cfg(name, warmup_steps=4, min_lr_ratio=0.0)
    assert [lr_multiplier(s, 100, c) for s in range(4)] == [approx(0.25), approx(0.5), approx(0.75), approx(1.0)]


# ---------------------------------------------------------------- constant


def test_constant():
    c = cfg("constant", warmup_steps=4)
    assert [constant(s, 50, c) for s in (0, 1, 2, 3, 4, 10, 49)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [constant(s, 50, cfg("constant")) for s in (0, 25, 49)] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- linear


def test_linear_no_warmup_to_zero():
    # total 11 steps: 0..10; decay spans 10 steps, so each step removes 0.1.
    c = cfg("linear", warmup_steps=0, min_lr_ratio=0.0)
    assert [linear(s, 11, c) for s in range(11)] == [approx(1.0 - 0.1 * s) for s in range(11)]


def test_linear_with_warmup_and_floor():
    # warmup 10, total 110 -> decay over steps 10..109 (99 intervals), from 1.0 to 0.1.
    c = cfg("linear", warmup_steps=10, min_lr_ratio=0.1)
    assert linear(0, 110, c) == approx(0.1)
    assert linear(9, 110, c) == approx(1.0)
    assert linear(10, 110, c) == approx(1.0)
    assert linear(109, 110, c) == approx(0.1)
    assert linear(10 + 33, 110, c) == approx(1.0 - 0.9 * 33 / 99)  # = 0.7
    assert linear(43, 110, c) == approx(0.7)
    # Past the end (e.g. a longer resumed run): stays at the floor.
    assert linear(500, 110, c) == approx(0.1)


# ---------------------------------------------------------------- cosine


def test_cosine_hand_values():
    c = cfg("cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert cosine(0, total, c) == approx(0.1)  # 1/10
    assert cosine(9, total, c) == approx(1.0)  # end of warmup
    assert cosine(10, total, c) == approx(1.0)  # first post-warmup step: peak
    assert cosine(109, total, c) == approx(0.1)  # last step: floor
    # Decay spans steps 10..109, i.e. 99 intervals; its midpoint (progress 0.5) falls between
    # steps 59 and 60. Cosine is point-symmetric about it: f(59) + f(60) = 2 * 0.55.
    assert cosine(59, total, c) + cosine(60, total, c) == approx(1.1)
    # f(59): progress 49/99; cos(49*pi/99) = sin(pi/198).
    assert cosine(59, total, c) == approx(0.55 + 0.45 * math.sin(math.pi / 198))
    assert cosine(59, total, c) == pytest.approx(0.5571397, abs=1e-6)  # by hand / calculator
    # Quarter point: progress 0.25 needs 24.75 intervals; use total 111 (100 intervals) instead.
    assert cosine(35, 111, c) == approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # progress 0.25
    assert cosine(60, 111, c) == approx(0.55)  # exact midpoint
    assert cosine(110, 111, c) == approx(0.1)


def test_cosine_without_warmup_starts_at_peak():
    c = cfg("cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert cosine(0, 101, c) == approx(1.0)
    assert cosine(50, 101, c) == approx(0.5)
    assert cosine(100, 101, c) == approx(0.0)


# ---------------------------------------------------------------- wsd


def test_wsd_stable_then_linear_decay_over_last_fraction():
    # total 100, decay_fraction 0.2 -> the last 20 steps (80..99) decay linearly to the floor.
    c = cfg("wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert wsd(0, 100, c) == approx(0.1)
    assert wsd(9, 100, c) == approx(1.0)
    assert all(wsd(s, 100, c) == 1.0 for s in range(10, 80))  # stable phase: exactly the peak
    assert wsd(80, 100, c) == approx(1 - 1 / 20)  # 0.95
    assert wsd(89, 100, c) == approx(0.5)
    assert wsd(99, 100, c) == approx(0.0)  # last step reaches the floor
    # Linear: constant decrement over the decay phase.
    diffs = [wsd(s, 100, c) - wsd(s + 1, 100, c) for s in range(80, 99)]
    assert diffs == [approx(0.05)] * len(diffs)


def test_wsd_floor():
    c = cfg("wsd", warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.2)
    # total 10: decay over steps 5..9, 1 -> 0.2 in 5 equal steps of 0.16.
    assert [wsd(s, 10, c) for s in range(10)] == [approx(x) for x in
                                                 (1, 1, 1, 1, 1, 0.84, 0.68, 0.52, 0.36, 0.2)]


# ---------------------------------------------------------------- inverse_sqrt


def test_inverse_sqrt():
    c = cfg("inverse_sqrt", warmup_steps=10, min_lr_ratio=0.0)
    assert inverse_sqrt(4, 1000, c) == approx(0.5)  # warmup
    assert inverse_sqrt(9, 1000, c) == approx(1.0)
    assert inverse_sqrt(10, 1000, c) == approx(1.0)  # equal to 1 at the end of warmup
    assert inverse_sqrt(40, 1000, c) == approx(0.5)  # sqrt(10/40)
    assert inverse_sqrt(90, 1000, c) == approx(1 / 3)  # sqrt(10/90)
    assert inverse_sqrt(1000, 1000, c) == approx(0.1)  # sqrt(10/1000)


def test_inverse_sqrt_floor():
    c = cfg("inverse_sqrt", warmup_steps=10, min_lr_ratio=0.25)
    assert inverse_sqrt(90, 1000, c) == approx(1 / 3)
    assert inverse_sqrt(160, 1000, c) == approx(0.25)  # sqrt(10/160) = 0.25: at the floor
    assert inverse_sqrt(640, 1000, c) == approx(0.25)  # 0.125 floored


def test_inverse_sqrt_without_warmup():
    c = cfg("inverse_sqrt", warmup_steps=0, min_lr_ratio=0.0)
    assert inverse_sqrt(0, 100, c) == approx(1.0)
    assert inverse_sqrt(1, 100, c) == approx(1.0)
    assert inverse_sqrt(4, 100, c) == approx(0.5)
    assert inverse_sqrt(25, 100, c) == approx(0.2)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["linear", "cosine", "wsd", "inverse_sqrt"])
@pytest.mark.parametrize("warmup,total", [(0, 50), (7, 50), (10, 110), (3, 1000)])
def test_non_increasing_after_warmup_and_bounded(name, warmup, total):
    c = cfg(name, warmup_steps=warmup, min_lr_ratio=0.05, decay_fraction=0.3)
    values = [lr_multiplier(s, total, c) for s in range(total)]
    assert all(0.05 - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    after = values[warmup:]
    assert after[0] == approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))
    # Warmup strictly increases.
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup]))


@pytest.mark.parametrize("name", ["linear", "cosine", "wsd"])
def test_decaying_schedules_end_at_the_floor(name):
    c = cfg(name, warmup_steps=5, min_lr_ratio=0.1)
    assert lr_multiplier(199, 200, c) == approx(0.1)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd", "inverse_sqrt"])
def test_degenerate_totals_do_not_crash(name):
    # warmup as long as the run, or a 1-step run
    for total, warmup in [(1, 0), (1, 1), (5, 5), (5, 10)]:
        c = cfg(name, warmup_steps=warmup)
        for s in range(total):
            v = lr_multiplier(s, total, c)
            assert 0.0 < v <= 1.0 and math.isfinite(v)
