"""Generation quality: repetition, diversity and entropy of a model's continuations of held-out prompts.

The measures of "The Hyperfitting Phenomenon" (Carlsson et al., 2024), which found that greedy
decoding's dull loops show up as repeated n-grams and a low type-token ratio, and that sharpened
(hyperfitted) models have a very low next-token entropy:

- rep-n (per sequence): the share of a sequence's n-grams that repeat an n-gram seen earlier in it,
  1 - unique/total (Welleck et al., 2019, "seq-rep-n"). rep-1 is 1 - the type-token ratio.
- longest repeat (per sequence): the length of the longest span that occurs at least twice (the two
  occurrences may overlap, as in a loop "a b a b a").
- distinct-n (pooled over all continuations, Li et al., 2016): unique n-grams / n-grams. Within one
  sequence it would just be 1 - rep-n; pooled it also sees two prompts continued the same way.
- mean entropy: the model's own next-token entropy (nats, temperature 1, nothing filtered) at each
  generated position, averaged over all generated tokens.

The metric functions are pure and take any sequences of hashable items (token ids, words, characters);
`generation_quality` runs a model and measures its continuations in its own tokens.
"""

from __future__ import annotations

from typing import Hashable, Sequence

NGRAMS = (1, 2, 3, 4)


def ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def repetition_rate(seq: Sequence[Hashable], n: int) -> float:
    """Share of the n-grams of `seq` that repeat an earlier one; 0.0 when it has none."""
    grams = ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat(seq: Sequence[Hashable]) -> int:
    """Length of the longest span occurring at least twice in `seq` (occurrences may overlap).

    For each shift d, compare seq with itself shifted by d: the longest run of equal positions is the
    longest span that starts at i and again at i + d. O(len^2), fine for continuations of a few hundred.
    """
    best = 0
    for d in range(1, len(seq)):
        run = 0
        for a, b in zip(seq, seq[d:]):
            run = run + 1 if a == b else 0
            best = max(best, run)
    return best


def distinct_n(seqs: Sequence[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams / all n-grams over all sequences together; 0.0 when there are none."""
    grams = [g for seq in seqs for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def words(text: str) -> list[str]:
    """Whitespace words: a tokenizer-free unit for measuring text from different models alike."""
    return text.split()


def sequence_measures(seqs: Sequence[Sequence[Hashable]], ns: Sequence[int] = NGRAMS) -> dict:
    """rep-n and longest repeat averaged over sequences, distinct-n pooled over them, mean length."""
    count = max(1, len(seqs))
    out = {f"rep_{n}": sum(repetition_rate(s, n) for s in seqs) / count for n in ns}
    out.update({f"distinct_{n}": distinct_n(seqs, n) for n in ns})
    out["longest_repeat"] = sum(longest_repeat(s) for s in seqs) / count
    out["max_longest_repeat"] = max((longest_repeat(s) for s in seqs), default=0)
    out["mean_length"] = sum(len(s) for s in seqs) / count
    return out


# ---------------------------------------------------------------- running a model


def prompt_windows(tokens, eos_id: int, prompt_tokens: int, count: int) -> list[list[int]]:
    """Up to `count` prompts of exactly `prompt_tokens` tokens from a packed token stream, each the start
    of a document (the stream's start, or right after an EOS) with no EOS inside, spread evenly over
    the stream; where too few documents are that long, windows at evenly spread positions instead."""
    import numpy as np

    tokens = np.asarray(tokens)
    if len(tokens) < prompt_tokens or count < 1:
        return []
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends + 1])
    # The first EOS at or after each start must lie beyond the window (or there is none).
    following = np.searchsorted(ends, starts)
    first_eos = np.append(ends, len(tokens))[following]
    usable = starts[(starts + prompt_tokens <= len(tokens)) & (first_eos >= starts + prompt_tokens)]
    if len(usable) < count:
        usable = np.arange(0, len(tokens) - prompt_tokens + 1)
    picked = usable[np.unique(np.linspace(0, len(usable) - 1, count).round().astype(np.int64))]
    return [tokens[s:s + prompt_tokens].astype(np.int64).tolist() for s in picked]


def _continue(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int, greedy: bool,
              temperature: float, top_k: int) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k or None}
    with torch.no_grad():
        # Every continuation gets the full length (EOS suppressed): repetition grows with length, so
        # sequences of different lengths would not compare.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                             eos_token_id=eos_id, **sampling)
    return out[:, ids.shape[1]:].tolist()


def mean_entropy(model, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 16) -> float:
    """Mean entropy (nats) of the model's next-token distribution at each continuation token."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = [p + c for p, c in zip(prompts[start:start + batch_size], continuations[start:start + batch_size])]
            ids = torch.tensor(rows, device=device)  # all rows have one length: prompt + max_new_tokens
            logits = model(input_ids=ids, use_cache=False).logits.float()
            first = len(prompts[start]) - 1  # the position whose output predicts the first generated token
            logp = torch.log_softmax(logits[:, first:-1], dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            total += float(entropy.sum())
            count += entropy.numel()
    return total / count if count else float("nan")


def generation_quality(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 96, seed: int = 0,
                       temperature: float = 1.0, top_k: int = 0, batch_size: int = 16, samples: int = 2) -> dict:
    """Greedy and sampled continuations of `prompts` (token lists of equal length) and their measures.

    Sampling draws `samples` continuations per prompt, seeded (seed, seed + 1, ...), from the model's
    distribution at `temperature` with `top_k` (0: no cut), so the sampled numbers are a reference for
    what the model's own distribution does, not a tuned decoder. Returns {"settings", "greedy",
    "sampled", "examples"}; each mode has the sequence measures, "mean_entropy" and "continuations".
    """
    import torch

    from tunelab.tokenizers import eos_id

    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    result = {"settings": {"prompts": len(prompts), "prompt_tokens": len(prompts[0]) if prompts else 0,
                           "max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature,
                           "top_k": top_k, "samples": samples, "unit": "model tokens", "entropy": "nats"}}
    for mode, runs in (("greedy", [(True, seed)]), ("sampled", [(False, seed + i) for i in range(samples)])):
        used_prompts, continuations = [], []
        for greedy, run_seed in runs:
            torch.manual_seed(run_seed)  # one seed per pass: its batches draw from it in order
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                continuations += _continue(model, batch, max_new_tokens, eos, pad, greedy, temperature, top_k)
                used_prompts += batch
        measures = sequence_measures(continuations)
        measures["mean_entropy"] = mean_entropy(model, used_prompts, continuations, batch_size)
        measures["continuations"] = len(continuations)
        result[mode] = measures
        result.setdefault("examples", {})[mode] = [tokenizer.decode(c) for c in continuations[:3]]
    result["examples"]["prompts"] = [tokenizer.decode(p) for p in prompts[:3]]
    model.train(was_training)
    return result
