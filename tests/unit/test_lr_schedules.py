"""Every schedule's value at chosen steps, against numbers worked out by hand."""

import math

import pytest

from tunelab.config import ScheduleConfig
from tunelab.train.schedules import SCHEDULES, lr_multiplier


def at(name, step, total=110, **kw):
    return lr_multiplier(step, total, ScheduleConfig(name=name, **kw))


def test_warmup_is_linear_for_every_schedule():
    for name in SCHEDULES:
        assert at(name, 0, warmup_steps=10) == pytest.approx(0.1), name
        assert at(name, 4, warmup_steps=10) == pytest.approx(0.5), name
        assert at(name, 9, warmup_steps=10) == pytest.approx(1.0), name


def test_cosine_values():
    kw = dict(warmup_steps=10, min_lr_ratio=0.1)
    assert at("cosine", 10, **kw) == pytest.approx(1.0)
    # post-warmup span is total - warmup - 1 = 99 steps: the midpoint is step 10 + 49.5
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    assert at("cosine", 59, **kw) == pytest.approx(mid)
    assert at("cosine", 109, **kw) == pytest.approx(0.1)
    values = [at("cosine", s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_values():
    kw = dict(warmup_steps=0, min_lr_ratio=0.0)
    assert at("linear", 0, total=101, **kw) == pytest.approx(1.0)
    assert at("linear", 50, total=101, **kw) == pytest.approx(0.5)
    assert at("linear", 100, total=101, **kw) == pytest.approx(0.0)


def test_constant_after_warmup():
    assert [at("constant", s, warmup_steps=2) for s in (0, 1, 2, 50, 109)] == pytest.approx([0.5, 1, 1, 1, 1])


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    kw = dict(warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)  # 100 steps: decay over the last 20
    assert at("wsd", 10, total=100, **kw) == 1.0
    assert at("wsd", 79, total=100, **kw) == 1.0
    assert at("wsd", 80, total=100, **kw) == pytest.approx(1 - 1 / 20)
    assert at("wsd", 89, total=100, **kw) == pytest.approx(0.5)
    assert at("wsd", 99, total=100, **kw) == pytest.approx(0.0)


def test_inverse_sqrt():
    kw = dict(warmup_steps=16, min_lr_ratio=0.1)
    assert at("inverse_sqrt", 16, total=10_000, **kw) == pytest.approx(1.0)
    assert at("inverse_sqrt", 64, total=10_000, **kw) == pytest.approx(0.5)
    assert at("inverse_sqrt", 400, total=10_000, **kw) == pytest.approx(0.2)
    assert at("inverse_sqrt", 9_999, total=10_000, **kw) == pytest.approx(0.1)  # floored
