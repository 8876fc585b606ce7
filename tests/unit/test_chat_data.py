"""Instruction data: chat examples read from tables, rendered with a chat template into segments whose loss
masks are exact to the token, packed whole into rows where no example attends to another, and the
built-in instruction data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_data_helpers import byte_level_tokenizer
from tunelab.config import SourceSpec
from tunelab.data import collate, tokenize_source
from tunelab.data.chat import Chat, ChatRenderer, chat_from_row, encode_segments
from tunelab.data.rows import ExampleRows, example_spans, pack_rows
from tunelab.tokenizers import BUILTIN_TEMPLATE
from tunelab.errors import DataError

EOS = "<|endoftext|>"
MULTI_TURN = {"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "What is alpha?"},
                           {"role": "assistant", "content": "The first token."},
                           {"role": "user", "content": "And beta?"},
                           {"role": "assistant", "content": "The second one."}]}


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def tokenize(tmp_path, tok, rows, **fields):
    """Every example in one split (split=False), so the arrays are exactly the examples in order."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    return tokenize_source(SourceSpec(source=source, format="chat", **fields), tok, tok.eos_token_id,
                           tmp_path / "cache", 0.1, log=lambda *a: None, split=False)


def runs(token_ids, mask) -> list[tuple[int, list[int]]]:
    """(mask value, ids) of each run of equal mask values."""
    out: list = []
    for i, m in zip(token_ids, mask):
        if not out or out[-1][0] != m:
            out.append((m, []))
        out[-1][1].append(i)
    return out


# ---------------------------------------------------------------- masks, token by token


@pytest.mark.parametrize("turns", ["all", "last"])
def test_multi_turn_masks_are_exact_to_the_token(tmp_path, turns):
    tok = byte_level_tokenizer()
    src = tokenize(tmp_path, tok, [MULTI_TURN], assistant_turns=turns)
    eos = tok.eos_token_id
    # The built-in template, segment by segment (written out by hand), each tokenized on its own: the
    # last reply's EOS comes from the document's closing token.
    expected = [("<|system|>\nAnswer briefly.\n<|user|>\nWhat is alpha?\n<|assistant|>\n", 0),
                (f"The first token.{EOS}", int(turns == "all")),
                ("<|user|>\nAnd beta?\n<|assistant|>\n", 0),
                ("The second one.", 1)]
    want_ids = [t for text, _ in expected for t in ids(tok, text)] + [eos]
    want_mask = [m for text, m in expected for _ in ids(tok, text)] + [1]
    assert np.asarray(src.eval).tolist() == want_ids
    assert np.asarray(src.eval_mask).tolist() == want_mask
    assert np.asarray(src.eval_starts).tolist() == [0]
    # Read back: the targets are exactly the replies with their end-of-turn token, nothing else.
    targets = [tok.decode(r) for m, r in runs(want_ids, want_mask) if m]
    assert targets == ([f"The first token.{EOS}", f"The second one.{EOS}"] if turns == "all"
                       else [f"The second one.{EOS}"])
    assert ids(tok, EOS) == [eos]  # the end of turn is the EOS token itself, not its spelling


