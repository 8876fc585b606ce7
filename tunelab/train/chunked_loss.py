"""train.loss_chunk_tokens: the causal-LM loss without ever holding the whole batch's logits.

The model runs up to its final hidden states (transformers' `logits_to_keep` with no position, so its
head projects nothing), then the head and the cross-entropy run over `chunk` target tokens at a time,
each chunk under activation checkpointing: its logits are freed as soon as its loss is summed and
recomputed one chunk at a time in the backward pass. Peak memory for the head falls from
targets x vocabulary x (logits, their float copy, their gradient) to chunk x vocabulary. Evaluation
during training (eval/perplexity.py) sums its losses the same way.

The result is the model's own loss (the mean next-token cross-entropy over labels != -100, logits
upcast to float), up to summation order. The head is called as the module it is, so an adapter on it
(LoRA on lm_head, trainable tokens) and tied embeddings take part as usual, and the forward still goes
through the DDP and compile wrappers. A model that does more than `head(hidden)` to its logits (logit
soft-capping or scaling) or changes its inputs in another way than peft's prompt learning (virtual
tokens prepended, labelled -100 as peft does) would get another loss: `check_reproduces_model_loss`
compares the two once, before training, and refuses such a model.

Preference methods (DPO, SimPO, ORPO) sum each reply's log-probability the same way
(`chunked_sequence_logps`): the chosen and rejected replies of a batch never have whole logits either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.errors import ModelError
from tunelab.models import unwrapped

IGNORE_INDEX = -100  # transformers' label for "no target here"


def _chunk_nll(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")


def scored_token_nll(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every position with a target, the head applied `chunk` targets at a time.

    `labels` as transformers takes them (the inputs' ids, IGNORE_INDEX where nothing is scored). Returns
    (nll of each scored target, float32 or float64 for a float64 model; the row it belongs to; its token id),
    in row-major order.
    """
    no_position = torch.empty(0, dtype=torch.long, device=labels.device)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_position)
    hidden = out.hidden_states[-1]
    if hidden.shape[0] == labels.shape[0] and hidden.shape[1] > labels.shape[1]:
        # peft's prompt learning prepends virtual tokens without targets (the last one predicts the first token)
        labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
    if hidden.shape[:2] != labels.shape:
        raise ModelError(f"train.loss_chunk_tokens: the model's hidden states cover {tuple(hidden.shape[:2])} "
                         f"positions for labels of shape {tuple(labels.shape)}: remove train.loss_chunk_tokens")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    # Only positions with a target reach the head: prompt tokens of chat data cost nothing there.
    rows = scored.nonzero()[:, 0]
    hidden, targets = hidden[:, :-1][scored], targets[scored]
    head = unwrapped(model).get_output_embeddings()
    pieces = [checkpoint(_chunk_nll, head, hidden[start:start + chunk], targets[start:start + chunk],
                         use_reentrant=False) for start in range(0, targets.numel(), chunk)]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    nll = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=dtype)
    return nll, rows, targets


def chunked_lm_loss(model, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `batch`, the head applied `chunk` targets at a time."""
    total, targets = chunked_lm_nats(model, batch, chunk)
    return total / targets.numel()  # no target at all: nan, as the model's own mean loss gives


def chunked_lm_nats(model, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, the target token ids it was summed over), `chunk` targets at a time."""
    nll, _, targets = scored_token_nll(model, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"],
                                       chunk)
    return nll.sum(), targets


def chunked_sequence_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """eval/preference.py sequence_logps from the model, the head applied `chunk` targets at a time: (summed
    log-probability of each row's targets (tokens 1.. where loss_mask), their count)."""
    labels = input_ids.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
    nll, rows, _ = scored_token_nll(model, {"input_ids": input_ids}, labels, chunk)
    logps = -nll.new_zeros(input_ids.shape[0]).index_add(0, rows, nll)
    return logps, loss_mask[:, 1:].bool().sum(dim=1)


def check_reproduces_model_loss(model, vocab_size: int, chunk: int, device) -> None:
    """Refuse, before training, a model whose own loss the chunked loss does not reproduce.

    One batch of random tokens, in eval mode (no dropout) and fp32: the two losses must agree to 1e-4.
    The head's input is scaled up during the check (in both losses alike) so that the logits are large:
    a fresh model's tiny logits would hide soft-capping, which is close to the identity near zero.
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    name = type(unwrapped(model)).__name__
    was_training = model.training
    model.eval()
    head = unwrapped(model).get_output_embeddings()
    enlarge = head.register_forward_pre_hook(lambda module, args: (args[0] * 100.0, *args[1:]))
    try:
        with torch.no_grad():
            own = model(**batch, use_cache=False).loss
            try:
                chunked = chunked_lm_loss(model, batch, min(chunk, 5))  # several chunks even on this small batch
            # e.g. a forward without logits_to_keep, or one that calls its head on something else
            except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
                raise ModelError(f"train.loss_chunk_tokens: {name} cannot run with its head skipped "
                                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
                                 "remove train.loss_chunk_tokens") from None
    finally:
        enlarge.remove()
        model.train(was_training)
    if own is None or not torch.allclose(chunked.float(), own.float(), rtol=1e-4, atol=1e-5):
        raise ModelError(f"train.loss_chunk_tokens: {name} computes its loss differently from head(hidden states) "
                         f"+ cross-entropy ({float(chunked):.6f} vs its own {float(own) if own is not None else None})"
                         ": it transforms its logits or inputs around the head; remove train.loss_chunk_tokens")
