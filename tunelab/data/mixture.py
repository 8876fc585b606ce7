"""Deterministic weighted interleaving of several sources; its whole state is a few integers.

Each draw picks the source furthest behind its target share (largest `w_s * (n+1) - drawn_s`),
so after n draws every source's count is within 1 of `n * w_s`: exact proportions with no RNG
drift. Within a source, sequences are visited in a seeded permutation per epoch, a new one each
time the source is exhausted. The order is a pure function of (sizes, weights, seed, state),
so saving `state_dict()` after k draws and loading it continues with the very same sequences.
"""

from __future__ import annotations

import numpy as np


class Mixture:
    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source, at least one source")
        if min(sizes) <= 0:
            raise ValueError("every source needs at least one sequence")
        total = float(sum(weights))
        self.sizes = list(sizes)
        self.shares = [w / total for w in weights]
        self.seed = seed
        self.drawn = [0] * len(sizes)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])
            self._perms[source] = cached = (epoch, perm)
        return cached[1]

    def take(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            total = sum(self.drawn)
            deficits = [share * (total + 1) - drawn for share, drawn in zip(self.shares, self.drawn)]
            source = int(np.argmax(deficits))  # ties: lowest index
            epoch, offset = divmod(self.drawn[source], self.sizes[source])
            out.append((source, int(self._permutation(source, epoch)[offset])))
            self.drawn[source] += 1
        return out

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sizes", self.sizes) != self.sizes:
            from tunelab.errors import RunDirError

            raise RunDirError(f"the checkpoint's data has {state['sizes']} sequences per source but the recipe's "
                              f"data has {self.sizes}: resume with the same data and data.seq_len")
        self.drawn = list(state["drawn"])
