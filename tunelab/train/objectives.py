"""Turn packed token windows into model inputs with labels, per training objective."""

from __future__ import annotations

import torch


def add_labels(batch: dict[str, torch.Tensor], objective: str, *, mask_id: int | None = None,
               mlm_probability: float = 0.15, vocab_size: int = 0, special_ids: list[int] | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """clm: labels = inputs (HF shifts inside the model). mlm: BERT's 80/10/10 masking.

    MLM masks are drawn from `generator`, which the loop seeds from (seed, step, micro-step),
    so the masks of a resumed run are the same without saving any RNG state for them.
    """
    ids = batch["input_ids"]
    if objective == "clm":
        return {**batch, "labels": ids.clone()}
    if mask_id is None:
        raise ValueError("mlm needs a mask token")
    labels = ids.clone()
    prob = torch.full(ids.shape, mlm_probability)
    if special_ids:
        prob[torch.isin(ids, torch.tensor(special_ids))] = 0.0
    chosen = torch.bernoulli(prob, generator=generator).bool()
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    out = {k: v for k, v in batch.items() if k != "position_ids"}  # BERT uses absolute positions per window
    out.update(input_ids=inputs, labels=labels)
    return out


def fixed_mlm_labeler(mask_id: int, vocab_size: int, special_ids: list[int], mlm_probability: float = 0.15):
    """Evaluation masks that depend only on the batch's index: every evaluation of every model
    scores the same masked positions, so MLM losses compare across steps and runs."""
    def label(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        return add_labels(batch, "mlm", mask_id=mask_id, mlm_probability=mlm_probability, vocab_size=vocab_size,
                          special_ids=special_ids, generator=torch.Generator().manual_seed(index))
    return label
