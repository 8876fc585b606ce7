"""Evaluation metrics checked against hand computations: repetition and diversity of token lists,
multiple-choice scoring on a tiny model (batched = one request at a time, the forced answer is found,
raw and length-normalised scores can disagree), bootstrap intervals, task-file errors, and power-law fits
that recover known exponents from noisy synthetic points.

Bits per byte against a hand computation on a tiny model:
tests/unit/test_models.py::test_evaluate_tokens_matches_a_manual_computation.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from tunelab.errors import ConfigError, DataError
from tunelab.eval.generation import distinct_n, longest_repeat, prompt_windows, repetition_rate, sequence_measures, words
from tunelab.eval.multiple_choice import (Example, bootstrap_ci, context_prefix, paired_delta, predictions, read_task,
                                          score_choices, task_result)
from tunelab.eval.power_law import fit_chinchilla, fit_compute, predict, t975
from tunelab.models import build_model
from tunelab.tokenizers import train_tokenizer

# ---------------------------------------------------------------- repetition and diversity


def test_repetition_rate_by_hand():
    assert repetition_rate("a b a b a".split(), 2) == 0.5  # ab ba ab ba: 2 of 4 bigrams repeat one before
    assert repetition_rate("a b c a".split(), 1) == 0.25  # 1 - type-token ratio (3 types / 4 tokens)
    assert repetition_rate([7, 7, 7, 7], 1) == 0.75
    assert repetition_rate([1, 2, 3], 4) == 0.0  # no 4-grams: nothing repeated
    assert repetition_rate([], 1) == 0.0


def test_longest_repeat_by_hand():
    assert longest_repeat("a b c a b c a".split()) == 4  # "a b c a" at 0 and at 3 (overlapping)
    assert longest_repeat("x x x x".split()) == 3
    assert longest_repeat([1, 2, 3, 4]) == 0
    assert longest_repeat([5, 9, 1, 5, 9, 2]) == 2
    assert longest_repeat("abcXabc") == 3  # any sequence: here characters


def test_distinct_n_pools_sequences():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75  # (1,2) (2,3) (1,2) (2,4): 3 unique of 4
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert distinct_n([[1]], 2) == 0.0


def test_sequence_measures_average_per_sequence_and_pool_distinct():
    seqs = [words("the cat the cat"), words("a b c d")]
    m = sequence_measures(seqs, ns=(1, 2))
    assert m["rep_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["rep_2"] == pytest.approx((1 / 3 + 0.0) / 2)  # the-cat cat-the the-cat: 1 of 3 repeats
    assert m["distinct_1"] == pytest.approx(6 / 8)
    assert m["longest_repeat"] == pytest.approx((2 + 0) / 2)
    assert m["max_longest_repeat"] == 2 and m["mean_length"] == 4


def test_prompt_windows_start_documents_without_eos_inside():
    eos = 0
    stream = np.array([5, 6, 7, 0, 8, 9, 10, 11, 0, 12, 0, 13, 14, 15, 16])
    # document starts 0, 4, 9, 11; with 3 tokens: 0 (5 6 7), 4 (8 9 10), 11 (13 14 15); 9 has an EOS inside
    assert prompt_windows(stream, eos, 3, 3) == [[5, 6, 7], [8, 9, 10], [13, 14, 15]]
    assert prompt_windows(stream, eos, 3, 2) == [[5, 6, 7], [13, 14, 15]]  # spread: first and last
    assert prompt_windows(stream, eos, 40, 2) == []


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_seeded_and_contains_the_mean():
    rng = np.random.default_rng(3)
    correct = (rng.random(200) < 0.6).astype(float)
    low, high = bootstrap_ci(correct, seed=1)
    assert (low, high) == bootstrap_ci(correct, seed=1)
    assert (low, high) != bootstrap_ci(correct, seed=2)
    assert low < correct.mean() < high
    # The 95% interval of a mean of 0/1 values is about +-1.96 standard errors.
    half = 1.96 * math.sqrt(correct.mean() * (1 - correct.mean()) / len(correct))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


# ---------------------------------------------------------------- task files


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"context": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0})


@pytest.mark.parametrize("bad,words_", [
    ('{"context": "x", "choices": [" a", " b"], "answer": 0', ["task.jsonl:2", "not valid JSON"]),
    (json.dumps({"context": "x", "choices": [" a", " b"], "answer": 2}), ["task.jsonl:2", "answer 2 is out of range"]),
    (json.dumps({"context": "x", "choices": [" a"], "answer": 0}), ["task.jsonl:2", "1 choice", "at least 2"]),
    (json.dumps({"context": "x", "choices": [" a", " b"]}), ["task.jsonl:2", "missing answer"]),
    (json.dumps({"context": "x", "choices": [" a", " b"], "answer": True}), ["task.jsonl:2", "answer must be"]),
    (json.dumps({"context": "x", "choices": [" a", ""], "answer": 0}), ["task.jsonl:2", "choice 1 is empty"]),
    (json.dumps(["x"]), ["task.jsonl:2", "JSON object"]),
])
def test_bad_task_lines_are_one_line_errors_with_file_and_line(tmp_path, bad, words_):
    with pytest.raises(DataError) as err:
        read_task(_write(tmp_path, [GOOD, bad]))
    assert "\n" not in str(err.value)
    for w in words_:
        assert w in str(err.value)


def test_task_file_reads_examples_and_skips_blank_lines(tmp_path):
    examples = read_task(_write(tmp_path, [GOOD, "", GOOD]))
    assert examples == [Example("2 + 2 =", [" 4", " 5"], 0)] * 2
    with pytest.raises(DataError, match="does not exist"):
        read_task(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- multiple choice on a tiny model

_VOCAB = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda the of and module function "
          "returns value list string path file").split()


@pytest.fixture(scope="module")
def tiny():
    # One thread: a model this small only spins its second thread, badly so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(0)
    tok = train_tokenizer([" ".join(rng.choice(_VOCAB) for _ in range(50)) for _ in range(60)], vocab_size=300)
    torch.manual_seed(0)
    model = build_model("llama-micro", tok, {"max_position_embeddings": 64}).eval()
    yield model, tok
    torch.set_num_threads(threads)


def _manual_logprob(model, tok, context: str, choice: str) -> float:
    """One request alone, no padding: the reference the batched scorer must match."""
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(choice, add_special_tokens=False).input_ids
    ids = torch.tensor([context_prefix(tok) + ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = ids.shape[1] - len(cont)
    return float(sum(logp[start - 1 + k, t] for k, t in enumerate(cont)))


def _examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        context = " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(2, 9)))
        choices = [" " + " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 5))]
        out.append(Example(context, choices, 0))
    return out


def test_batched_scores_equal_one_request_at_a_time(tiny):
    model, tok = tiny
    examples = _examples(12, seed=1)
    scores = score_choices(model, tok, examples, batch_size=5)  # mixed lengths: padding in every batch
    for example, row in zip(examples, scores):
        for choice, s in zip(example.choices, row):
            assert s["logprob"] == pytest.approx(_manual_logprob(model, tok, example.context, choice), abs=1e-4)
            assert s["tokens"] == len(tok(choice, add_special_tokens=False).input_ids)
            assert s["bytes"] == len(choice.encode())


def test_forced_answers_give_full_accuracy_and_a_deterministic_interval(tiny):
    model, tok = tiny
    examples = _examples(30, seed=2)
    for e in examples:  # the correct choice is, by construction, the one the model scores highest
        e.answer = int(np.argmax([_manual_logprob(model, tok, e.context, c) for c in e.choices]))
    result = task_result(examples, score_choices(model, tok, examples, batch_size=7), seed=0)
    assert result["acc"]["value"] == 1.0 and result["acc"]["ci"] == [1.0, 1.0]
    # Wrong on purpose: shift every answer by one; raw-sum accuracy must drop to 0.
    shifted = [Example(e.context, e.choices, (e.answer + 1) % len(e.choices)) for e in examples]
    again = task_result(shifted, score_choices(model, tok, shifted), seed=0)
    assert again["acc"]["value"] == 0.0
    # Per-token accuracy is somewhere in between; its interval contains it and is reproducible.
    value, (low, high) = result["acc_token"]["value"], result["acc_token"]["ci"]
    assert low <= value <= high
    assert task_result(examples, score_choices(model, tok, examples), seed=0)["acc_token"]["ci"] == [low, high]
    delta = paired_delta(again, result, "acc")
    assert delta["value"] == -1.0 and delta["ci"] == [-1.0, -1.0]


def test_raw_and_length_normalised_choices_can_differ(tiny):
    """Among two-choice examples with a 1-word and a 4-word choice, find one where the short choice has the
    higher sum but the long one the higher per-token (and per-byte) score: then the metrics disagree."""
    model, tok = tiny
    rng = random.Random(5)
    found = None
    for _ in range(200):
        context = " ".join(rng.choice(_VOCAB) for _ in range(4))
        short, long_ = " " + rng.choice(_VOCAB), " " + " ".join(rng.choice(_VOCAB) for _ in range(4))
        a, b = _manual_logprob(model, tok, context, short), _manual_logprob(model, tok, context, long_)
        n_a, n_b = (len(tok(c, add_special_tokens=False).input_ids) for c in (short, long_))
        if a > b and b / n_b > a / n_a and b / len(long_) > a / len(short):
            found = Example(context, [short, long_], 0)
            break
    assert found is not None, "no example where the raw sum and the per-token score disagree"
    scores = score_choices(model, tok, [found])
    assert predictions(scores, "acc").tolist() == [0]
    assert predictions(scores, "acc_token").tolist() == [1]
    assert predictions(scores, "acc_byte").tolist() == [1]


def test_context_longer_than_the_model_is_cut_from_the_left(tiny):
    model, tok = tiny  # 64 positions
    long_context = " ".join(["alpha beta"] * 80)
    scores = score_choices(model, tok, [Example(long_context, [" gamma", " delta"], 0)])
    assert all(math.isfinite(s["logprob"]) for s in scores[0])


# ---------------------------------------------------------------- scaling fits


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(31) == pytest.approx(2.0395, abs=1e-3) and t975(200) == pytest.approx(1.9719, abs=1e-3)


def test_compute_law_with_floor_recovers_the_exponent():
    rng = np.random.default_rng(0)
    C = np.geomspace(1e12, 1e18, 12)
    L = (1.8 + 3000 * C ** -0.2) * np.exp(rng.normal(0, 0.005, len(C)))
    fit = fit_compute(C, L)
    assert fit.values["b"] == pytest.approx(0.2, abs=0.01)
    assert fit.ci["b"][0] < 0.2 < fit.ci["b"][1]
    assert fit.ci["E"][0] < 1.8 < fit.ci["E"][1]
    assert fit.dof == 9 and fit.rmse_log < 0.01
    assert predict(fit, C=1e15) == pytest.approx(1.8 + 3000 * 1e15 ** -0.2, rel=0.01)


def test_compute_law_without_floor_is_a_log_log_line():
    rng = np.random.default_rng(1)
    C = np.geomspace(1e10, 1e16, 8)
    L = 50 * C ** -0.07 * np.exp(rng.normal(0, 0.01, len(C)))
    fit = fit_compute(C, L, floor=False)
    slope, _ = np.polyfit(np.log(C), np.log(L), 1)  # ordinary least squares on the logs: the same fit
    assert fit.values["b"] == pytest.approx(-slope, rel=1e-6)
    assert fit.ci["b"][0] < 0.07 < fit.ci["b"][1]
    assert "E" not in fit.values


def test_chinchilla_law_recovers_both_exponents():
    rng = np.random.default_rng(2)
    N = np.repeat(np.geomspace(1e6, 1e8, 5), 5)
    D = np.tile(np.geomspace(1e8, 1e10, 5), 5)
    L = (1.69 + 406.4 * N ** -0.34 + 410.7 * D ** -0.28) * np.exp(rng.normal(0, 0.005, len(N)))
    fit = fit_chinchilla(N, D, L)
    for name, true in (("alpha", 0.34), ("beta", 0.28), ("E", 1.69)):
        assert fit.ci[name][0] < true < fit.ci[name][1], (name, fit.values[name], fit.ci[name])
    assert fit.values["alpha"] == pytest.approx(0.34, abs=0.03)
    assert fit.values["beta"] == pytest.approx(0.28, abs=0.03)
    assert fit.values["n_opt_exponent"] == pytest.approx(fit.values["beta"] / (fit.values["alpha"] + fit.values["beta"]))


def test_too_few_points_or_one_model_size_are_config_errors():
    with pytest.raises(ConfigError, match="at least 4"):
        fit_compute([1e12, 1e13, 1e14], [3.0, 2.5, 2.2])
    with pytest.raises(ConfigError, match="same N"):
        fit_chinchilla([1e6] * 6, np.geomspace(1e8, 1e10, 6), np.linspace(3, 2, 6))


def test_models_without_logits_to_keep_score_the_same(tiny):
    """The fallback for a causal LM whose forward has no logits_to_keep: full logits, the same scores."""
    model, tok = tiny

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    examples = _examples(6, seed=7)
    fast, plain = score_choices(model, tok, examples, batch_size=4), score_choices(Plain(model), tok, examples, batch_size=4)
    for row_a, row_b in zip(fast, plain):
        for a, b in zip(row_a, row_b):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)


def test_generation_quality_of_a_uniform_model(tiny):
    """Zero logits: every next-token distribution is uniform (entropy ln V exactly), greedy decoding takes
    the first token that is not the suppressed EOS every time, so its measures are known by hand."""
    from tunelab.eval.generation import generation_quality
    from tunelab.tokenizers import eos_id

    _, tok = tiny
    torch.manual_seed(0)
    model = build_model("llama-micro", tok, {"max_position_embeddings": 64}).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied with the input embeddings: those are zero too
    vocab = model.config.vocab_size
    result = generation_quality(model, tok, [[5, 6, 7], [8, 9, 10]], max_new_tokens=10, seed=0)
    repeated = 1 if eos_id(tok) == 0 else 0  # argmax of equal logits: the lowest id that is allowed
    greedy = result["greedy"]
    assert greedy["mean_length"] == 10 and greedy["continuations"] == 2
    assert greedy["rep_1"] == pytest.approx(0.9) and greedy["distinct_1"] == pytest.approx(1 / 20)
    assert greedy["longest_repeat"] == 9 and result["examples"]["greedy"][0] == tok.decode([repeated] * 10)
    for mode in ("greedy", "sampled"):
        assert result[mode]["mean_entropy"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert result["sampled"]["continuations"] == 4 and result["sampled"]["distinct_1"] > 0.5
    assert generation_quality(model, tok, [[5, 6, 7], [8, 9, 10]], max_new_tokens=10, seed=0) == result  # seeded
