"""Turn packed token windows into model inputs with labels, per training objective.

Labels follow HF's convention: -100 is not a target, and causal models shift labels inside the
model (label t is predicted from tokens < t). A window's `loss_mask` (from the token cache:
1 = target) turns masked tokens into -100, in training and evaluation alike.
"""

from __future__ import annotations

import hashlib

import torch


def sequence_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is not stable across processes)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def add_labels(batch: dict[str, torch.Tensor], objective: str, *, mask_id: int | None = None,
               mlm_probability: float = 0.15, vocab_size: int = 0, special_ids: list[int] | None = None,
               seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
    """clm: labels = inputs. mlm: BERT's 80/10/10 masking, row i drawn from a generator seeded by seeds[i].

    MLM masks are keyed per sequence (the loop passes a seed from the run seed, the step and the
    sequence's position in the global batch), so they are the same for any number of processes
    or micro-batch split, and a resumed run draws the same masks without any saved RNG state.
    """
    batch = dict(batch)
    loss_mask = batch.pop("loss_mask", None)
    ids = batch["input_ids"]
    if objective == "clm":
        labels = ids.clone()
        if loss_mask is not None:
            labels[loss_mask == 0] = -100
        return {**batch, "labels": labels}
    if mask_id is None:
        raise ValueError("mlm needs a mask token")
    if seeds is None or len(seeds) != ids.shape[0]:
        raise ValueError("mlm needs one seed per sequence")
    prob = torch.full(ids.shape, mlm_probability)
    if special_ids:
        prob[torch.isin(ids, torch.tensor(special_ids))] = 0.0
    if loss_mask is not None:
        prob[loss_mask == 0] = 0.0
    chosen, roll, random_tokens = [], [], []
    for row, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        chosen.append(torch.bernoulli(prob[row], generator=gen).bool())
        roll.append(torch.rand(ids.shape[1], generator=gen))
        random_tokens.append(torch.randint(vocab_size, (ids.shape[1],), generator=gen))
    chosen, roll, random_tokens = torch.stack(chosen), torch.stack(roll), torch.stack(random_tokens)
    labels = ids.clone()
    labels[~chosen] = -100
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    out = {k: v for k, v in batch.items() if k != "position_ids"}  # BERT uses absolute positions per window
    out.update(input_ids=inputs, labels=labels)
    return out


def count_targets(batch: dict[str, torch.Tensor], objective: str) -> int:
    """Tokens the loss averages over (a causal model has no target for the first position)."""
    labels = batch["labels"][:, 1:] if objective == "clm" else batch["labels"]
    return int((labels != -100).sum())


def fixed_mlm_labeler(mask_id: int, vocab_size: int, special_ids: list[int], mlm_probability: float = 0.15):
    """Evaluation masks keyed on each window's index in the split: every evaluation of every model,
    at any batch size, scores the same masked positions, so MLM losses compare across steps and runs."""
    def label(batch: dict[str, torch.Tensor], window_indices: list[int]) -> dict[str, torch.Tensor]:
        return add_labels(batch, "mlm", mask_id=mask_id, mlm_probability=mlm_probability, vocab_size=vocab_size,
                          special_ids=special_ids, seeds=[sequence_seed(-1, i) for i in window_indices])
    return label