def test_both_options_give_the_same_tokens_and_differ_only_in_masks(tmp_path):
    tok = byte_level_tokenizer()
    every = tokenize(tmp_path / "a", tok, [MULTI_TURN] * 2, assistant_turns="all")
    last = tokenize(tmp_path / "b", tok, [MULTI_TURN] * 2, assistant_turns="last")
    assert np.asarray(every.eval).tolist() == np.asarray(last.eval).tolist()
    assert (np.asarray(every.eval_mask) >= np.asarray(last.eval_mask)).all()
    assert every.cache_key != last.cache_key
    assert np.asarray(every.eval_starts).tolist() == [0, len(every.eval) // 2]


def test_prompt_response_and_instruction_input_output_rows():
    assert chat_from_row({"prompt": "p", "response": "r"}, "x") == Chat((("user", "p"), ("assistant", "r")))
    assert chat_from_row({"prompt": "p", "completion": "r", "system": "s"}, "x").messages == (
        ("system", "s"), ("user", "p"), ("assistant", "r"))
    assert chat_from_row({"instruction": "Add", "input": "1 and 2", "output": "3"}, "x").messages == (
        ("user", "Add\n\n1 and 2"), ("assistant", "3"))
    assert chat_from_row({"instruction": "Add", "input": "", "output": "3"}, "x").messages == (
        ("user", "Add"), ("assistant", "3"))


def test_prompt_response_rows_are_masked_to_the_response(tmp_path):
    tok = byte_level_tokenizer()
    src = tokenize(tmp_path, tok, [{"prompt": "alpha beta", "response": "gamma"},
                                   {"instruction": "delta", "input": "token", "output": "cache eval"}])
    token_ids, mask = np.asarray(src.eval).tolist(), np.asarray(src.eval_mask).tolist()
    assert [tok.decode(r) for m, r in runs(token_ids, mask)] == [
        "<|user|>\nalpha beta\n<|assistant|>\n", f"gamma{EOS}",
        "<|user|>\ndelta\n\ntoken\n<|assistant|>\n", f"cache eval{EOS}"]
    assert [m for m, _ in runs(token_ids, mask)] == [0, 1, 0, 1]


def test_a_tokenizer_with_bos_gets_it_once(tmp_path):
    tok = byte_level_tokenizer("bos")
    tok.chat_template = "{{ bos_token }}" + BUILTIN_TEMPLATE  # a template that writes BOS itself, as Llama's do
    src = tokenize(tmp_path, tok, [{"prompt": "alpha", "response": "beta"}])
    token_ids = np.asarray(src.eval).tolist()
    assert token_ids[0] == tok.bos_token_id and token_ids.count(tok.bos_token_id) == 1


def test_the_tokenizers_own_template_is_cut_at_its_turns(tmp_path):
    tok = byte_level_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    renderer = ChatRenderer(tok)
    assert not renderer.builtin and renderer.stop_text == "<|im_end|>"
    segments = renderer.segments([("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")], "all")
    assert segments == [("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n", False),
                        ("a1<|im_end|>\n", True),
                        ("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", False),
                        ("a2<|im_end|>\n", True)]
    # Inference renders the same history with the generation prompt, cut the same way: the same tokens.
    prompt = renderer.segments([("user", "q1"), ("assistant", "a1"), ("user", "q2")], add_generation_prompt=True)
    assert [text for text, _ in prompt] == [text for text, _ in segments[:3]]
    # The template is part of the cache key: another template, other tokens.
    first = tokenize(tmp_path / "a", tok, [MULTI_TURN])
    tok.chat_template = None
    assert tokenize(tmp_path / "a", tok, [MULTI_TURN]).cache_key != first.cache_key


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = byte_level_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="prefix of its continuation"):
        ChatRenderer(tok).segments([("user", "q"), ("assistant", "a")])


def test_encode_segments_matches_the_token_cache(tmp_path):
    tok = byte_level_tokenizer("bos")
    src = tokenize(tmp_path, tok, [MULTI_TURN])
    segments = ChatRenderer(tok).segments(MULTI_TURN["messages"])
    assert encode_segments(tok, segments) == (np.asarray(src.eval).tolist(), np.asarray(src.eval_mask).tolist())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("row, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"chat\.jsonl:2: not a JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"chat\.jsonl:2: no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"chat\.jsonl:2: message 0 is not"),
    ({"messages": "hi"}, r"chat\.jsonl:2: 'messages' must be a list"),
    ({"text": "hi"}, r"chat\.jsonl:2: not a chat example \(has: text\)"),
    ({"prompt": "p", "response": 3}, r"chat\.jsonl:2: field 'response' holds a int"),
])
def test_bad_rows_are_one_line_errors_with_file_and_line(tmp_path, row, message):
    tok = byte_level_tokenizer()
    with pytest.raises(DataError, match=message) as err:
        tokenize(tmp_path, tok, [{"prompt": "p", "response": "r"}, row])
    assert "\n" not in str(err.value)


