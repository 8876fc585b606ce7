"""Supervised instruction tuning end to end: a tiny model fine-tuned on builtin:instruct learns (its held-out
reply loss falls), saves the chat template it was trained with, and `tunelab chat` answers; bad chat data
is a one-line error (exit 2)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from tunelab.runs import read_metrics


def cli(monkeypatch, capsys, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`tunelab ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from tunelab.commands.cli import main

    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A freshly initialised llama-micro with a 512-token BPE trained on the instruction data itself."""
    import torch

    from tunelab import models, tokenizers
    from tunelab.data.chat import chat_from_row
    from tunelab.data.instruct import builtin_instruct_file
    from tunelab.paths import resolve_cache_dir

    out = tmp_path_factory.mktemp("sft") / "base"
    lines = builtin_instruct_file("instruct", resolve_cache_dir()).read_text().splitlines()
    tok = tokenizers.train_tokenizer([chat_from_row(json.loads(line), "x").text() for line in lines], 512)
    torch.manual_seed(0)
    models.build_model("llama-micro", tok, {"max_position_embeddings": 256}).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_run(base):
    from tunelab.recipe import validate_recipe
    from tunelab.stages import run_stage

    cfg = validate_recipe({
        "kind": "finetune", "name": "sft", "model": {"path": str(base)},
        "data": {"train": "builtin:instruct", "seq_len": 128, "packing": "document", "eval_fraction": 0.05},
        "method": {"name": "full"},
        "train": {"max_steps": 12, "micro_batch_size": 8, "lr": 5e-3, "precision": "fp32", "log_every": 4,
                  "eval_every": 6, "eval_max_tokens": 2048, "schedule": {"name": "constant"}, "seed": 0}}, "sft")
    return run_stage(cfg, out=base.parent / "run", quiet=True)


def test_held_out_reply_loss_falls_and_the_template_is_saved(sft_run):
    from transformers import AutoTokenizer

    from tunelab.tokenizers import BUILTIN_TEMPLATE

    evals = [e for e in read_metrics(sft_run / "metrics.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 6, 12] and {e["domain"] for e in evals} == {"instruct"}
    assert evals[0]["eval_tokens"] == evals[-1]["eval_tokens"] > 0  # the same held-out replies each time
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5, [e["loss"] for e in evals]
    assert AutoTokenizer.from_pretrained(sft_run / "final").chat_template == BUILTIN_TEMPLATE


def test_chat_prints_a_reply_once_and_per_line_of_stdin(sft_run, monkeypatch, capsys):
    final = str(sft_run / "final")
    code, out, err = cli(monkeypatch, capsys, "chat", final, "--message", "What does `json.dumps` do?",
                         "--greedy", "--max-new-tokens", "12")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.strip()
    code, again, _ = cli(monkeypatch, capsys, "chat", final, "--message", "What does `json.dumps` do?",
                         "--greedy", "--max-new-tokens", "12")
    assert again == out  # greedy: deterministic
    code, out, err = cli(monkeypatch, capsys, "chat", final, "--max-new-tokens", "8", "--seed", "1",
                         stdin="What is `os.path.join` for?\n\nHow is it called?\n")
    assert code == 0, err
    assert len(out.splitlines()) == 2  # one reply per message; the blank line is not a message


def test_bad_chat_data_is_a_one_line_error(base, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, _, err = cli(monkeypatch, capsys, "finetune", "sft-full", "--out", str(tmp_path / "run"), "--quiet",
                       "--set", f"model.path={base}", "--set", f"data.train=[{{source: {bad}, format: chat}}]")
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: {bad}:2: no assistant turn, so nothing to train on; add the "
                                            "reply or remove the example")


def test_the_shipped_lora_recipe_trains_on_chat_data_and_its_adapter_chats(base, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "finetune", "sft-lora", "--out", str(tmp_path / "run"), "--quiet",
                       "--set", f"model.path={base}", "--set", "train.max_steps=2", "--set", "train.micro_batch_size=2",
                       "--set", "data.seq_len=128", "--set", "train.eval_max_tokens=256",
                       "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file()
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {e["domain"] for e in events if e["event"] == "eval"} == {"instruct"}
    code, out, err = cli(monkeypatch, capsys, "chat", str(final), "--message", "What does `json.loads` do?",
                         "--greedy", "--max-new-tokens", "6")
    assert code == 0 and out.count("\n") == 1, err  # one reply (an untrained adapter may stop at once)


@pytest.mark.parametrize("recipe", ["dpo-lora", "simpo"])
def test_the_shipped_preference_recipes_run_after_sft(sft_run, tmp_path, monkeypatch, capsys, recipe):
    code, _, err = cli(monkeypatch, capsys, "finetune", recipe, "--out", str(tmp_path / "run"), "--quiet",
                       "--set", f"model.path={sft_run / 'final'}", "--set", "train.max_steps=2",
                       "--set", "train.micro_batch_size=2", "--set", "data.seq_len=128",
                       "--set", "train.eval_max_tokens=512", "--set", "train.checkpoint_every=0",
                       "--set", "train.eval_every=0")
    assert code == 0, err
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    # The held-out pairs, and the SFT stage's held-out replies (an ancestor's data: forgetting is tracked).
    assert {e["domain"] for e in evals} == {"preference", "instruct"}
    pairs = [e for e in evals if e["domain"] == "preference"]
    assert all(0 <= e["pref_accuracy"] <= 1 and e["pairs"] > 0 for e in pairs)
    train = [e for e in events if e["event"] == "train"]
    assert all("reward_accuracy" in e and "logps_chosen" in e for e in train)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() == (recipe == "dpo-lora")
    code, out, err = cli(monkeypatch, capsys, "chat", str(final), "--message", "What does `json.loads` do?",
                         "--greedy", "--max-new-tokens", "6")
    assert code == 0 and out.count("\n") == 1, err
