"""Batch sources: what the loop trains on, one optimizer step at a time.

A batch source hands each process its `grad_accum` micro-batches for a step, each with the number
of targets its loss averages over (the loop weights micro-batches by it, so the step's loss is
the mean over the whole global batch whatever the split). Its state is saved in every
checkpoint. The default, `PackedBatches`, packs the recipe's text; a method can supply another
(preference pairs: PreferenceBatches, below) through `Method.batch_source`, with the same four members:

    tokens_per_step    input tokens of one global batch (all processes), for the token axis
    targets_known      True when every micro-batch's target count is known in advance: the loop
                       then skips the all-reduce of the counts
    next(step)         -> [(batch dict of CPU tensors, target count)] for this process
    state_dict() / load_state_dict(state)

and optionally `source_tokens()` -> {domain: input tokens so far}, logged with every train event.
A mixture schedule is part of the default source: its phase switches happen in `next(step)` and
the phase reached is in the state, so a resumed run switches at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.data import Mixture, PackedSequences, collate
from tunelab.errors import DataError
from tunelab.train.objectives import WordTable, add_labels, count_targets, sequence_seed, trim_after_last_target


@dataclass
class PackedBatches:
    sets: list[PackedSequences]  # one per training source
    mixture: Mixture
    objective: str
    micro: int
    accum: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    mask_id: int | None = None  # MLM only
    vocab_size: int = 0
    special_ids: list[int] = field(default_factory=list)
    mlm_probability: float = 0.15
    word_table: WordTable | None = None  # MLM whole-word masking (objectives.word_table); None: per token
    domains: list[str] = field(default_factory=list)  # name of each set, for the tokens-per-source metric
    # Mixture schedule: (first step, weight of every set) of each phase after the first, in step order.
    phases: list[tuple[int, list[float]]] = field(default_factory=list)
    phase: int = 0  # phases already switched to

    @property
    def seq_len(self) -> int:
        return self.sets[0].seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.micro * self.accum * self.world * self.seq_len

    @property
    def targets_known(self) -> bool:
        # Causal LM without loss masks: every window has seq_len - 1 targets.
        return self.objective == "clm" and all(s.loss_mask is None for s in self.sets)

    def next(self, step: int) -> list[tuple[dict, int]]:
        """This process's micro-batches of the step's global batch.

        The global batch is drawn in one order that does not depend on the number of processes;
        micro-batch m of rank r is its slice (m * world + r). MLM masks are keyed on each
        sequence's position in the global batch, so they too are independent of the split.
        """
        while self.phase < len(self.phases) and step >= self.phases[self.phase][0]:
            self.mixture.set_weights(self.phases[self.phase][1])
            self.phase += 1
        pairs = self.mixture.take(self.micro * self.accum * self.world)
        out = []
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.micro
            collated = collate([self.sets[s][i] for s, i in pairs[start:start + self.micro]])
            seeds = [sequence_seed(self.seed, step, start + j) for j in range(self.micro)]
            batch = add_labels(collated, self.objective, mask_id=self.mask_id, mlm_probability=self.mlm_probability,
                               vocab_size=self.vocab_size, special_ids=self.special_ids, seeds=seeds,
                               word_table=self.word_table)
            if self.objective == "clm" and "loss_mask" in collated:  # chat rows: drop the all-padding tail
                batch = trim_after_last_target(batch)
            out.append((batch, count_targets(batch, self.objective)))
        return out

    def source_tokens(self) -> dict[str, int]:
        """Input tokens each source has contributed so far, over all processes."""
        return {d: n * self.seq_len for d, n in zip(self.domains, self.mixture.drawn)}

    def state_dict(self) -> dict:
        return {**self.mixture.state_dict(), "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state)
        self.phase = int(state.get("phase", 0))


@dataclass
class PreferenceBatches:
    """Preference pairs, `micro` per micro-batch (data/rows.py collate_pairs: chosen rows, then rejected rows).

    The pairs of all preference sources form one list, shuffled once per epoch by (seed, epoch); step s takes
    the next `micro * accum * world` of that endless order, so what a step trains on is a pure function of the
    step: DDP splits it like PackedBatches (micro-batch m of rank r is slice m * world + r), and a resumed run
    draws what an uninterrupted one would. The loss is a mean over pairs: every micro-batch counts its pairs.
    """
    sets: list  # data.rows.PairSet, one per preference source
    micro: int
    accum: int
    pad_id: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    targets_known: bool = True  # every micro-batch holds `micro` pairs
    last_tokens: int = 0  # input tokens (no padding) of the last global batch drawn, all processes
    drawn: int = 0  # pairs drawn so far (a function of the step; saved so a carried data state is checked)

    def __post_init__(self):
        # Pair id -> (source, pair in it): all sources' pairs in order. A cached reference log-prob is keyed by id.
        self.index = [(s, i) for s, pairs in enumerate(self.sets) for i in range(len(pairs))]
        if not self.index:
            raise DataError("data.train: no preference pairs left to train on (see the warnings above)")
        self._epoch: tuple[int, list[int]] | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.last_tokens

    def pair_at(self, position: int) -> int:
        """The pair id at a position of the endless shuffled order."""
        import numpy as np

        epoch, offset = divmod(position, len(self.index))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index)).tolist())
        return self._epoch[1][offset]

    def global_batch(self, step: int) -> list[int]:
        size = self.micro * self.accum * self.world
        return [self.pair_at(p) for p in range(step * size, (step + 1) * size)]

    def pair(self, pair_id: int):
        source, i = self.index[pair_id]
        return self.sets[source][i]

    def micro_batch_ids(self, step: int) -> list[list[int]]:
        """The pair ids of this process's micro-batches at `step` (draws nothing: the state stays)."""
        ids = self.global_batch(step)
        starts = [(m * self.world + self.rank) * self.micro for m in range(self.accum)]
        return [ids[start:start + self.micro] for start in starts]

    def collate(self, pair_ids: list[int]) -> dict:
        import torch

        from tunelab.data.rows import collate_pairs

        rows = collate_pairs([self.pair(p) for p in pair_ids], self.pad_id)
        batch = {k: torch.from_numpy(v) for k, v in rows.items()}
        batch["pair_id"] = torch.tensor(pair_ids, dtype=torch.int64)
        return batch

    def next(self, step: int) -> list[tuple[dict, int]]:
        ids = self.global_batch(step)
        self.last_tokens = sum(self.sets[s].tokens_of(i) for s, i in (self.index[p] for p in ids))
        self.drawn = (step + 1) * len(ids)
        return [(self.collate(mine), len(mine)) for mine in self.micro_batch_ids(step)]

    def state_dict(self) -> dict:
        return {"preference_pairs_drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if "preference_pairs_drawn" not in state:
            raise DataError("init_data_state: the run carried from did not train on preference pairs; its data state "
                            "does not apply (set init_data_state: false)")
        self.drawn = int(state["preference_pairs_drawn"])
