"""Preference tuning: pairs read from tables (every form, one-line errors), rendered as two documents whose
masks cover exactly the reply, truncated and counted, batched as a pure function of the step; DPO, SimPO
and ORPO losses against hand computations; the LoRA reference is the base model; resume mid-DPO is exact.
The shared method suite (test_method_suite.py) also runs dpo, simpo and orpo."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_and_sigkill, run_cli
from test_chat_data import ids, runs, write_jsonl
from test_data_helpers import byte_level_tokenizer
from tunelab.config import SourceSpec
from tunelab.recipe import load_recipe, validate_recipe
from tunelab.data import tokenize_source
from tunelab.data.chat import ChatRenderer, PreferencePair, encode_segments, pair_from_row
from tunelab.data.rows import PairSet, collate_pairs
from tunelab.errors import ConfigError, DataError
from tunelab.eval.preference import pair_logps
from tunelab.methods import create_method
from tunelab.objectives import create_objective
from tunelab.runs import train_losses
from tunelab.stages import run_stage

EOS = "<|endoftext|>"


def tokenize_pairs(tmp_path, tok, rows, split=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return tokenize_source(SourceSpec(source=source, format="preference"), tok, tok.eos_token_id,
                           tmp_path / "cache", 0.3, log=lambda *a: None, split=split)


# ---------------------------------------------------------------- reading pairs


def test_every_row_form_gives_the_same_pair():
    want = PreferencePair((("user", "Why?"),), "Because.", "No.")
    forms = [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."},
             {"messages": [{"role": "user", "content": "Why?"}], "chosen": "Because.", "rejected": "No."},
             {"prompt": [{"role": "user", "content": "Why?"}], "chosen": [{"role": "assistant", "content": "Because."}],
              "rejected": [{"role": "assistant", "content": "No."}]},  # TRL's conversational form
             {"chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
              "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No."}]}]
    for row in forms:
        assert pair_from_row(row, "x") == want, row
    with_system = pair_from_row({"system": "Be brief.", "prompt": "Why?", "chosen": "A", "rejected": "B"}, "x")
    assert with_system.prompt == (("system", "Be brief."), ("user", "Why?"))
    # The held-out rule hashes a pair as the chat of its prompt and chosen reply.
    from tunelab.data.chat import Chat

    assert want.text() == Chat((("user", "Why?"), ("assistant", "Because."))).text()


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "p", "chosen": "a"', r"pairs\.jsonl:2: not a JSON object"),
    ({"prompt": "p", "chosen": "a"}, r"pairs\.jsonl:2: 'rejected' must be .*missing; the row has: prompt, chosen"),
    ({"chosen": "a", "rejected": "b"}, r"pairs\.jsonl:2: no prompt"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, r"pairs\.jsonl:2: 'chosen' is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, r"pairs\.jsonl:2: the prompt must end with a user"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"pairs\.jsonl:2: 'chosen' must be one assistant reply"),
])
def test_bad_pairs_are_one_line_errors_with_file_and_line(tmp_path, row, message):
    with pytest.raises(DataError, match=message) as err:
        tokenize_pairs(tmp_path, byte_level_tokenizer(), [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- rendering and masks


def test_a_pair_is_two_documents_masked_exactly_on_each_reply(tmp_path):
    tok = byte_level_tokenizer()
    row = {"system": "Be brief.", "prompt": "What is alpha?", "chosen": "The first letter.", "rejected": "A beta."}
    src = tokenize_pairs(tmp_path, tok, [row])
    assert len(src.eval_starts) == 2
    docs = np.split(np.asarray(src.eval), src.eval_starts[1:])
    masks = np.split(np.asarray(src.eval_mask), src.eval_starts[1:])
    prompt = "<|system|>\nBe brief.\n<|user|>\nWhat is alpha?\n<|assistant|>\n"
    for doc, mask, reply in zip(docs, masks, (row["chosen"], row["rejected"])):
        # The built-in template by hand: the prompt is context; the reply and its EOS are the targets.
        assert runs(doc.tolist(), mask.tolist()) == [(0, ids(tok, prompt)), (1, ids(tok, reply) + [tok.eos_token_id])]
    # ... which is what inference and any reader of the tokenizer's template get (encode_segments).
    renderer = ChatRenderer(tok)
    for doc, mask, conversation in zip(docs, masks, pair_from_row(row, "x").conversations()):
        want_ids, want_mask = encode_segments(tok, renderer.segments(conversation, "last"))
        assert doc.tolist() == want_ids and mask.tolist() == want_mask


def test_held_out_pairs_stay_whole_and_long_or_identical_pairs_are_counted(tmp_path):
    tok = byte_level_tokenizer()
    rows = [{"prompt": f"Question number {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(40)]
    rows[3]["rejected"] = rows[3]["chosen"]  # carries no preference
    rows[5]["chosen"] = "a very long reply " * 20  # does not fit with its prompt in seq_len
    rows[7]["prompt"] = "a long question " * 20  # fits after cutting the prompt from the left
    src = tokenize_pairs(tmp_path, tok, rows, split=True)
    assert len(src.train_starts) % 2 == 0 and len(src.eval_starts) % 2 == 0 and len(src.eval_starts) > 0
    n = (len(src.train_starts) + len(src.eval_starts)) // 2
    assert n == 40  # a pair is never split across train and held-out
    sets = [PairSet(src.train, src.train_starts, src.train_mask, 96),
            PairSet(src.eval, src.eval_starts, src.eval_mask, 96)]
    assert sum(int(s.identical.sum()) for s in sets) == 1
    assert sum(s.dropped for s in sets) == 1 and sum(s.cut for s in sets) == 1
    assert sum(len(s) for s in sets) == 38
    lines = [line for s in sets for line in s.describe("pairs")]
    assert any("longer than data.seq_len=96" in line for line in lines)
    assert any("same chosen and rejected" in line for line in lines)
    for s in sets:
        for i in range(len(s)):
            (c, cm), (r, rm) = s[i]
            assert len(c) <= 96 and len(r) <= 96 and cm.sum() > 0 and rm.sum() > 0 and cm[0] == 0


def test_batches_are_a_pure_function_of_the_step_and_split_like_one_process():
    from tunelab.train.batches import PreferenceBatches

    tokens = np.arange(1, 401) % 50 + 1
    starts = np.arange(0, 400, 5)  # 40 pairs of 5-token documents
    mask = np.tile(np.array([0, 0, 1, 1, 1], dtype=np.uint8), 80)
    pairs = PairSet(tokens, starts, mask, 16)
    one = PreferenceBatches(sets=[pairs], micro=2, accum=2, pad_id=0, seed=3)
    two = [PreferenceBatches(sets=[pairs], micro=2, accum=1, pad_id=0, rank=r, world=2, seed=3) for r in range(2)]
    for step in (0, 1, 9, 10, 25):  # across epoch boundaries (4 pairs a step, 40 pairs)
        whole = one.next(step)
        halves = [b.next(step)[0] for b in two]
        # micro-batch m of rank r is slice m * world + r of the global batch.
        assert torch.equal(whole[0][0]["pair_id"], halves[0][0]["pair_id"])
        got = torch.cat([whole[0][0]["pair_id"], whole[1][0]["pair_id"]])
        assert torch.equal(got, torch.cat([halves[0][0]["pair_id"], halves[1][0]["pair_id"]]))
        assert whole[0][1] == 2 and one.tokens_per_step == 4 * 2 * 5
    epoch = torch.cat([torch.cat([b["pair_id"] for b, _ in one.next(s)]) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(40))  # an epoch draws every pair once
    again = PreferenceBatches(sets=[pairs], micro=2, accum=2, pad_id=0, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for (a, _), (b, _) in zip(again.next(7), one.next(7)))
    batch = collate_pairs([pairs[0], pairs[1]], pad_id=0)  # chosen rows first, then the rejected ones
    assert batch["input_ids"].shape == (4, 5) and batch["loss_mask"][:, :2].sum() == 0


# ---------------------------------------------------------------- losses against hand computations


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).double()


def pair_batch():
    rng = np.random.default_rng(0)
    pairs = []
    for prompt, chosen, rejected in ((3, 2, 4), (5, 3, 1), (2, 6, 2)):
        p = rng.integers(1, 40, prompt)
        c, r = rng.integers(1, 40, chosen), rng.integers(1, 40, rejected)
        pairs.append(((np.concatenate([p, c]), np.r_[np.zeros(prompt), np.ones(chosen)].astype(np.int64)),
                      (np.concatenate([p, r]), np.r_[np.zeros(prompt), np.ones(rejected)].astype(np.int64))))
    batch = {k: torch.from_numpy(v) for k, v in collate_pairs(pairs, pad_id=0).items()}
    batch["pair_id"] = torch.arange(3)
    return pairs, batch


def hand_logps(model, pairs):
    """Summed log-probs and lengths of each reply, one unpadded sequence at a time, with log_softmax."""
    out = []
    with torch.no_grad():
        for pair in pairs:
            row = []
            for ids_, mask in pair:
                logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids_)[None]).logits[0].double(), -1)
                picked = [float(logp[t - 1, ids_[t]]) for t in range(1, len(ids_)) if mask[t]]
                row.append((sum(picked), len(picked)))
            out.append(row)
    return out


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def method_loss(name, options, model, batch, reference=None):
    objective = create_objective(name, options)
    if reference is not None:
        objective.reference = reference
    return float(objective.loss(model, batch).detach()), objective


def test_dpo_loss_equals_a_hand_computation():
    policy, reference = tiny_model(0), tiny_model(1)
    pairs, batch = pair_batch()
    pol, ref = hand_logps(policy, pairs), hand_logps(reference, pairs)
    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
        want = []
        for (c, _), (r, _), (rc, _), (rr, _) in zip(*zip(*pol), *zip(*ref)):
            h = beta * ((c - rc) - (r - rr))
            want.append(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
        table = pair_logps(reference, batch)[0]
        got, method = method_loss("dpo", {"beta": beta, "label_smoothing": eps}, policy, batch, table)
        assert got == pytest.approx(sum(want) / 3, abs=1e-9)
    method.after_step(policy, 0)
    metrics = method.metrics()
    margins = [beta * ((c - rc) - (r - rr)) for (c, _), (r, _), (rc, _), (rr, _) in zip(*zip(*pol), *zip(*ref))]
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert metrics["logps_chosen"] == pytest.approx(sum(c for (c, _), _ in pol) / 3, abs=1e-5)


def test_simpo_and_orpo_losses_equal_hand_computations():
    policy = tiny_model(0)
    pairs, batch = pair_batch()
    pol = hand_logps(policy, pairs)
    beta, gamma = 2.0, 0.7
    want = [-log_sigmoid(beta * (c / nc - r / nr) - gamma) for (c, nc), (r, nr) in pol]
    got, _ = method_loss("simpo", {"beta": beta, "gamma": gamma}, policy, batch)
    assert got == pytest.approx(sum(want) / 3, abs=1e-9)

    def log_odds(mean):
        return mean - math.log(1 - math.exp(mean))

    lam = 0.25
    want = [-c / nc - lam * log_sigmoid(log_odds(c / nc) - log_odds(r / nr)) for (c, nc), (r, nr) in pol]
    got, _ = method_loss("orpo", {"beta": lam}, policy, batch)
    assert got == pytest.approx(sum(want) / 3, abs=1e-9)


def test_the_lora_reference_is_the_base_models_log_probs():
    from types import SimpleNamespace

    base = tiny_model(0).float()
    frozen = copy.deepcopy(base)
    pairs, batch = pair_batch()
    lora = create_method("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    method = create_objective("dpo", {})
    recipe = SimpleNamespace(model=SimpleNamespace(path="base"), data=SimpleNamespace(seq_len=32))
    ctx = SimpleNamespace(device=torch.device("cpu"), dist=None, recipe=recipe, tokenizer=None, max_steps=1, seed=0,
                          run_path=None, log=lambda *a: None, base_sha256=None, model_dir=None, objective=method)
    model = lora.prepare(base, ctx)
    method.prepare(model, ctx)
    assert method.adapter_reference
    with torch.no_grad():  # an adapter that changes the outputs, as after some training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = pair_logps(model, batch)[0]
    reference = method.reference_logps(model, batch)
    torch.testing.assert_close(reference.t(), pair_logps(frozen, batch)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, reference.t(), atol=1e-3)
    assert model.training  # the reference pass put the model back in training mode


# ---------------------------------------------------------------- recipes and runs


def base_and_pairs(tmp_path):
    from conftest import pairs_file, write_corpus
    from tunelab import models, tokenizers

    corpus = write_corpus(tmp_path / "corpus", n_docs=20, seed=4)
    tok = tokenizers.train_tokenizer([p.read_text() for p in sorted(corpus.rglob("*.txt"))], vocab_size=384)
    torch.manual_seed(0)
    model = models.build_model("llama-micro", tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base", pairs_file(corpus)


def dpo_recipe(tmp_path, base, pairs, **train):
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps({
        "kind": "finetune", "name": "dpo-full", "model": {"path": str(base)},
        "data": {"train": [{"source": str(pairs), "format": "preference"}], "seq_len": 32, "eval_fraction": 0.2},
        "objective": {"name": "dpo", "options": {"beta": 0.5}},  # method full: the cached reference
        "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 6,
                  "checkpoint_every": 4, "precision": "fp32", "schedule": {"name": "cosine", "warmup_steps": 2},
                  **train}}))
    return path


@pytest.mark.slow
def test_resume_mid_dpo_is_exact(tmp_path):
    base, pairs = base_and_pairs(tmp_path)
    recipe = dpo_recipe(tmp_path, base, pairs)
    ref = run_stage(load_recipe(recipe), out=tmp_path / "ref", quiet=True)
    out = tmp_path / "killed"
    killed_at = run_and_sigkill("finetune", recipe, out, 5)
    assert killed_at < 12
    resumed = run_cli("finetune", str(recipe), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(out / "metrics.jsonl") == train_losses(ref / "metrics.jsonl")
    events = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    assert train[-1]["reward_accuracy"] >= 0.75 and train[-1]["reward_margin"] > 0
    held = [e for e in events if e["event"] == "eval" and e["domain"] == pairs.stem]
    assert [e["step"] for e in held] == [0, 6, 12] and all(0 <= e["pref_accuracy"] <= 1 for e in held)
    assert held[-1]["logp_margin"] > held[0]["logp_margin"]  # it learned to prefer the chosen replies


def test_preference_data_and_objectives_must_meet(tmp_path):
    pairs = {"source": "pairs.jsonl", "format": "preference"}
    dpo = {"name": "dpo"}
    with pytest.raises(ConfigError, match="objective dpo trains on preference pairs: data.train needs"):
        validate_recipe({"data": {"train": "builtin:prose"}, "objective": dpo}, "r.yaml")
    with pytest.raises(ConfigError, match="holds preference pairs: train them with objective dpo | simpo | orpo"):
        validate_recipe({"data": {"train": [pairs]}, "method": {"name": "lora"}}, "r.yaml")
    with pytest.raises(ConfigError, match="cannot be mixed with text or chat sources"):
        validate_recipe({"data": {"train": [pairs, "builtin:prose"]}, "objective": dpo}, "r.yaml")
    with pytest.raises(ConfigError, match="^r.yaml: objective.name: method mezo with objective dpo cannot work: "
                                          "mezo has no backward pass"):
        validate_recipe({"data": {"train": [pairs]}, "objective": dpo, "method": {"name": "mezo"}}, "r.yaml")
    with pytest.raises(ConfigError, match="method.options: r: Input should be greater"):
        validate_recipe({"data": {"train": [pairs]}, "objective": {"name": "orpo"},
                         "method": {"name": "lora", "options": {"r": 0}}}, "r")
    with pytest.raises(ConfigError, match="objective.options: beta: Input should be greater"):
        validate_recipe({"data": {"train": [pairs]}, "objective": {"name": "dpo", "options": {"beta": -1}}}, "r.yaml")
    assert SourceSpec(source="builtin:preference").format == "preference"
    cfg = validate_recipe({"data": {"train": "builtin:preference"}, "objective": {"name": "simpo"}}, "r.yaml")
    assert (cfg.method.name, cfg.objective.name) == ("full", "simpo")


@pytest.mark.parametrize(("old", "new"), [
    ({"method": {"name": "dpo", "options": {"beta": 0.2, "tuning": {"name": "lora", "options": {"r": 4}}}}},
     "method.name: dpo is an objective now: write objective: {name: dpo, options: {beta: 0.2}} and method: "
     "{name: lora, options: {r: 4}}"),
    ({"method": {"name": "simpo"}}, "write objective: {name: simpo} and method: {name: full}"),
    ({"train": {"objective": "mlm", "mlm_probability": 0.3}},
     "train.objective, train.mlm_probability: moved to their own section: write objective: "
     "{name: mlm, options: {mlm_probability: 0.3}}"),
])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_a_recipe_in_the_old_spelling_gets_its_new_spelling_in_one_line(old, new, kind):
    with pytest.raises(ConfigError) as err:
        validate_recipe({"model": {"path": "m"}, "data": {"train": "builtin:preference"}, **old}, "r.yaml", kind)
    assert new in str(err.value) and "\n" not in str(err.value)
