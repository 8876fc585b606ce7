"""What a new user meets at the command line: usage errors, --version, Ctrl-C, help text, early path checks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, last_logged_step, run_cli, wait_until_logged


@pytest.mark.parametrize("args, message", [
    (["pretrain", "quickstart", "--maxsteps", "3"], "No such option: --maxsteps"),
    (["pretrian"], "No such command 'pretrian'"),
    (["eval"], "Missing argument 'MODEL_DIR...'"),
])
def test_usage_errors_are_a_short_message_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4  # usage, hint, blank, error


def test_version():
    from tunelab import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tunelab {__version__}"


def test_a_missing_data_path_fails_before_torch_is_imported(tmp_path):
    """Path mistakes are reported in a second, not after the heavy imports."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"preset": "llama-micro"},
                                      "data": {"train": str(tmp_path / "nope.txt"), "eval": "builtin:code"}}))
    code = ("import sys\nfrom tunelab.commands.cli import main\n"
            f"sys.argv = ['tunelab', 'pretrain', {str(recipe)!r}, '--out', {str(tmp_path / 'run')!r}]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert "data.train" in result.stderr and "nope.txt" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "run").exists()


def _help(*command: str) -> str:
    result = run_cli(*command, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_option_has_a_description_and_a_conventional_metavar():
    import typer

    from tunelab.commands.cli import app
    from tunelab.commands.cli_help import conventional_metavars

    command = typer.main.get_command(app)
    conventional_metavars(command)
    for name, sub in command.commands.items():
        for param in sub.params:
            if param.param_type_name == "option":
                assert param.help, f"tunelab {name} {param.opts[0]} has no description"
    for args in (["pretrain"], ["eval"], ["generate"], ["merge"], []):
        text = _help(*args)
        assert "<bool>" not in text and "<list[" not in text and "<str>" not in text, text
    assert "The text to continue" in _help("generate")
    eval_help = _help("eval")
    assert "Tokens per scored window" in eval_help and "no cap" in eval_help
    assert re.search(r"--data +TEXT ", eval_help) and re.search(r"--json +Print JSON", eval_help)  # a flag: none
    assert "default: 0.5" in _help("merge")


def _interrupt_after(recipe, out, step: int) -> subprocess.CompletedProcess:
    """Start a pretraining, send SIGINT (Ctrl-C) once it has logged `step`, and wait for it to exit."""
    # SIGINT restored to its default in the child: a test runner started in the background ignores it,
    # and an ignored SIGINT would be inherited (Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "pretrain", str(recipe), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until_logged(proc, out, step, interval=0.01)
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, corpus_dir):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 320, "train_bytes": 50_000},
        "data": {"train": str(corpus_dir), "seq_len": 32},
        "train": {"max_steps": 100_000, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 2,
                  "eval_every": 0, "eval_max_tokens": 256}}))
    out = tmp_path / "run"
    result = _interrupt_after(recipe, out, step=3)
    assert result.returncode == 130, result.stderr
    assert "step 1/100000  loss " in result.stdout  # piped: plain progress lines, not a bar
    assert "Traceback" not in result.stderr
    interrupted = [line for line in result.stderr.splitlines() if line.startswith("interrupted after step ")]
    assert len(interrupted) == 1 and "of 100000" in interrupted[0] and str(out) in interrupted[0], result.stderr
    checkpoints = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert f"from checkpoint step-{checkpoints[-1]}" in interrupted[0]
    resume = result.stderr.splitlines()[-1].strip()
    assert resume == f"tunelab pretrain {recipe} --out {out} --resume"
    # The command it prints continues the run.
    resumed = run_cli(*resume.split()[1:], "--set", "train.max_steps=" + str(checkpoints[-1] + 1), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert last_logged_step(out / "metrics.jsonl") == checkpoints[-1] + 1


@pytest.mark.parametrize("recipe, message", [
    ({"kind": "finetune", "model": {"path": "m"}, "data": {"train": "builtin:preference"},
      "method": {"name": "dpo", "options": {"beta": 0.2, "tuning": {"name": "lora"}}}},
     "method.name: dpo is an objective now: write objective: {name: dpo, options: {beta: 0.2}} and method: "
     "{name: lora}"),
    ({"model": {"preset": "bert-tiny"}, "train": {"objective": "mlm", "whole_word_masking": True}},
     "train.objective, train.whole_word_masking: moved to their own section: write objective: "
     "{name: mlm, options: {whole_word_masking: true}}"),
    ({"data": {"train": "builtin:preference"}, "objective": {"name": "dpo"}, "method": {"name": "mezo"}},
     "objective.name: method mezo with objective dpo cannot work: mezo has no backward pass"),
    ({"objective": {"name": "mlm"}}, "objective.name: mlm trains an encoder, but the starting model is a causal LM"),
])
def test_a_recipe_the_two_axes_refuse_is_one_line_exit_2_and_nothing_written(tmp_path, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_cli(recipe.get("kind", "pretrain"), str(path), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines
    assert not out.exists()
