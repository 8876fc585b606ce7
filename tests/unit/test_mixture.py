"""The weighted, seeded, resumable interleaving of sources."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tunelab.data import Mixture
from tunelab.errors import RunDirError


@pytest.mark.parametrize("weights", [[3, 1], [0.5, 0.3, 0.2], [1, 1, 1, 5]])
def test_every_prefix_is_within_one_of_the_exact_shares(weights):
    mixture = Mixture([50, 70, 30, 20][:len(weights)], weights, seed=0)
    counts = [0] * len(weights)
    for n, (source, _) in enumerate(mixture.take(4000), 1):
        counts[source] += 1
        for s, w in enumerate(weights):
            assert abs(counts[s] - n * w / sum(weights)) <= 1, (n, counts)
    assert mixture.state_dict()["drawn"] == counts


def test_three_to_one_is_exact_over_4000_draws():
    pairs = Mixture([100, 100], [3, 1], seed=1).take(4000)
    assert Counter(s for s, _ in pairs) == {0: 3000, 1: 1000}
    assert [s for s, _ in pairs[:8]] == [0, 0, 1, 0, 0, 0, 1, 0]  # ties go to the lowest index


def test_each_epoch_visits_every_sequence_once_in_a_new_order():
    mixture = Mixture([7, 5], [1, 1], seed=3)
    pairs = mixture.take(7 * 2 * 4)  # 4 epochs of source 0, 5.6 of source 1
    seen0 = [i for s, i in pairs if s == 0]
    epochs = [seen0[k:k + 7] for k in range(0, 28, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert epochs[0] == np.random.default_rng([3, 0, 0]).permutation(7).tolist()
    seen1 = [i for s, i in pairs if s == 1]
    assert all(sorted(seen1[k:k + 5]) == list(range(5)) for k in range(0, 25, 5))


def test_same_inputs_same_order_and_seed_matters():
    assert Mixture([10, 20], [1, 2], seed=5).take(100) == Mixture([10, 20], [1, 2], seed=5).take(100)
    assert Mixture([10, 20], [1, 2], seed=5).take(100) != Mixture([10, 20], [1, 2], seed=6).take(100)


@pytest.mark.parametrize("k", [0, 1, 13, 250, 399])
def test_resume_from_state_continues_exactly(k):
    uninterrupted = Mixture([9, 31, 4], [2, 1, 0.5], seed=7)
    expected = uninterrupted.take(400)[k:]
    first = Mixture([9, 31, 4], [2, 1, 0.5], seed=7)
    first.take(k)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = Mixture([9, 31, 4], [2, 1, 0.5], seed=7)
    resumed.load_state_dict(state)
    assert resumed.take(400 - k) == expected


def test_take_in_pieces_equals_take_at_once():
    whole = Mixture([6, 8], [1, 3], seed=2).take(90)
    pieces = Mixture([6, 8], [1, 3], seed=2)
    assert pieces.take(1) + pieces.take(40) + pieces.take(0) + pieces.take(49) == whole


def test_state_from_different_data_is_refused():
    mixture = Mixture([10, 20], [1, 1], seed=0)
    with pytest.raises(RunDirError, match="same data"):
        mixture.load_state_dict({"drawn": [3, 4], "sizes": [10, 21]})


def test_bad_arguments():
    with pytest.raises(ValueError):
        Mixture([10], [1, 2], seed=0)
    with pytest.raises(ValueError):
        Mixture([0, 5], [1, 1], seed=0)
    assert len(Mixture([5], [1], seed=-1).take(3)) == 3  # negative seeds work too
