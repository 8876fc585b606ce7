"""Lottery tickets at 80% sparsity: winning ticket vs random ticket, rewinding to init vs to an early step.

RESEARCH.md section 5 claims that a winning ticket at 80% sparsity trains to the dense loss while a random
ticket does not, and that rewinding to an early step beats rewinding to init ("Stabilizing the LTH").
This measures both on the built-in corpus with `tunelab prune` (method imp).

    .venv/bin/python benchmarks/exp_lottery.py            # 3 seeds (about 30 min on 2 cores); prints the table
                                                          #   and writes benchmarks/out/lottery-exp/results.json
    .venv/bin/python benchmarks/exp_lottery.py --write    # ... and the lottery part of RESULTS.md
    .venv/bin/python benchmarks/exp_lottery.py --smoke    # plumbing check: steps / 10, seed 0, prints only

The setup is fixed before running (nothing tuned on the results). Per seed s (0, 1, 2), in-process with
TUNELAB_CACHE=benchmarks/out/cache, into benchmarks/out/lottery-exp/seed-s/ (resumable):

    dense network  llama-tiny (vocab 4096 BPE on prose), builtin:prose 300 steps, cosine (warmup 30, min 0.1),
                   lr 3e-3, weight decay 0.1, batch 16 x 128 tokens, fp32, seed s   (= exp_merge's base)
    IMP            3 rounds to 80% sparsity of the blocks' linear weights (41.5% of the remaining weights per
                   round, per matrix: 41.5%, 65.8%, 80.0%); each round retrains the whole 300-step schedule
                   from the rewound survivors under the masks (method masked)
    rewind         step-20 (the dense run's weights after 20 of 300 steps) and init (before training); the
                   init lottery reuses the step-20 lottery's dense run (the same run, bit for bit)
    random ticket  the last round's per-matrix sparsity with a random mask (seed s), same rewind point
    evaluation     held-out split (fraction 0.05) of builtin:prose at the end of every run, seq_len 128,
                   8,192 tokens (the runs' own final evaluation)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from experiments import ROOT, fmt, run_experiment

sys.path.insert(0, str(ROOT))
REWINDS = ("step-20", "init")


def train_recipe(seed: int, steps: int, warmup: int) -> dict:
    return {"name": "exp-lottery", "model": {"preset": "llama-tiny"},
            "tokenizer": {"vocab_size": 4096, "train_bytes": 4_000_000},
            "data": {"train": "builtin:prose", "seq_len": 128, "eval_fraction": 0.05},
            "train": {"max_steps": steps, "micro_batch_size": 16, "precision": "fp32", "lr": 3e-3,
                      "weight_decay": 0.1, "schedule": {"name": "cosine", "warmup_steps": warmup, "min_lr_ratio": 0.1},
                      "eval_max_tokens": 8192, "log_every": 50, "seed": seed}}


def run_seed(seed: int, root: Path, k) -> dict:
    import yaml

    from tunelab.config import PruneRecipe, validate
    from tunelab.stages.prune import run_prune

    where = root / f"seed-{seed}"
    where.mkdir(parents=True, exist_ok=True)
    recipe_file = where / "train.yaml"
    recipe_file.write_text(yaml.safe_dump(train_recipe(seed, k(300), k(30))))
    results = {}
    for rewind in REWINDS:
        step = f"step-{k(20)}" if rewind.startswith("step-") else rewind
        out = where / f"rewind-{rewind}"
        if rewind == "init" and not (out / "rounds" / "round-0" / "final").is_dir():
            first = where / f"rewind-{REWINDS[0]}" / "rounds"  # the same dense run: reuse it
            for name in ("init", "round-0"):
                shutil.copytree(first / name, out / "rounds" / name, dirs_exist_ok=True)
        cfg = validate({"kind": "prune", "name": f"lottery-{rewind}", "method": "imp", "sparsity": 0.8,
                        "scope": "layer", "seed": seed,
                        "lottery": {"train": str(recipe_file), "rounds": 3, "rewind": step, "random_ticket": True}},
                       "exp_lottery", PruneRecipe)
        t0 = time.time()
        run_prune(cfg, out=out, resume=True, quiet=True)
        record = json.loads((out / "prune.json").read_text())
        results[rewind] = {"rounds": [{"sparsity": r["sparsity"], "loss": r["eval"]["prose"]} for r in record["rounds"]],
                           "random": record["random_ticket"]["eval"]["prose"]}
        print(f"  rewind {rewind}: {time.time() - t0:.0f} s", flush=True)
    return results


def render(per_seed: dict, seeds: list[int]) -> str:
    from tunelab.runs import cpu_name

    lines = ["## Lottery tickets at 80% sparsity (`exp_lottery.py`)", "",
             f"Setup in the script's docstring (fixed before running); seeds {', '.join(map(str, seeds))}; "
             f"{cpu_name()}, {time.strftime('%Y-%m-%d')}. Held-out prose loss after each run's 300 steps (mean ± "
             "sample std over seeds). \"vs dense\" and \"vs random\" are per-seed differences (negative: the ticket "
             "is better).", "",
             "| rewind | network | sparsity | held-out loss | vs dense | vs random ticket |",
             "|---|---|---:|---:|---:|---:|"]
    for rewind in REWINDS:
        dense = [per_seed[s][rewind]["rounds"][0]["loss"] for s in seeds]
        random = [per_seed[s][rewind]["random"] for s in seeds]
        n_rounds = len(per_seed[seeds[0]][rewind]["rounds"])
        for r in range(n_rounds):
            losses = [per_seed[s][rewind]["rounds"][r]["loss"] for s in seeds]
            sparsity = per_seed[seeds[0]][rewind]["rounds"][r]["sparsity"]
            name = "dense" if r == 0 else f"IMP round {r}"
            vs_dense = fmt([a - b for a, b in zip(losses, dense)]) if r else "-"
            vs_random = fmt([a - b for a, b in zip(losses, random)]) if r == n_rounds - 1 else "-"
            lines.append(f"| {rewind} | {name} | {sparsity:.1%} | {fmt(losses)} | {vs_dense} | {vs_random} |")
        lines.append(f"| {rewind} | random ticket | {per_seed[seeds[0]][rewind]['rounds'][-1]['sparsity']:.1%} | "
                     f"{fmt(random)} | {fmt([a - b for a, b in zip(random, dense)])} | - |")
    return "\n".join(lines)


def main() -> None:
    run_experiment(__doc__, "lottery-exp", "lottery", run_seed, render)


if __name__ == "__main__":
    main()
