"""The default batch source (tunelab/train/batches.py): one global batch, whatever the process split.

A global batch is drawn in one order; each process takes its slice, and MLM masks are keyed on a
sequence's position in the global batch. So the concatenation of every rank's micro-batches, in
global order, must not depend on world size, micro-batch size or gradient accumulation, at any step
and after a state_dict round trip (the resume path).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tunelab.data import Mixture, PackedSequences
from tunelab.train.batches import PackedBatches
from tunelab.train.objectives import count_targets

VOCAB, EOS, MASK = 120, 0, 2
SPECIAL = [0, 1, 2]
SEQ = 16
GLOBAL = 4  # sequences per optimizer step


def token_sets(loss_mask: bool = False) -> list[PackedSequences]:
    """Two sources (a mixture), with EOS separators sprinkled in."""
    rng = np.random.default_rng(0)
    out = []
    for n_windows in (13, 7):
        tokens = rng.integers(3, VOCAB, size=n_windows * SEQ + 5).astype(np.int32)
        tokens[::11] = EOS
        extra = {}
        if loss_mask:
            extra["loss_mask"] = (rng.random(len(tokens)) < 0.6).astype(np.uint8)
        out.append(PackedSequences(tokens, SEQ, EOS, document_mask=True, **extra))
    return out


def source(objective: str, micro: int, accum: int = 1, rank: int = 0, world: int = 1, seed: int = 5,
           sets=None) -> PackedBatches:
    sets = sets if sets is not None else token_sets()
    return PackedBatches(sets=sets, mixture=Mixture([len(s) for s in sets], [2.0, 1.0], seed), objective=objective,
                         micro=micro, accum=accum, rank=rank, world=world, seed=seed,
                         mask_id=MASK if objective == "mlm" else None, vocab_size=VOCAB, special_ids=SPECIAL,
                         mlm_probability=0.3)


def global_batch(sources: list[PackedBatches], step: int) -> tuple[dict, list[int]]:
    """Every rank's micro-batches for one step, put back into global order, and their target counts.

    Micro-batch m of rank r holds global rows (m * world + r) * micro ... + micro.
    """
    world, accum = sources[0].world, sources[0].accum
    per_rank = [s.next(step) for s in sources]
    assert all(len(mb) == accum for mb in per_rank)
    pieces, counts = [], []
    for m in range(accum):
        for r in range(world):
            batch, count = per_rank[r][m]
            pieces.append(batch)
            counts.append(count)
    keys = pieces[0].keys()
    assert all(p.keys() == keys for p in pieces)
    return {k: torch.cat([p[k] for p in pieces]) for k in keys}, counts


SPLITS = [  # (micro, accum, world): each gives a global batch of 4
    (4, 1, 1), (2, 1, 2), (2, 2, 1), (1, 2, 2), (1, 4, 1), (1, 1, 4),
]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_global_batches_do_not_depend_on_the_split(objective):
    reference = source(objective, micro=4)
    splits = {split: [source(objective, micro=split[0], accum=split[1], rank=r, world=split[2])
                      for r in range(split[2])] for split in SPLITS[1:]}
    for step in range(6):  # several steps: the mixture wraps the smaller source (7 windows) into a new epoch
        expected, expected_counts = global_batch([reference], step)
        assert expected["input_ids"].shape == (GLOBAL, SEQ)
        if objective == "mlm":
            assert (expected["labels"] != -100).any() and (expected["input_ids"] == MASK).any()
        for split, ranks in splits.items():
            got, counts = global_batch(ranks, step)
            assert got.keys() == expected.keys(), split
            for key in expected:
                assert torch.equal(got[key], expected[key]), (split, step, key)
            assert sum(counts) == sum(expected_counts), (split, step)


def test_mlm_masks_after_a_state_dict_round_trip_continue_exactly():
    # The resume path: a fresh source (another process split, even) loaded with the state after step 2.
    run = source("mlm", micro=4)
    for step in range(3):
        run.next(step)
    state = run.state_dict()
    later = [global_batch([run], step)[0] for step in (3, 4)]
    for micro, accum, world in [(4, 1, 1), (2, 1, 2), (1, 2, 2)]:
        ranks = [source("mlm", micro=micro, accum=accum, rank=r, world=world) for r in range(world)]
        for s in ranks:
            s.load_state_dict(state)
        for step, expected in zip((3, 4), later):
            got = global_batch(ranks, step)[0]
            for key in expected:
                assert torch.equal(got[key], expected[key]), (micro, accum, world, step, key)


def test_mlm_masks_are_keyed_on_step_and_seed():
    # Same windows (fresh sources), different step or run seed: different masks; same: identical.
    def first(step, seed=5):
        return source("mlm", micro=4, seed=seed).next(step)[0][0]

    a, b = first(0), first(0)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(first(1)["labels"], a["labels"])
    # Another run seed with the very same windows (the mixture keeps seed 5): other masks.
    other_seed = PackedBatches(sets=token_sets(), mixture=Mixture([13, 7], [2.0, 1.0], 5), objective="mlm", micro=4,
                               accum=1, seed=6, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                               mlm_probability=0.3).next(0)[0][0]
    assert not torch.equal(other_seed["labels"], a["labels"])


def test_mlm_counts_are_the_chosen_positions_and_unknown_in_advance():
    src = source("mlm", micro=2, accum=2)
    assert src.targets_known is False
    counts = []
    for batch, count in src.next(0):
        assert count == int((batch["labels"] != -100).sum()) == count_targets(batch, "mlm")
        assert "position_ids" not in batch  # BERT: absolute positions per window
        assert not torch.isin(batch["labels"][batch["labels"] != -100], torch.tensor(SPECIAL)).any()
        counts.append(count)
    assert len(set(counts)) > 1 or counts[0] > 0  # random counts (differ per micro-batch in general)


def test_clm_without_masks_has_known_counts():
    src = source("clm", micro=2, accum=3)
    assert src.targets_known is True
    assert src.tokens_per_step == 2 * 3 * 1 * SEQ
    assert source("clm", micro=2, accum=3, world=2).tokens_per_step == 2 * 3 * 2 * SEQ
    for batch, count in src.next(0):
        assert count == 2 * (SEQ - 1)  # no target for the first position of a window
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert "position_ids" in batch  # document packing restarts positions after EOS


def test_loss_mask_turns_into_minus_100_labels():
    sets = token_sets(loss_mask=True)
    src = source("clm", micro=2, accum=2, sets=sets)
    assert src.targets_known is False  # counts vary with the masks
    # Which windows were drawn: replay the same mixture.
    pairs = Mixture([len(s) for s in sets], [2.0, 1.0], 5).take(4)
    for m, (batch, count) in enumerate(src.next(0)):
        assert "loss_mask" not in batch
        for row in range(2):
            s, i = pairs[m * 2 + row]
            mask = np.asarray(sets[s].loss_mask[i * SEQ:(i + 1) * SEQ]).astype(bool)
            ids = np.asarray(sets[s].tokens[i * SEQ:(i + 1) * SEQ], dtype=np.int64)
            expected = np.where(mask, ids, -100)
            assert np.array_equal(batch["labels"][row].numpy(), expected), (m, row)
            assert np.array_equal(batch["input_ids"][row].numpy(), ids)
        mask_rows = [np.asarray(sets[s].loss_mask[i * SEQ:(i + 1) * SEQ]) for s, i in pairs[m * 2:m * 2 + 2]]
        assert count == sum(int(r[1:].sum()) for r in mask_rows)


def test_loss_mask_with_mlm_never_masks_context_tokens():
    sets = token_sets(loss_mask=True)
    src = source("mlm", micro=4, sets=sets)
    pairs = Mixture([len(s) for s in sets], [2.0, 1.0], 5).take(4)
    (batch, count), = src.next(0)
    for row, (s, i) in enumerate(pairs):
        context = ~np.asarray(sets[s].loss_mask[i * SEQ:(i + 1) * SEQ]).astype(bool)
        assert (batch["labels"][row].numpy()[context] == -100).all()
        ids = np.asarray(sets[s].tokens[i * SEQ:(i + 1) * SEQ], dtype=np.int64)
        assert np.array_equal(batch["input_ids"][row].numpy()[context], ids[context])  # context left as is
    assert count == int((batch["labels"] != -100).sum()) > 0
