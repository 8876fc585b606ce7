"""LR schedules (tunelab/train/schedules.py) against hand-computed values.

Convention (train/loop.py): steps are 0-based, the run takes steps 0 .. total-1, and the
multiplier for step s is used for the update made at step s. Warmup: step s < w gives (s+1)/w.
"""

from __future__ import annotations

import math

import pytest

from tunelab.config import ScheduleConfig
from tunelab.train.schedules import warning as schedule_warning
from tunelab.train.schedules import (
    DECAY_SHAPES,
    SCHEDULES,
    anneal,
    constant,
    cosine,
    describe,
    infinite,
    inverse_sqrt,
    linear,
    lr_multiplier,
    multi_wsd,
    phase_of,
    wsd,
)

approx = lambda x: pytest.approx(x, rel=0, abs=1e-12)  # noqa: E731
close = lambda x: pytest.approx(x, rel=1e-9)  # noqa: E731

SHAPES = ["linear", "cosine", "sqrt"]
R2, R3 = math.sqrt(2), math.sqrt(3)


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


# ---------------------------------------------------------------- decay shapes


def test_decay_shapes_match_config_literal():
    assert set(DECAY_SHAPES) == set(ScheduleConfig.model_fields["decay_shape"].annotation.__args__)


def test_decay_shapes_hand_values():
    # p = 0, 1/4, 1/2, 3/4, 1. cos(pi/4) = sqrt(2)/2, sqrt(1/2) = sqrt(2)/2, sqrt(3/4) = sqrt(3)/2.
    expected = {
        "linear": [1, 0.75, 0.5, 0.25, 0],
        "cosine": [1, 0.5 + R2 / 4, 0.5, 0.5 - R2 / 4, 0],
        "sqrt": [1, 0.5, 1 - R2 / 2, 1 - R3 / 2, 0],
    }
    for shape, values in expected.items():
        got = [DECAY_SHAPES[shape](p) for p in (0, 0.25, 0.5, 0.75, 1)]
        assert got == [close(v) for v in values], shape
        assert got[-1] == 0.0  # exactly: a decay ends exactly on its floor


# ---------------------------------------------------------------- wsd decay shapes


