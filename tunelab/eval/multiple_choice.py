"""Multiple-choice tasks scored by log-likelihood, with bootstrap confidence intervals.

A task is a JSONL file, one example per line: {"context": str, "choices": [str, ...], "answer": index}
(other keys are ignored), or a built-in task `builtin:NAME` (tunelab/eval/builtin_tasks.py). Each
choice is scored as a continuation of the context: the sum of its tokens' log-probabilities given the
context. Three accuracies are reported, each picking the highest-scoring choice by a different score:

- `acc`: the raw sum. Favours short choices (fewer tokens, fewer negative terms).
- `acc_token`: the sum divided by the choice's token count. Depends on the tokenizer.
- `acc_byte`: the sum divided by the choice's UTF-8 bytes: tokenizer-free, the closest to
  lm-evaluation-harness's `acc_norm` (which divides by characters); use it to compare models with
  different tokenizers.

The context and each choice are tokenized separately and joined, so every choice is conditioned on
exactly the same context tokens (tokenizing context + choice as one string can merge across the
boundary and give each choice a different context). Write choices with their leading space
(" Paris"), as the text would continue. The context starts as a document does in training: after the
tokenizer's own prefix (a Llama BOS), or after the EOS that separates packed documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.errors import DataError

METRICS = ("acc", "acc_token", "acc_byte")


@dataclass
class Example:
    context: str
    choices: list[str]
    answer: int


# ---------------------------------------------------------------- reading tasks


def _example(record, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with context, choices and answer, got "
                        f"{type(record).__name__}")
    missing = [k for k in ("context", "choices", "answer") if k not in record]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; each line needs "
                        '{"context": str, "choices": [str, ...], "answer": index}')
    context, choices, answer = record["context"], record["choices"], record["answer"]
    if not isinstance(context, str):
        raise DataError(f"{where}: context must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: {len(choices)} choice{'s' * (len(choices) != 1)}; a multiple-choice "
                        "example needs at least 2")
    if any(not c for c in choices):
        raise DataError(f"{where}: choice {[i for i, c in enumerate(choices) if not c][0]} is empty; "
                        "every choice needs text to score")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(f"{where}: answer must be the index of the correct choice (an integer), "
                        f"got {answer!r}")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer} is out of range for {len(choices)} choices "
                        f"(0..{len(choices) - 1}; indices start at 0)")
    return Example(context, list(choices), answer)


def read_task(path: str | Path) -> list[Example]:
    """The examples of a JSONL task file; a bad line is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--task: {path} does not exist; give a JSONL file with one "
                        '{"context", "choices", "answer"} object per line, or builtin:stdlib-module')
    examples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                examples.append(_example(record, where))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; a task file is JSONL") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def load_task(task: str, cache_dir: Path | None = None) -> tuple[str, str, list[Example]]:
    """(name, file, examples) of a task: a JSONL path or builtin:NAME (generated and cached on first use)."""
    if task.startswith("builtin:"):
        from tunelab.eval.builtin_tasks import builtin_task_file

        path = builtin_task_file(task.split(":", 1)[1], cache_dir)
        return task.split(":", 1)[1], str(path), read_task(path)
    return Path(task).stem, task, read_task(task)


# ---------------------------------------------------------------- scoring


def context_prefix(tokenizer) -> list[int]:
    """The tokens a document starts after in training: the tokenizer's own prefix, else the EOS that
    separates packed documents."""
    from tunelab.tokenizers import eos_id, special_tokens

    prefix, _ = special_tokens(tokenizer)
    return list(prefix) or [eos_id(tokenizer)]


