"""Preference pairs: the log-probability of each reply, and which reply a model prefers on held-out pairs.

A batch of pairs (data/rows.py collate_pairs) is 2B rows: the B chosen replies, then the B rejected ones,
each after its prompt, with a loss mask on the reply's tokens. `sequence_logps` sums the log-probability
of the masked tokens of every row (token t predicted from t - 1), which is what DPO, SimPO and ORPO compare
(objectives/preference.py). The held-out evaluation of a preference source reports, per domain:

    loss, ppl            mean next-token loss on the chosen replies (the held-out response loss)
    pref_accuracy        share of pairs whose chosen reply has the higher summed log-probability
    pref_accuracy_norm   the same with the per-token mean (a longer reply is not penalised for its length)
    logps_chosen, logps_rejected, logp_margin   mean summed log-probabilities and their difference
"""

from __future__ import annotations

import math

import torch


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, their count), in float32 (float64 for a float64 model)."""
    # Shift the targets, not the logits: logits[:, :-1] would be copied whole by the reshape below.
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    mask = torch.nn.functional.pad(loss_mask[:, 1:], (0, 1)).bool()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view(targets.shape)
    return -(nll * mask).sum(dim=1), mask.sum(dim=1)


def model_sequence_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_tokens: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of the model's logits on input_ids; with `chunk_tokens` (train.loss_chunk_tokens) the
    head runs that many targets at a time and the logits are never whole (train/chunked_loss.py)."""
    if chunk_tokens is not None:
        from tunelab.train.chunked_loss import chunked_sequence_logps

        return chunked_sequence_logps(model, input_ids, loss_mask, chunk_tokens)
    return sequence_logps(model(input_ids=input_ids, use_cache=False).logits, input_ids, loss_mask)


@torch.no_grad()
def pair_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and target counts of a batch of pairs, as [B, 2] (chosen, rejected)."""
    logps, counts = model_sequence_logps(model, batch["input_ids"], batch["loss_mask"], chunk_tokens)
    return logps.view(2, -1).t(), counts.view(2, -1).t()


def evaluate_pairs(model, pairs, *, batch_size: int, pad_id: int, device: torch.device = torch.device("cpu"),
                   autocast_dtype: torch.dtype | None = None, max_tokens: int | None = None,
                   chunk_tokens: int | None = None) -> dict:
    """Held-out metrics of a PairSet (module docstring); at most about max_tokens tokens, pairs spread evenly.
    `chunk_tokens`: the head a chunk of targets at a time (train.loss_chunk_tokens)."""
    from tunelab.data.rows import collate_pairs
    from tunelab.eval.perplexity import window_indices

    if len(pairs) == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": None, "eval_tokens": 0, "pairs": 0}
    budget = len(pairs) if max_tokens is None else max(1, max_tokens // pairs.seq_len)
    picked = [int(i) for i in window_indices(len(pairs), budget)]
    was_training = model.training
    model.eval()
    logps, counts = [], []
    for start in range(0, len(picked), batch_size):
        batch = collate_pairs([pairs[i] for i in picked[start:start + batch_size]], pad_id)
        batch = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            lp, n = pair_logps(model, batch, chunk_tokens)
        logps.append(lp.cpu().double())
        counts.append(n.cpu().double())
    model.train(was_training)
    logps, counts = torch.cat(logps), torch.cat(counts)
    mean = logps / counts.clamp(min=1)
    loss = float(-logps[:, 0].sum() / counts[:, 0].sum().clamp(min=1))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": None, "eval_tokens": int(counts[:, 0].sum()),
            "pairs": len(picked), "pref_accuracy": float((logps[:, 0] > logps[:, 1]).double().mean()),
            "pref_accuracy_norm": float((mean[:, 0] > mean[:, 1]).double().mean()),
            "logps_chosen": float(logps[:, 0].mean()), "logps_rejected": float(logps[:, 1].mean()),
            "logp_margin": float((logps[:, 0] - logps[:, 1]).mean())}