def _old_wsd(step, total, c):
    """wsd before decay_shape existed (linear only), kept here as the reference."""
    if c.warmup_steps and step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    decay_steps = max(1, round(c.decay_fraction * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - c.min_lr_ratio) * p


@pytest.mark.parametrize("warmup,frac,floor,total", [(0, 0.2, 0.0, 100), (10, 0.2, 0.1, 100), (3, 0.5, 0.2, 10),
                                                     (5, 1.0, 0.05, 37), (0, 0.01, 0.3, 50), (7, 0.33, 0.0, 61)])
def test_wsd_linear_shape_equals_old_formula(warmup, frac, floor, total):
    c = cfg("wsd", warmup_steps=warmup, decay_fraction=frac, min_lr_ratio=floor)
    assert c.decay_shape == "linear"  # the default
    for s in range(total + 5):  # and past the end (a longer resumed run)
        assert wsd(s, total, c) == close(_old_wsd(s, total, c))


def test_wsd_decay_shapes_hand_values():
    # total 10, decay_fraction 0.4 -> decay over steps 6..9 (p = 1/4 .. 1), from 1 to 0.2.
    expected = {
        "linear": [0.8, 0.6, 0.4, 0.2],
        "cosine": [0.6 + 0.2 * R2, 0.6, 0.6 - 0.2 * R2, 0.2],  # 0.2 + 0.8 * (0.5 +- sqrt(2)/4)
        "sqrt": [0.6, 1 - 0.4 * R2, 1 - 0.4 * R3, 0.2],  # 0.2 + 0.8 * (1 - sqrt(p))
    }
    for shape, values in expected.items():
        c = cfg("wsd", warmup_steps=2, decay_fraction=0.4, min_lr_ratio=0.2, decay_shape=shape)
        assert [wsd(s, 10, c) for s in range(6)] == [0.5, 1, 1, 1, 1, 1]
        assert [wsd(s, 10, c) for s in range(6, 10)] == [close(v) for v in values], shape
        assert wsd(9, 10, c) == 0.2  # exactly the floor
        assert wsd(30, 10, c) == 0.2  # past the end
        assert [phase_of(s, 10, c) for s in (0, 1, 2, 5, 6, 9)] == ["warmup"] * 2 + ["stable"] * 2 + ["decay"] * 2


# ---------------------------------------------------------------- infinite


def _inf(shape="linear", **kw):
    base = dict(warmup_steps=4, cooldown_steps=4, constant_ratio=0.25, anneal_steps=4, min_lr_ratio=0.05,
                decay_shape=shape)
    return cfg("infinite", **(base | kw))


@pytest.mark.parametrize("shape", SHAPES)
def test_infinite_phases_and_boundaries(shape):
    # total 20: warmup 0..3, cooldown 4..7, constant 8..15, anneal 16..19.
    c = _inf(shape)
    v = [infinite(s, 20, c) for s in range(20)]
    assert v[:4] == [close(x) for x in (0.25, 0.5, 0.75, 1.0)]
    assert v[3] == 1.0  # last warmup step: the peak
    # Cooldown: always cosine, 1 -> 0.25, p = 1/4 .. 1: 0.25 + 0.75 * (0.5 +- sqrt(2)/4).
    assert v[4:8] == [close(x) for x in (0.625 + 0.1875 * R2, 0.625, 0.625 - 0.1875 * R2, 0.25)]
    assert v[4] < 1.0  # first cooldown step: just below the peak
    assert v[7] == 0.25  # last cooldown step: exactly constant_ratio
    assert v[8:16] == [0.25] * 8  # constant
    # Anneal 0.25 -> 0.05 over steps 16..19, p = 1/4 .. 1.
    anneal_values = {
        "linear": [0.2, 0.15, 0.1, 0.05],
        "cosine": [0.15 + 0.05 * R2, 0.15, 0.15 - 0.05 * R2, 0.05],  # 0.05 + 0.2 * (0.5 +- sqrt(2)/4)
        "sqrt": [0.15, 0.25 - 0.1 * R2, 0.25 - 0.1 * R3, 0.05],  # 0.05 + 0.2 * (1 - sqrt(p))
    }[shape]
    assert v[16:] == [close(x) for x in anneal_values]
    assert v[16] < 0.25  # first anneal step: just below the constant
    assert v[19] == 0.05  # last step: exactly the floor
    assert infinite(25, 20, c) == 0.05  # past the end: stays on the floor
    phases = [phase_of(s, 20, c) for s in range(20)]
    assert phases == ["warmup"] * 4 + ["cooldown"] * 4 + ["constant"] * 8 + ["anneal"] * 4


def test_infinite_extended_run_only_lengthens_the_constant_phase():
    c = _inf()
    short = [infinite(s, 20, c) for s in range(16)]  # everything before the anneal of a 20-step run
    longer = [infinite(s, 40, c) for s in range(40)]
    assert longer[:16] == short
    assert longer[16:36] == [0.25] * 20
    assert longer[36:] == [close(x) for x in (0.2, 0.15, 0.1, 0.05)]


def test_infinite_without_cooldown_or_anneal():
    c = _inf(cooldown_steps=0, anneal_steps=0)
    assert [infinite(s, 20, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 0.25, 0.25]  # straight to constant
    assert infinite(19, 20, c) == 0.25 and infinite(10_000, 20, c) == 0.25  # constant indefinitely
    assert phase_of(4, 20, c) == "constant" and phase_of(19, 20, c) == "constant"
    nowarm = _inf(warmup_steps=0, cooldown_steps=2, anneal_steps=0)
    assert [infinite(s, 20, nowarm) for s in range(3)] == [close(0.625), 0.25, 0.25]  # 0.25 + 0.75 * 0.5


# ---------------------------------------------------------------- multi_wsd


def _multi(shape="linear", **kw):
    base = dict(warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1, periods=[10, 6, 4], decay_shape=shape)
    return cfg("multi_wsd", **(base | kw))


def test_multi_wsd_linear_hand_values():
    # Periods 10, 6, 4 (offsets 0, 10, 16); decay half of each: 5, 3, 2 steps; floor 0.1.
    c = _multi()
    v = [multi_wsd(s, 20, c) for s in range(20)]
    assert v[:10] == [close(x) for x in (0.5, 1, 1, 1, 1, 0.82, 0.64, 0.46, 0.28, 0.1)]  # 0.1 + 0.9 * (1 - p)
    assert v[10:16] == [close(x) for x in (0.5, 1, 1, 0.7, 0.4, 0.1)]  # p = 1/3, 2/3, 1
    assert v[16:] == [close(x) for x in (0.5, 1, 0.55, 0.1)]  # no stable step: warmup 2 + decay 2
    # Each period re-warms from 1/warmup right after the previous one reached the floor exactly.
    for end, start in [(9, 10), (15, 16)]:
        assert v[end] == 0.1 and v[start] == 0.5
    assert v[19] == 0.1
    assert multi_wsd(20, 20, c) == 0.1 and multi_wsd(500, 20, c) == 0.1  # past the periods
    phases = [phase_of(s, 20, c) for s in range(21)]
    assert phases == (["period-1 warmup"] * 2 + ["period-1 stable"] * 3 + ["period-1 decay"] * 5
                      + ["period-2 warmup"] * 2 + ["period-2 stable"] + ["period-2 decay"] * 3
                      + ["period-3 warmup"] * 2 + ["period-3 decay"] * 2 + ["end"])


@pytest.mark.parametrize("shape,first,third", [
    # first period's decay, p = 0.2 .. 1; third period's decay, p = 0.5, 1.
    ("cosine", [0.1 + 0.45 * (1 + math.cos(math.pi * k / 5)) for k in range(1, 6)], [0.55, 0.1]),
    ("sqrt", [1 - 0.9 * math.sqrt(k / 5) for k in range(1, 6)], [1 - 0.45 * R2, 0.1]),
])
def test_multi_wsd_decay_shapes(shape, first, third):
    c = _multi(shape)
    assert [multi_wsd(s, 20, c) for s in range(5, 10)] == [close(x) for x in first]
    assert [multi_wsd(s, 20, c) for s in (18, 19)] == [close(x) for x in third]
    assert multi_wsd(9, 20, c) == 0.1 and multi_wsd(15, 20, c) == 0.1


def test_multi_wsd_without_warmup_starts_each_period_at_the_peak():
    c = _multi(warmup_steps=0, periods=[4, 8], decay_fraction=0.25)  # decays of 1 and 2 steps
    assert [multi_wsd(s, 12, c) for s in range(12)] == [close(x) for x in
                                                      (1, 1, 1, 0.1, 1, 1, 1, 1, 1, 1, 0.55, 0.1)]
    assert phase_of(4, 12, c) == "period-2 stable"


# ---------------------------------------------------------------- anneal


@pytest.mark.parametrize("shape,values", [
    ("linear", [0.6, 0.4, 0.2, 0.0]),
    ("cosine", [0.4 + 0.2 * R2, 0.4, 0.4 - 0.2 * R2, 0.0]),  # 0.8 * (0.5 +- sqrt(2)/4)
    ("sqrt", [0.4, 0.8 - 0.4 * R2, 0.8 - 0.4 * R3, 0.0]),  # 0.8 * (1 - sqrt(p))
])
def test_anneal_hand_values(shape, values):
    c = cfg("anneal", start_ratio=0.8, min_lr_ratio=0.0, decay_shape=shape, warmup_steps=3)  # warmup ignored
    assert [anneal(s, 4, c) for s in range(4)] == [close(x) for x in values]
    assert anneal(3, 4, c) == 0.0 and anneal(9, 4, c) == 0.0
    assert phase_of(0, 4, c) == "anneal"


def test_start_ratio_belongs_to_anneal_only():
    from tunelab.config import PretrainRecipe, validate
    from tunelab.errors import ConfigError

    recipe = {"train": {"schedule": {"name": "wsd", "start_ratio": 0.5}}}
    with pytest.raises(ConfigError) as err:
        validate(recipe, "r.yaml", PretrainRecipe)
    assert "\n" not in str(err.value) and "r.yaml" in str(err.value)
    assert "train.schedule: start_ratio: only for name: anneal" in str(err.value)
    # The default is what every run's config.yaml holds, whatever its schedule: re-reading one still works.
    assert validate({"train": {"schedule": {"name": "wsd", "start_ratio": 1.0}}}, "r.yaml", PretrainRecipe)
    assert cfg("anneal", start_ratio=0.5).start_ratio == 0.5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K,N", [(10, 5), (37, 13), (100, 1), (64, 64), (250, 50), (6, 200)])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_anneal_branch_equals_parent_wsd_decay(shape, K, N, floor):
    """A branch from stable checkpoint K with N steps retraces a parent wsd run whose decay starts at K."""
    T = K + N
    parent = cfg("wsd", warmup_steps=5, decay_fraction=N / T, min_lr_ratio=floor, decay_shape=shape)
    assert wsd(K - 1, T, parent) == 1.0 and wsd(K, T, parent) < 1.0  # the parent's decay starts exactly at K
    branch = cfg("anneal", start_ratio=1.0, min_lr_ratio=floor, decay_shape=shape)
    assert [anneal(j, N, branch) for j in range(N)] == [close(wsd(K + j, T, parent)) for j in range(N)]
    assert anneal(N - 1, N, branch) == floor


@pytest.mark.parametrize("shape", SHAPES)
def test_anneal_branch_equals_infinite_anneal(shape):
    # From an infinite run's constant phase (start_ratio = constant_ratio), the branch retraces the
    # parent's own anneal at the end of a run of the matching length.
    parent = _inf(shape, anneal_steps=7)
    branch = cfg("anneal", start_ratio=0.25, min_lr_ratio=0.05, decay_shape=shape)
    assert [anneal(j, 7, branch) for j in range(7)] == [close(infinite(23 + j, 30, parent)) for j in range(7)]


# ---------------------------------------------------------------- every schedule


def _any(name, shape="linear"):
    """A config with every phase present, for the schedule-independent properties (total 50)."""
    extra = {"infinite": dict(cooldown_steps=5, anneal_steps=6, constant_ratio=0.3),
             "multi_wsd": dict(periods=[15, 25, 10]),
             "anneal": dict(start_ratio=0.7, warmup_steps=0)}
    return cfg(name, **(dict(warmup_steps=3, min_lr_ratio=0.05, decay_fraction=0.3, decay_shape=shape)
                        | extra.get(name, {})))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_bounded_and_finite(name, shape):
    c = _any(name, shape)
    for s in range(80):  # including steps past the end (a longer resumed run)
        v = lr_multiplier(s, 50, c)
        assert math.isfinite(v) and 0.0 <= v <= 1.0, (name, s, v)
        assert isinstance(phase_of(s, 50, c), str) and phase_of(s, 50, c)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_has_known_phases_and_a_description(name):
    c = _any(name)
    known = {"warmup", "stable", "constant", "cooldown", "decay", "anneal", "end"}
    for s in range(60):
        phase = phase_of(s, 50, c)
        assert phase.split(" ")[-1] in known, phase
        if phase.startswith("period-"):
            assert name == "multi_wsd"
    if c.warmup_steps:
        assert phase_of(0, 50, c).endswith("warmup")
    line = describe(c, 50)
    assert line.startswith(f"{name}: ") and "\n" not in line


def test_describe_lines():
    c = cfg("infinite", warmup_steps=20, cooldown_steps=100, constant_ratio=0.25, anneal_steps=30, min_lr_ratio=0.1)
    assert describe(c, 1000) == ("infinite: warmup 0->1 over 20 steps, cosine cooldown to 0.25 over 100, "
                                 "constant, anneal to 0.1 over 30 (linear)")
    assert describe(cfg("infinite", constant_ratio=0.5), 10) == "infinite: constant 0.5"
    assert describe(cfg("wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1, decay_shape="sqrt"), 100) == (
        "wsd: warmup 0->1 over 10 steps, stable for 70, sqrt decay to 0.1 over 20")
    assert describe(_multi(), 20) == ("multi_wsd: 3 periods (10+6+4 steps), each: warmup over 2, stable, "
                                      "linear decay to 0.1 over 5/3/2")
    assert describe(cfg("anneal", start_ratio=0.5, min_lr_ratio=0.0, decay_shape="cosine"), 40) == (
        "anneal: cosine decay from 0.5 to 0 over 40 steps, no warmup")
    assert describe(cfg("cosine", warmup_steps=10, min_lr_ratio=0.1), 110) == (
        "cosine: warmup 0->1 over 10 steps, cosine decay to 0.1 over 100")
    assert describe(cfg("constant"), 5) == "constant: constant 1"


def test_simple_schedules_phases():
    assert [phase_of(s, 50, cfg("constant", warmup_steps=2)) for s in (0, 1, 2, 49)] == [
        "warmup", "warmup", "constant", "constant"]
    for name in ("linear", "cosine", "inverse_sqrt"):
        assert [phase_of(s, 50, cfg(name, warmup_steps=2)) for s in (1, 2, 49)] == ["warmup", "decay", "decay"]


def test_a_warmup_as_long_as_the_run_is_warned_about():
    c = cfg("cosine", warmup_steps=20, min_lr_ratio=0.1)
    assert describe(c, 20) == "cosine: warmup 0->1 over 20 steps, no decay"  # not "decay to 0.1 over 0"
    assert lr_multiplier(19, 20, c) == 1.0  # what the warning is about: the peak at the last step
    line = schedule_warning(c, 20)
    assert line.startswith("warning: ") and "warmup_steps=20" in line and "max_steps=20" in line and "\n" not in line
    assert schedule_warning(c, 21) is None and schedule_warning(cfg("cosine"), 5) is None
    assert "overlaps" in schedule_warning(cfg("wsd", warmup_steps=18, decay_fraction=0.2), 20)  # decay: last 4
    assert schedule_warning(cfg("wsd", warmup_steps=10, decay_fraction=0.2), 100) is None
    assert schedule_warning(cfg("anneal", start_ratio=0.5), 5) is None
