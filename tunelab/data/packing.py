"""Fixed-length training sequences over one flat token array (documents separated by EOS).

Window i is tokens[i*seq_len:(i+1)*seq_len]; the tail that does not fill a window is dropped.
With `document_mask`, position ids restart at 0 after every EOS (the EOS itself closes the
previous document). When attention_mask is None, HF transformers turns restarting position ids
into a block-diagonal causal mask, so attention stays inside each document while packing stays
dense: that is `data.packing: document`. Only without a KV cache, though: the forward pass must
get use_cache=False (transformers 5.23 skips the detection when a cache exists, and a Llama
model creates one by default even in train mode; tests/unit/test_packing.py checks this).

With `loss_mask` (uint8, aligned with the tokens; the token cache keeps one for sources with masked
segments), each sample also has "loss_mask", the window's slice: 1 where the token is a training
target, 0 where it is only context.
"""

from __future__ import annotations

import numpy as np
import torch


def document_position_ids(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """0, 1, 2, ... restarting at the token after each EOS."""
    n = len(ids)
    starts = np.zeros(n, dtype=bool)
    starts[:1] = True
    starts[1:] = ids[:-1] == eos_id
    last_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n, dtype=np.int64) - last_start


class PackedSequences:
    """Window i = tokens[i*seq_len:(i+1)*seq_len] as int64 `input_ids` (+ `position_ids`, `loss_mask`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, document_mask: bool,
                 loss_mask: np.ndarray | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
        self.tokens, self.seq_len, self.eos_id, self.document_mask = tokens, seq_len, eos_id, document_mask
        self.loss_mask = loss_mask

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range (0..{len(self) - 1})")
        window = slice(i * self.seq_len, (i + 1) * self.seq_len)
        ids = np.asarray(self.tokens[window], dtype=np.int64)
        sample = {"input_ids": ids}
        if self.document_mask:
            sample["position_ids"] = document_position_ids(ids, self.eos_id)
        if self.loss_mask is not None:
            sample["loss_mask"] = np.asarray(self.loss_mask[window], dtype=np.int64)
        return sample


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into int64 tensors, one per key. A batch that mixes sources with and without loss
    masks (a chat source and plain text) gives the unmasked ones a mask of ones: all targets."""
    if any("loss_mask" in s for s in samples) and not all("loss_mask" in s for s in samples):
        samples = [s if "loss_mask" in s else {**s, "loss_mask": np.ones_like(s["input_ids"])} for s in samples]
    return {key: torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64, copy=False))
            for key in samples[0]}
