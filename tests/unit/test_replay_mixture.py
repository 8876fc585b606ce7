"""Mixture schedules and replay: Mixture.set_weights (a new phase counted from the switch), PackedBatches
phases (the switch happens exactly at its step, and a resumed copy draws the same batches across it),
and mixture_plan (replay takes exactly `fraction` of every phase; measured shares stay within one sequence)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tunelab.recipe import validate_recipe
from tunelab.data import Mixture, PackedSequences
from tunelab.stages.training_data import TrainingData, mixture_plan
from tunelab.train.batches import PackedBatches

EPS = 1e-9  # float slack on the exact "within one sequence" bound


def shares_ok(counts: list[int], n: int, weights: list[float]) -> bool:
    total = sum(weights)
    return all(abs(c - n * w / total) <= 1 + EPS for c, w in zip(counts, weights))


# ---------------------------------------------------------------- Mixture.set_weights


@pytest.mark.parametrize("new", [[1, 2, 5], [0, 1, 3], [0.7, 0, 0.3], [4, 1, 1]])
@pytest.mark.parametrize("before", [0, 1, 37])
def test_counts_since_the_switch_follow_the_new_shares_after_every_draw(new, before):
    mixture = Mixture([11, 7, 5], [3, 1, 1], seed=4)
    mixture.take(before)
    at_switch = list(mixture.drawn)
    mixture.set_weights(new)
    since = [0, 0, 0]
    for n, (source, _) in enumerate(mixture.take(600), 1):
        since[source] += 1
        assert shares_ok(since, n, new), (n, since)
    assert [d - a for d, a in zip(mixture.drawn, at_switch)] == since
    assert all(c == 0 for c, w in zip(since, new) if w == 0)  # a weight of 0 drops the source entirely


def test_the_old_phase_deficit_is_not_paid_back():
    # 10 draws at [1, 1] then [1, 1] again: a plain mixture would be at 5/5 either way. But after [3, 1]
    # for 8 draws (6/2) a switch to [1, 1] must alternate from the switch on, not give source 1 the next
    # two draws to catch up with an overall 50/50.
    mixture = Mixture([50, 50], [3, 1], seed=0)
    assert [s for s, _ in mixture.take(8)] == [0, 0, 1, 0, 0, 0, 1, 0]
    mixture.set_weights([1, 1])
    assert [s for s, _ in mixture.take(6)] == [0, 1, 0, 1, 0, 1]  # ties go to the lowest index


def test_sequences_within_a_source_continue_their_epoch_permutation_across_a_switch():
    seed, sizes = 9, [5, 3, 4]
    mixture = Mixture(sizes, [1, 1, 1], seed=seed)
    pairs = mixture.take(13)
    mixture.set_weights([0, 2, 1])
    pairs += mixture.take(20)
    mixture.set_weights([1, 0, 3])
    pairs += mixture.take(20)
    for s, size in enumerate(sizes):
        seen = [i for src, i in pairs if src == s]
        expected = np.concatenate([np.random.default_rng([seed, s, e]).permutation(size)
                                   for e in range(len(seen) // size + 1)])[:len(seen)]
        assert seen == expected.tolist(), s


@pytest.mark.parametrize("k", [0, 1, 5, 23, 99])
def test_state_dict_mid_phase_continues_identically(k):
    def fresh():  # what a resumed run builds from the recipe: the step-0 weights
        return Mixture([9, 13, 4], [2, 1, 0.5], seed=3)

    uninterrupted = fresh()
    uninterrupted.take(17)
    uninterrupted.set_weights([0, 3, 1])
    expected = uninterrupted.take(100)[k:]

    first = fresh()
    first.take(17)
    first.set_weights([0, 3, 1])
    first.take(k)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["weights"] == [0, 3, 1] and state["phase_start"] == first.phase_start
    resumed = fresh()
    resumed.load_state_dict(state)
    assert resumed.weights == [0.0, 3.0, 1.0]
    assert resumed.take(100 - k) == expected


def test_set_weights_refuses_bad_weights():
    mixture = Mixture([3, 3], [1, 1], seed=0)
    for bad in ([1], [1, 1, 1], [-1, 2], [0, 0]):
        with pytest.raises(ValueError):
            mixture.set_weights(bad)
    assert mixture.weights == [1.0, 1.0] and mixture.phase_start == [0, 0]  # a refused call changes nothing


# ---------------------------------------------------------------- PackedBatches phases

SEQ = 8


def marked_sets(sizes=(6, 5, 9)) -> list[PackedSequences]:
    """Source s holds tokens 100*s + 10 .. 100*s + 99: any token tells which source a row came from."""
    rng = np.random.default_rng(1)
    return [PackedSequences(rng.integers(100 * s + 10, 100 * s + 100, size=n * SEQ).astype(np.int32), SEQ,
                            eos_id=0, document_mask=False) for s, n in enumerate(sizes)]


PHASES = [(3, [0.0, 0.0, 1.0]), (5, [1.0, 3.0, 0.0])]


def batches(phases=PHASES, micro=2, accum=2, seed=5) -> PackedBatches:
    sets = marked_sets()
    return PackedBatches(sets=sets, mixture=Mixture([len(s) for s in sets], [1, 1, 1], seed), objective="clm",
                         micro=micro, accum=accum, seed=seed, domains=["a", "b", "c"], phases=list(phases))


def step_rows(src: PackedBatches, step: int) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b, _ in src.next(step)])


def test_phases_switch_exactly_at_their_step():
    src = batches()
    expected = Mixture([6, 5, 9], [1, 1, 1], seed=5)  # the same draws, switched by hand
    sets = marked_sets()
    for step in range(9):
        for at, weights in PHASES:
            if step == at:
                expected.set_weights(weights)
        rows = step_rows(src, step)
        want = torch.stack([torch.from_numpy(sets[s][i]["input_ids"]) for s, i in expected.take(4)])
        assert torch.equal(rows, want), step
        sources = sorted(set((rows[:, 0] // 100).tolist()))
        if step < 3:
            assert len(sources) > 1, (step, sources)  # [1, 1, 1]: mixed
        elif step < 5:
            assert sources == [2], step  # only c, from step 3 on, not a step earlier or later
        else:
            assert 2 not in sources, step
    assert src.phase == 2 and src.state_dict()["phase"] == 2
    assert src.mixture.weights == [1.0, 3.0, 0.0]
    # Counted from the switch at step 5: 4 steps x 4 rows at [1, 3] -> exactly 4 a and 12 b.
    since = [d - p for d, p in zip(src.mixture.drawn, src.mixture.phase_start)]
    assert since == [4, 12, 0]
    assert src.source_tokens() == {d: n * SEQ for d, n in zip("abc", src.mixture.drawn)}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
def test_a_resumed_copy_draws_the_same_batches_across_a_switch(k):
    run = batches()
    for step in range(k):
        run.next(step)
    state = json.loads(json.dumps(run.state_dict()))  # the checkpoint after step k
    expected = [step_rows(run, step) for step in range(k, 10)]
    resumed = batches()  # built from the recipe: phase 0, step-0 weights
    resumed.load_state_dict(state)
    assert resumed.phase == state["phase"] == sum(at <= k - 1 for at, _ in PHASES)
    got = [step_rows(resumed, step) for step in range(k, 10)]
    for step, (g, e) in enumerate(zip(got, expected), k):
        assert torch.equal(g, e), step
    assert resumed.state_dict() == run.state_dict()


def test_two_phases_at_the_same_step_apply_in_order():
    src = batches(phases=[(2, [0.0, 0.0, 1.0]), (2, [0.0, 1.0, 0.0])])
    for step in range(2):
        src.next(step)
    assert set((step_rows(src, 2)[:, 0] // 100).tolist()) == {1}
    assert src.phase == 2


# ---------------------------------------------------------------- mixture_plan with replay


def plan_recipe(fraction: float | None, schedule=(), max_steps: int = 40, train_weights=(3, 1, 2)):
    data = {"train": [{"source": f"/data/{n}.txt", "weight": w} for n, w in zip("abc", train_weights)],
            "mixture_schedule": [dict(p) for p in schedule]}
    if fraction is not None:
        data["replay"] = {"sources": [{"source": "/old/r1.txt", "weight": 1}, {"source": "/old/r2.txt", "weight": 3}],
                          "fraction": fraction}
    cfg = validate_recipe({"model": {"preset": "llama-micro"}, "data": data, "train": {"max_steps": max_steps}},
                          "test recipe")
    replay = [SimpleNamespace(spec=s, domain=s.domain) for s in (cfg.data.replay.sources if cfg.data.replay else [])]
    return cfg, TrainingData(sets=[], sources=[], eval_sources=[], replay_sources=replay)


SCHEDULE = [{"at": 0.5, "weights": {"a": 0}}, {"at": 0.75, "weights": {"b": 5, "c": 0}}]


@pytest.mark.parametrize("f", [0.01, 0.05, 0.25, 0.9])
def test_replay_takes_exactly_its_fraction_in_every_phase(f):
    cfg, data = plan_recipe(f, SCHEDULE)
    weights, phases = mixture_plan(cfg, data)
    assert [at for at, _ in phases] == [20, 30]  # round(at * max_steps)
    expected = [
        [(1 - f) * 3 / 6, (1 - f) * 1 / 6, (1 - f) * 2 / 6, f / 4, 3 * f / 4],
        [0, (1 - f) * 1 / 3, (1 - f) * 2 / 3, f / 4, 3 * f / 4],  # a: 0, the others share 1 - f as 1 : 2
        [0, 1 - f, 0, f / 4, 3 * f / 4],  # a stays 0 (phases accumulate), b: 5, c: 0
    ]
    for got, want in zip([weights] + [w for _, w in phases], expected):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert sum(got) == pytest.approx(1.0, rel=1e-12)
        assert sum(got[3:]) == pytest.approx(f, rel=1e-12)  # replay share: exactly f in every phase


def test_without_replay_the_plan_is_the_recipe_weights():
    cfg, data = plan_recipe(None, SCHEDULE)
    weights, phases = mixture_plan(cfg, data)
    assert weights == pytest.approx([0.5, 1 / 6, 1 / 3], rel=1e-12)
    assert [(at, pytest.approx(w, rel=1e-12)) for at, w in phases] == [(20, [0, 1 / 3, 2 / 3]), (30, [0, 1, 0])]


@pytest.mark.parametrize("f", [0.01, 0.05, 0.25])
def test_measured_replay_share_is_within_one_sequence_per_source(f):
    """Global batch 8 (micro 4 x accum 2), 400 steps: after every step each source's cumulative count, and so
    the tokens logged per source, is within one sequence of its planned share; replay within one per source."""
    cfg, data = plan_recipe(f, train_weights=(3, 1, 2))
    weights, _ = mixture_plan(cfg, data)
    rng = np.random.default_rng(0)
    sets = [PackedSequences(rng.integers(1, 50, size=n * SEQ).astype(np.int32), SEQ, 0, False)
            for n in (13, 7, 11, 5, 3)]
    src = PackedBatches(sets=sets, mixture=Mixture([len(s) for s in sets], weights, 11), objective="clm", micro=4,
                        accum=2, domains=["a", "b", "c", "r1", "r2"])
    for step in range(400):
        src.next(step)
        n = 8 * (step + 1)
        tokens = src.source_tokens()
        counts = [tokens[d] // SEQ for d in ("a", "b", "c", "r1", "r2")]
        assert sum(counts) == n
        assert shares_ok(counts, n, weights), (step, counts)
        assert abs(counts[3] + counts[4] - f * n) <= 2 + EPS, (step, counts)
    assert counts[3] + counts[4] == pytest.approx(f * n, abs=2)
    if f == 0.25:  # 2 of every 8 exactly
        assert counts[3] + counts[4] == 800


def test_replay_share_holds_from_a_mixture_schedule_switch_on():
    f = 0.05
    cfg, data = plan_recipe(f, SCHEDULE, max_steps=200)
    weights, phases = mixture_plan(cfg, data)
    sets = [PackedSequences(np.arange(1, n * SEQ + 1).astype(np.int32), SEQ, 0, False) for n in (13, 7, 11, 5, 3)]
    src = PackedBatches(sets=sets, mixture=Mixture([len(s) for s in sets], weights, 2), objective="clm", micro=4,
                        accum=2, domains=["a", "b", "c", "r1", "r2"], phases=phases)
    starts = [0] + [at for at, _ in phases]
    plans = [weights] + [w for _, w in phases]
    for step in range(200):
        src.next(step)
        phase = sum(at <= step for at in starts) - 1
        since = [d - p for d, p in zip(src.mixture.drawn, src.mixture.phase_start)]
        n = 8 * (step + 1 - starts[phase])
        assert sum(since) == n
        assert shares_ok(since, n, plans[phase]), (step, since)
        assert abs(since[3] + since[4] - f * n) <= 2 + EPS, (step, since)
    assert src.phase == 2