def test_chat_sources_read_tables_only_and_are_for_causal_lms(tmp_path):
    from tunelab.recipe import validate_recipe

    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", [{"prompt": "p", "response": "r"}])
    (tmp_path / "folder" / "notes.txt").write_text("text")
    with pytest.raises(DataError, match="a chat source reads tables"):
        tokenize_source(SourceSpec(source=str(tmp_path / "folder"), format="chat"), byte_level_tokenizer(), 0,
                        tmp_path / "cache", 0.1, log=lambda *a: None)
    assert SourceSpec(source="builtin:instruct").format == "chat"
    with pytest.raises(ValueError, match="assistant_turns: only for format: chat"):
        SourceSpec(source="x.jsonl", assistant_turns="last")
    with pytest.raises(ValueError, match="builtin:instruct holds chat examples"):
        SourceSpec(source="builtin:instruct", format="text")
    with pytest.raises(Exception, match="is a chat source"):
        validate_recipe({"data": {"train": "builtin:instruct"}, "model": {"preset": "bert-tiny"}}, "r")


# ---------------------------------------------------------------- rows: packing and truncation


def test_long_examples_are_cut_from_the_left_or_dropped_and_counted():
    # Three examples: 5 tokens; 12 tokens with a 3-token reply (cut to 8); 12 tokens with a 9-token reply (dropped).
    mask = np.array([0, 0, 0, 1, 1] + [0] * 9 + [1] * 3 + [0] * 3 + [1] * 9, dtype=np.uint8)
    starts = np.array([0, 5, 17])
    start, end, stats = example_spans(len(mask), starts, mask, seq_len=8)
    assert start.tolist() == [0, 9] and end.tolist() == [5, 17]
    assert (stats.examples, stats.cut, stats.dropped) == (3, 1, 1)
    rows = ExampleRows(np.arange(len(mask)), starts, mask, 8, pad_id=99)
    lines = rows.describe("instruct", "document")
    assert lines[1] == ("warning: instruct: 2 of 3 examples are longer than data.seq_len=8: 1 cut from the left (the "
                        "start of their prompt is lost), 1 dropped (their last reply does not fit with its prompt)")
    assert rows[0]["input_ids"].tolist() == list(range(9, 17))  # the kept tail, its reply whole


