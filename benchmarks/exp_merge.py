"""Merging a prose-tuned and a code-tuned model: averaging vs task arithmetic vs TIES vs breadcrumbs (vs DARE-TIES).

RESEARCH.md section 5 claims that TIES and breadcrumbs beat plain averaging when merging models tuned
on different domains, judged by the worst domain's loss. This measures it on the built-in corpus.

    .venv/bin/python benchmarks/exp_merge.py            # 3 seeds (about 10 min on 2 cores); prints the table and
                                                        #   writes benchmarks/out/merge-exp/results.json
    .venv/bin/python benchmarks/exp_merge.py --write    # ... and the merge:experiment part of RESULTS.md
    .venv/bin/python benchmarks/exp_merge.py --smoke    # plumbing check: steps / 10, seed 0, prints only

The setup is fixed before running (nothing tuned on the results). Per seed s (0, 1, 2), in-process with
TUNELAB_CACHE=benchmarks/out/cache, into benchmarks/out/merge-exp/seed-s/ (resumable: finished runs and
merges are skipped):

    base         llama-tiny (vocab 4096 BPE on prose), builtin:prose 300 steps, cosine (warmup 30, min 0.1),
                 lr 3e-3, batch 16 x 128 tokens, fp32, seed s             (= exp_continual's base)
    prose-tuned  init_from base, builtin:prose 150 more steps, cosine (warmup 15, min 0.1), seed s
    code-tuned   init_from base, builtin:code 150 steps, cosine (warmup 15, min 0.1), seed s
    merges of prose-tuned and code-tuned (`tunelab merge`, base = the base where a method needs one):
      average            linear, weights 0.5 / 0.5
      task arithmetic    base + 1.0 x (d_prose + d_code)
      TIES               density 0.5, weights 1 / 1, scale 1
      breadcrumbs avg    density 0.9, gamma 0.01, weights 0.5 / 0.5 (the average, with masked deltas)
      breadcrumbs sum    density 0.9, gamma 0.01, weights 1 / 1, scale 1
      DARE-TIES          density 0.5, weights 1 / 1, scale 1, seed 0
    evaluation           every model on the held-out split (fraction 0.05) of builtin:prose and builtin:code,
                         seq_len 128, 32,768 tokens per domain (the merge stage's own table); worst domain =
                         the higher of the two losses
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from experiments import ROOT, fmt, start

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
DOMAINS = ("prose", "code")
MERGES = {  # name -> (method, weights, options)
    "average": ("linear", [0.5, 0.5], {}),
    "task arithmetic": ("task_arithmetic", [1.0, 1.0], {"scale": 1.0}),
    "TIES": ("ties", [1.0, 1.0], {"density": 0.5, "scale": 1.0}),
    "breadcrumbs avg": ("breadcrumbs", [0.5, 0.5], {"density": 0.9, "gamma": 0.01, "scale": 1.0}),
    "breadcrumbs sum": ("breadcrumbs", [1.0, 1.0], {"density": 0.9, "gamma": 0.01, "scale": 1.0}),
    "DARE-TIES": ("dare_ties", [1.0, 1.0], {"density": 0.5, "scale": 1.0, "seed": 0}),
}


def train(out: Path, recipe: dict) -> Path:
    from tunelab.recipe import validate_recipe
    from tunelab.stages import run_stage

    if (out / "final" / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts over (they take a minute)
    t0 = time.time()
    run_stage(validate_recipe(recipe, str(out), "pretrain"), out=out, quiet=True)
    print(f"  trained {out.name} in {time.time() - t0:.0f} s", flush=True)
    return out


def recipe(seed: int, steps: int, warmup: int, source: str, init_from: str | None = None) -> dict:
    data = {"name": "exp-merge", "model": {"preset": "llama-tiny"},
            "tokenizer": {"vocab_size": 4096, "train_bytes": 4_000_000},
            "data": {"train": source, "seq_len": 128, "eval_fraction": 0.05},
            "train": {"max_steps": steps, "micro_batch_size": 16, "precision": "fp32", "lr": 3e-3,
                      "weight_decay": 0.1, "schedule": {"name": "cosine", "warmup_steps": warmup, "min_lr_ratio": 0.1},
                      "eval_max_tokens": 8192, "log_every": 50, "seed": seed}}
    if init_from:
        data["init_from"] = init_from
    return data


def run_seed(seed: int, root: Path, k, max_tokens: int) -> dict:
    from tunelab.stages.merge import run_merge, validate_merge

    where = root / f"seed-{seed}"
    base = train(where / "base", recipe(seed, k(300), k(30), "builtin:prose"))
    prose = train(where / "prose-tuned", recipe(seed, k(150), k(15), "builtin:prose", str(base)))
    code = train(where / "code-tuned", recipe(seed, k(150), k(15), "builtin:code", str(base)))
    tables = {}
    for name, (method, weights, options) in MERGES.items():
        cfg = validate_merge({
            "name": name, "method": method, "options": options,
            "models": [{"path": str(prose), "weight": weights[0]}, {"path": str(code), "weight": weights[1]}],
            **({"base": str(base)} if method != "linear" else {}),
            "eval": {"data": [f"builtin:{d}" for d in DOMAINS], "seq_len": 128, "max_tokens": max_tokens,
                     "eval_fraction": 0.05}}, f"exp_merge {name}")
        out = run_merge(cfg, out=where / name.replace(" ", "-"), resume=True, quiet=True)
        tables[name] = json.loads((out / "merge.json").read_text())["eval"]["table"]
        print(f"  merged {name}", flush=True)
    return tables


def summarize(per_seed: dict[int, dict]) -> dict:
    """model -> {prose, code, worst, worst_vs_best_parent}: lists over seeds."""
    rows: dict[str, dict[str, list[float]]] = {}
    for tables in per_seed.values():
        for label in ("base", "prose-tuned", "code-tuned"):  # every table scores the parents (and the base, if used)
            table = next(t for t in tables.values() if label in t["columns"])
            entry = rows.setdefault(label, {})
            for r in table["rows"]:
                entry.setdefault(r["domain"], []).append(r["loss"][label])
            entry.setdefault("worst", []).append(table["worst_loss"][label])
        parents = next(iter(tables.values()))["worst_loss"]
        best_parent = min(parents["prose-tuned"], parents["code-tuned"])
        for name, table in tables.items():
            entry = rows.setdefault(name, {})
            losses = {r["domain"]: r["loss"]["merge"] for r in table["rows"]}
            for d in DOMAINS:
                entry.setdefault(d, []).append(losses[d])
            entry.setdefault("worst", []).append(table["worst_loss"]["merge"])
            entry.setdefault("worst_vs_best_parent", []).append(table["worst_loss"]["merge"] - best_parent)
    return rows


def render(rows: dict, seeds: list[int]) -> str:
    from tunelab.runs import cpu_name

    lines = ["## Merging a prose-tuned and a code-tuned model (`exp_merge.py`)", "",
             f"Setup in the script's docstring (fixed before running); seeds {', '.join(map(str, seeds))}; "
             f"{cpu_name()}, {time.strftime('%Y-%m-%d')}. Held-out loss on the built-in prose and code domains "
             "(mean ± sample std over seeds); worst = the higher of the two. The last two columns are per-seed "
             "differences of the worst-domain loss: against the better parent's worst-domain loss (negative: the "
             "merge beats both parents on its worst domain) and against plain averaging (negative: better than "
             "averaging).", "",
             "| model | prose | code | worst domain | worst vs best parent | worst vs average |",
             "|---|---:|---:|---:|---:|---:|"]
    average = rows.get("average", {}).get("worst")
    for name, entry in rows.items():
        vs = fmt(entry["worst_vs_best_parent"]) if "worst_vs_best_parent" in entry else "-"
        paired = (fmt([a - b for a, b in zip(entry["worst"], average)])
                  if average and "worst_vs_best_parent" in entry and name != "average" else "-")
        lines.append(f"| {name} | {fmt(entry['prose'])} | {fmt(entry['code'])} | {fmt(entry['worst'])} | {vs} | "
                     f"{paired} |")
    return "\n".join(lines)


def main() -> None:
    args, k, seeds, root = start(__doc__, "merge-exp")
    per_seed = {}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed] = run_seed(seed, root, k, 4096 if args.smoke else 32768)
    rows = summarize(per_seed)
    (root / "results.json").write_text(json.dumps({"per_seed": per_seed, "summary": rows}, indent=2))
    table = render(rows, seeds)
    print("\n" + table)
    if args.write and not args.smoke:
        from bench_merge_memory import write_section

        write_section("experiment", table)
        print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
