"""Fixed-length training sequences over a flat token stream (documents separated by EOS).

Window i is tokens[i*seq_len:(i+1)*seq_len]; the tail that does not fill a window is dropped.
With `document_mask`, position ids restart after every EOS; transformers turns restarting
position ids (with no attention mask) into a block-diagonal causal mask, so attention stays
inside each document while the packing stays dense.
"""

from __future__ import annotations

import numpy as np
import torch


def document_position_ids(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """0,1,2,... restarting at the token after each EOS (the EOS closes the previous document)."""
    n = len(ids)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = ids[:-1] == eos_id
    start_index = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n, dtype=np.int64) - start_index


class PackedSequences:
    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, document_mask: bool):
        self.tokens, self.seq_len, self.eos_id, self.document_mask = tokens, seq_len, eos_id, document_mask

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len], dtype=np.int64)
        sample = {"input_ids": ids}
        if self.document_mask:
            sample["position_ids"] = document_position_ids(ids, self.eos_id)
        return sample


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
