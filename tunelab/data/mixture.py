"""Deterministic weighted interleaving of several sources; its whole state is a few integers.

Each draw picks the source furthest behind its target share, the largest
`w_s / sum(w) * (n + 1) - drawn_s` after n draws (ties: the lowest index), so after any number
of draws every source's count is within 1 of its exact share: exact proportions with no RNG
drift, even over short spans. Within a source, sequences are visited in a seeded permutation per
epoch, `np.random.default_rng([seed, s, epoch])`, a new one each time the source is used up.
The order is a pure function of (sizes, weights, seed, drawn counts), so loading `state_dict()`
saved after k draws continues with exactly the pairs an uninterrupted run would have drawn.

`set_weights` starts a new phase (a mixture schedule): from then on the shares are counted from
the draws made since the switch, so the new proportions hold exactly from the switch on instead
of first paying back the old phase's deficits. Weights, phase start and counts are the state.
"""

from __future__ import annotations

import numpy as np

from tunelab.errors import RunDirError


class Mixture:
    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or len(sizes) != len(weights):
            raise ValueError(f"need one weight per source and at least one source (sizes {sizes}, weights {weights})")
        if min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"every source needs at least one sequence and a positive weight "
                             f"(sizes {sizes}, weights {weights})")
        self.sizes = [int(s) for s in sizes]
        self.weights = [float(w) for w in weights]
        self.total_weight = sum(self.weights)
        self.seed = int(seed) % 2**64  # SeedSequence wants non-negative entropy
        self.drawn = [0] * len(sizes)
        self.phase_start = [0] * len(sizes)  # drawn counts when the current weights took effect
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def _next_source(self) -> int:
        # Deficits scaled by sum(w): no division, so integer weights compare exactly (clean ties).
        since = [d - s for d, s in zip(self.drawn, self.phase_start)]
        n = sum(since) + 1
        deficits = [w * n - d * self.total_weight for w, d in zip(self.weights, since)]
        return deficits.index(max(deficits))  # index() finds the first: ties go to the lowest index

    def set_weights(self, weights: list[float]) -> None:
        """New weights from the next draw on (a weight of 0 drops a source until a later phase)."""
        if len(weights) != len(self.sizes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one weight >= 0 per source, at least one positive (got {weights})")
        self.weights = [float(w) for w in weights]
        self.total_weight = sum(self.weights)
        self.phase_start = list(self.drawn)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])
            cached = self._perms[source] = (epoch, perm)
        return cached[1]

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n (source index, sequence index) pairs."""
        pairs = []
        for _ in range(n):
            source = self._next_source()
            epoch, offset = divmod(self.drawn[source], self.sizes[source])
            pairs.append((source, int(self._permutation(source, epoch)[offset])))
            self.drawn[source] += 1
        return pairs

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "sizes": list(self.sizes), "weights": list(self.weights),
                "phase_start": list(self.phase_start)}

    def load_state_dict(self, state: dict) -> None:
        sizes = state.get("sizes", self.sizes)
        if list(sizes) != self.sizes or len(state["drawn"]) != len(self.sizes):
            raise RunDirError(f"the checkpoint's data has {list(sizes)} sequences per source but this recipe's "
                              f"data has {self.sizes}: resume with the same data sources and data.seq_len")
        self.drawn = [int(d) for d in state["drawn"]]
        if "weights" in state:  # checkpoints before mixture schedules had neither: one phase from step 0
            self.weights = [float(w) for w in state["weights"]]
            self.total_weight = sum(self.weights)
            self.phase_start = [int(d) for d in state["phase_start"]]