def test_rows_pack_whole_examples_best_fit_and_pad():
    assert pack_rows(np.array([3, 6, 2, 5, 4]), 8, one_per_row=False) == [[1, 2], [0, 3], [4]]
    assert pack_rows(np.array([3, 6]), 8, one_per_row=True) == [[0], [1]]
    tokens = np.arange(10, 24)
    mask = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=np.uint8)
    rows = ExampleRows(tokens, np.array([0, 3, 6]), mask, 10, pad_id=0)
    assert len(rows) == 2
    first = rows[0]  # the 8-token example alone is row 0 (longest first), the 3 + 3 in row 1
    assert first["input_ids"].tolist() == list(range(16, 24)) + [0, 0]
    assert first["position_ids"].tolist() == list(range(8)) + [0, 1]
    assert first["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    second = rows[1]
    assert second["input_ids"].tolist() == list(range(10, 16)) + [0] * 4
    assert second["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    used, targets = rows.efficiency()
    assert used == pytest.approx(14 / 20) and targets == pytest.approx(8 / 20)
    padded = ExampleRows(tokens, np.array([0, 3, 6]), mask, 10, pad_id=0, one_per_row=True)
    assert len(padded) == 3 and padded[1]["input_ids"].tolist() == [13, 14, 15] + [0] * 7


def test_a_batch_mixing_chat_rows_and_plain_windows_collates():
    batch = collate([{"input_ids": np.arange(4), "position_ids": np.arange(4), "loss_mask": np.array([0, 0, 1, 1])},
                     {"input_ids": np.arange(4), "position_ids": np.arange(4)}])
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(attn):
    """The logits of each example inside a packed row equal its logits alone (fp32)."""
    from tunelab import models

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    model = models.build_model("llama-micro", tok, attn_implementation=attn).eval()
    rng = np.random.default_rng(0)
    lengths = [7, 5, 9, 4]
    tokens = rng.integers(1, len(tok), sum(lengths))
    starts = np.cumsum([0] + lengths[:-1])
    mask = np.ones(len(tokens), dtype=np.uint8)
    rows = ExampleRows(tokens, starts, mask, 16, pad_id=tok.eos_token_id)
    assert len(rows) == 2 and all(len(r) == 2 for r in rows.rows)  # two examples per row, then padding
    batch = collate([rows[0], rows[1]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits
        for r, members in enumerate(rows.rows):
            at = 0
            for e in members:
                example = torch.from_numpy(tokens[starts[e]:starts[e] + lengths[e]])[None]
                alone = model(input_ids=example, use_cache=False).logits
                torch.testing.assert_close(packed[r, at:at + lengths[e]], alone[0], atol=1e-5, rtol=1e-5)
                if at:  # without restarting positions the second example would see the first
                    assert not torch.allclose(crossing[r, at:at + lengths[e]], alone[0], atol=1e-3)
                at += lengths[e]


# ---------------------------------------------------------------- built-in instruction data


def test_builtin_instruct_and_preference_files_are_generated_deterministically(tmp_path):
    from tunelab.data.instruct import builtin_instruct_file

    root = tmp_path / "stdlib"
    (root / "pkg").mkdir(parents=True)
    functions = "".join(f'def func{i}(a, b={i}):\n    """Return the value number {i} of a and b."""\n\n'
                        for i in range(12))
    (root / "mod.py").write_text(functions + 'def _private():\n    """Hidden from the data."""\n')
    (root / "pkg" / "__init__.py").write_text('class Thing:\n    def run(self, x):\n        """Run the thing on x."""\n'
                                              '    @property\n    def size(self):\n        """Its size, a property."""\n')
    (root / "test_mod.py").write_text('def helper():\n    """A test helper, never asked about."""\n')
    path = builtin_instruct_file("instruct", tmp_path / "a", root=root)
    again = builtin_instruct_file("instruct", tmp_path / "b", root=root)
    assert path.read_text() == again.read_text()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 13  # 12 functions + Thing.run (private, property and test functions skipped)
    chats = [chat_from_row(r, "x") for r in rows]
    asked = [next(c for r, c in chat.messages if r == "user") for chat in chats]
    assert any("`mod.func3`" in q for q in asked) and any("`pkg.Thing.run`" in q for q in asked)
    run = next(c for c in chats if "`pkg.Thing.run`" in c.messages[-2][1] or "`pkg.Thing.run`" in c.messages[0][1])
    assert ("assistant", "Run the thing on x.") in run.messages
    two_turn = [c for c in chats if len(c.messages) == 4]
    for chat in two_turn:  # "How is it called?" -> the signature, without self
        assert chat.messages[3][1].startswith("`") and "self" not in chat.messages[3][1]
    pairs = [json.loads(line) for line in builtin_instruct_file("preference", tmp_path / "a", root=root)
             .read_text().splitlines()]
    assert len(pairs) == 13 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["messages"][-1]["role"] == "user" for p in pairs)


def test_the_padding_tail_of_a_chat_batch_is_dropped_without_changing_loss_or_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.train.objectives import add_labels, trim_after_last_target

    # Three examples, one per row (packing: pad) in rows of 16: the longest ends at column 9.
    tokens = np.arange(1, 22) % 30 + 1
    mask = np.array([0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1, 1, 1] + [0, 1, 1, 0, 1, 1, 1], dtype=np.uint8)
    rows = ExampleRows(tokens, np.array([0, 5, 14]), mask, 16, pad_id=0, one_per_row=True)
    batch = add_labels(collate([rows[i] for i in range(3)]), "clm")
    trimmed = trim_after_last_target(batch)
    assert trimmed["input_ids"].shape == (3, 9) and torch.equal(trimmed["labels"], batch["labels"][:, :9])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).double()
    losses, grads = [], []
    for b in (batch, trimmed):
        model.zero_grad()
        loss = model(**b, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