def score_choices(model, tokenizer, examples: list[Example], batch_size: int = 16) -> list[list[dict]]:
    """For each example and choice: {"logprob": sum of the choice tokens' log-probs, "tokens", "bytes"}.

    Requests (one per choice) run longest first in batches, padded on the left with position ids that
    start at each sequence's first real token, so every choice ends at the batch's last position and
    the LM head runs on the last (longest choice + 1) positions only (`logits_to_keep`): with a large
    vocabulary, logits for every context position would cost more than the model. A sequence longer
    than the model's positions loses context tokens from the left; the choice is always scored whole.
    """
    import inspect

    import torch

    from tunelab import models
    from tunelab.tokenizers import encoder, eos_id

    encode = encoder(tokenizer)
    prefix = context_prefix(tokenizer)
    limit = models.max_positions(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    contexts = encode([e.context for e in examples])
    requests = []  # (example index, choice index, ids, number of choice tokens)
    for i, (example, ctx) in enumerate(zip(examples, contexts)):
        for j, choice_ids in enumerate(encode(example.choices)):
            ids = prefix + ctx + choice_ids
            if limit is not None and len(ids) > limit:
                if len(choice_ids) >= limit:
                    raise DataError(f"example {i}, choice {j}: {len(choice_ids)} tokens, more than the model's "
                                    f"{limit} positions; shorten the choice")
                ids = ids[len(ids) - limit:]
            requests.append((i, j, ids, len(choice_ids)))
    scores = [[None] * len(e.choices) for e in examples]
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    device = next(model.parameters()).device
    forward = getattr(model, "get_base_model", lambda: model)().forward  # a PeftModel passes kwargs through
    can_keep = "logits_to_keep" in inspect.signature(forward).parameters
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [requests[r] for r in order[start:start + batch_size]]
            width = len(batch[0][2])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, seq, _) in enumerate(batch):
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(n for *_, n in batch) + 1 if can_keep else width
            extra = {"logits_to_keep": keep} if can_keep else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=False, **extra).logits[:, -keep:]
            for row, (i, j, seq, n) in enumerate(batch):
                # The kept logits are the last `keep` positions; position t predicts token t + 1, so the
                # choice's n tokens (the last n) are predicted from kept rows keep-n-1 .. keep-2.
                logp = torch.log_softmax(logits[row, keep - n - 1:keep - 1].float(), dim=-1)
                targets = torch.tensor(seq[len(seq) - n:], device=device)
                scores[i][j] = {"logprob": float(logp.gather(-1, targets[:, None]).sum()), "tokens": n,
                                "bytes": len(examples[i].choices[j].encode("utf-8"))}
    model.train(was_training)
    return scores


def predictions(scores: list[list[dict]], metric: str) -> np.ndarray:
    """The chosen index per example: argmax of the raw sum (acc), per token (acc_token) or per byte
    (acc_byte); the first choice wins a tie."""
    denominator = {"acc": lambda s: 1, "acc_token": lambda s: s["tokens"], "acc_byte": lambda s: s["bytes"]}[metric]
    return np.array([int(np.argmax([s["logprob"] / denominator(s) for s in row])) for row in scores])


def bootstrap_ci(values, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-example scores), seeded.

    Examples are resampled with replacement `resamples` times; the interval holds the central
    `confidence` share of the resampled means. Draws go in blocks so memory stays small for big tasks.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // len(values))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        means[start:start + rows] = values[rng.integers(0, len(values), size=(rows, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def task_result(examples: list[Example], scores: list[list[dict]], resamples: int = 1000, confidence: float = 0.95,
                seed: int = 0) -> dict:
    """Accuracies with bootstrap intervals, plus each example's correctness (for paired comparisons)."""
    answers = np.array([e.answer for e in examples])
    out = {"examples": len(examples), "chance": float(np.mean([1 / len(e.choices) for e in examples])),
           "confidence": confidence, "resamples": resamples, "seed": seed}
    for metric in METRICS:
        correct = (predictions(scores, metric) == answers).astype(np.float64)
        low, high = bootstrap_ci(correct, resamples, confidence, seed)
        out[metric] = {"value": float(correct.mean()), "ci": [low, high], "correct": correct.astype(int).tolist()}
    return out


def evaluate_task(model, tokenizer, examples: list[Example], batch_size: int = 16, resamples: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> dict:
    return task_result(examples, score_choices(model, tokenizer, examples, batch_size), resamples, confidence, seed)


def paired_delta(result: dict, base: dict, metric: str, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict:
    """Accuracy of `result` minus `base` on the same examples, with a paired bootstrap interval
    (examples resampled together, so the shared difficulty of an example cancels)."""
    diff = np.array(result[metric]["correct"], dtype=np.float64) - np.array(base[metric]["correct"], dtype=np.float64)
    low, high = bootstrap_ci(diff, resamples, confidence, seed)
    return {"value": float(diff.mean()), "ci": [low, high]}
