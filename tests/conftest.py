"""Shared test set-up: hermetic caches, no network, a small deterministic text corpus."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Everything offline, and one token cache per test session (unless the caller chose one, as CI does),
# so the built-in corpus is extracted and tokenized once and shared by subprocesses too.
os.environ.setdefault("TUNELAB_CACHE", tempfile.mkdtemp(prefix="tunelab-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Under pytest-xdist (`make test` runs one worker per core) each worker and the CLI subprocesses it starts
# use one thread: two workers with two threads each on two cores would only fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the model data token train loss step layer weight value cache file text domain batch "
          "learning rate schedule warmup decay checkpoint resume eval split mixture source").split()


def make_document(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return " ".join(sentences)


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sub = root / ("part-a" if i % 2 else "part-b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(make_document(rng, rng.randint(20, 60)) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~40 short synthetic documents (~100 KB) in nested folders."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """Run `python -m tunelab ...` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO, stdin=subprocess.DEVNULL)


def last_logged_step(metrics: Path) -> int:
    from tunelab.runs import read_metrics

    return max((e["step"] for e in read_metrics(metrics) if e.get("event") == "train"), default=0)


def wait_until_logged(proc, out: Path, step: int, interval: float = 0.005) -> None:
    """Wait until the run in `out` (started as `proc`) has logged `step`; fail if it ends first or takes > 300 s."""
    import time

    deadline = time.time() + 300
    while last_logged_step(out / "metrics.jsonl") < step:
        assert proc.poll() is None, f"the run ended before it reached step {step}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"the run did not reach step {step}"
        time.sleep(interval)


def run_and_sigkill(command: str, recipe: Path, out: Path, after_step: int, *extra: str) -> int:
    """Start `tunelab COMMAND RECIPE --out OUT`, SIGKILL it once it has logged `after_step`; returns the
    last step it logged. The exact-resume tests resume it and compare with an uninterrupted run."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "tunelab", command, str(recipe), "--out", str(out), "--quiet",
                             *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    wait_until_logged(proc, out, after_step)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return last_logged_step(out / "metrics.jsonl")


def pairs_file(corpus: Path) -> Path:
    """Preference pairs beside the corpus, made from its words (deterministic): a short prompt, a chosen reply
    and a rejected one that always starts with "no" (a preference a few steps can learn), short enough that
    every pair fits 32 tokens."""
    import json
    import random

    path = corpus.parent / f"{corpus.name}-pairs.jsonl"
    if not path.exists():
        words = sorted({w for p in sorted(corpus.rglob("*.txt")) for w in p.read_text().split() if w.isalpha()})
        rng = random.Random(0)
        rows = [{"prompt": " ".join(rng.sample(words, 2)), "chosen": " ".join(rng.sample(words, 2)),
                 "rejected": "no " + " ".join(rng.sample(words, 2))} for _ in range(120)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
