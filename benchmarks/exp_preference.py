"""Instruction and preference tuning on the built-in data: SFT, then DPO (and SimPO) with LoRA.

What it measures (issue: instruction and preference tuning): the held-out response loss after SFT, and how
often the model prefers the chosen reply of a held-out pair before and after preference tuning.

    .venv/bin/python benchmarks/exp_preference.py            # 3 seeds; prints the table and writes
                                                             #   benchmarks/out/preference-exp/results.json
    .venv/bin/python benchmarks/exp_preference.py --write    # ... and the preference part of RESULTS.md
    .venv/bin/python benchmarks/exp_preference.py --smoke    # plumbing check: steps / 10, seed 0, prints only

The setup is fixed before running (nothing tuned on the results). Per seed s (0, 1, 2), in-process with
TUNELAB_CACHE=benchmarks/out/cache, into benchmarks/out/preference-exp/seed-s/ (resumable: a finished stage
is skipped, an interrupted one resumed):

    base    llama-tiny (vocab 4096 BPE trained on the code), builtin:code 300 steps, cosine (warmup 30, min
            0.1), lr 3e-3, weight decay 0.1, batch 16 x 128 tokens, fp32, seed s. The code corpus is the
            stdlib's source, so the base has read the docstrings the instruction data quotes.
    SFT     method full on builtin:instruct (chat, loss on the replies only, packing document), 150 steps,
            batch 16 x 128, lr 1e-3 cosine (warmup 15, min 0.1), weight decay 0, eval_fraction 0.05, seed s
    DPO     from the SFT model: method dpo (beta 0.1) with LoRA r 16 / alpha 32 on all linear layers (the
            reference is the adapter-disabled SFT model), builtin:preference, 150 steps of 8 pairs, lr 1e-3
            cosine (warmup 15, min 0.1), eval_fraction 0.05 (so a single-turn question held out of SFT is
            held out here too), seed s
    SimPO   the same as DPO with method simpo (beta 2, gamma 1), no reference
    scored  the held-out pairs of builtin:preference (all of them) on the base, the SFT model (the
            preference runs' step 0) and after DPO / SimPO: pref_accuracy (summed log-prob of chosen >
            rejected), pref_accuracy_norm (per-token mean), logp_margin; the held-out replies of
            builtin:instruct (response loss) after SFT and after each preference run (forgetting)

In builtin:preference the rejected reply is another function's docstring summary, so "chosen over
rejected" asks whether the model ties a function's name to its own documentation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from experiments import CACHE, ROOT, fmt, run_experiment

sys.path.insert(0, str(ROOT))
ARMS = ("dpo", "simpo")
PAIR_KEYS = ("pref_accuracy", "pref_accuracy_norm", "logp_margin")


def recipes(seed: int, k, where: Path) -> dict:
    schedule = {"name": "cosine", "warmup_steps": k(15), "min_lr_ratio": 0.1}
    every = {"precision": "fp32", "seed": seed, "log_every": k(25), "eval_every": 0, "checkpoint_every": k(50)}
    lora = {"name": "lora", "options": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
    preference = {"data": {"train": "builtin:preference", "seq_len": 128, "eval_fraction": 0.05},
                  "model": {"path": str(where / "sft" / "final")},
                  "train": {"max_steps": k(150), "micro_batch_size": 8, "lr": 1e-3, "weight_decay": 0.0,
                            "schedule": schedule, "eval_max_tokens": 128 * 1000, **every}}
    return {
        "base": {"kind": "pretrain", "name": "base", "model": {"preset": "llama-tiny"},
                 "tokenizer": {"vocab_size": 4096, "train_bytes": 4_000_000},
                 "data": {"train": "builtin:code", "seq_len": 128, "eval_fraction": 0.05},
                 "train": {"max_steps": k(300), "micro_batch_size": 16, "lr": 3e-3, "weight_decay": 0.1,
                           "schedule": {"name": "cosine", "warmup_steps": k(30), "min_lr_ratio": 0.1},
                           "eval_max_tokens": 8192, **every}},
        "sft": {"kind": "finetune", "name": "sft", "model": {"path": str(where / "base" / "final")},
                "data": {"train": "builtin:instruct", "seq_len": 128, "packing": "document", "eval_fraction": 0.05},
                "method": {"name": "full"},
                "train": {"max_steps": k(150), "micro_batch_size": 16, "lr": 1e-3, "weight_decay": 0.0,
                          "schedule": schedule, "eval_max_tokens": 128 * 1000, **every}},
        "dpo": {"kind": "finetune", "name": "dpo", **preference,
                "objective": {"name": "dpo", "options": {"beta": 0.1}}, "method": lora},
        "simpo": {"kind": "finetune", "name": "simpo", **preference,
                  "objective": {"name": "simpo", "options": {"beta": 2.0, "gamma": 1.0}}, "method": lora},
    }


def evals(run: Path) -> dict:
    """domain -> {step: eval event}."""
    from tunelab.runs import read_metrics

    out: dict = {}
    for e in read_metrics(run / "metrics.jsonl"):
        if e.get("event") == "eval":
            out.setdefault(e["domain"], {})[e["step"]] = e
    return out


def base_pair_metrics(base: Path) -> dict:
    """The held-out pairs scored on the pretrained base (no template training yet), as the runs score them."""
    from tunelab import models, tokenizers
    from tunelab.config import SourceSpec
    from tunelab.data import tokenize_source
    from tunelab.tokenizers import BUILTIN_TEMPLATE
    from tunelab.data.rows import PairSet
    from tunelab.eval.preference import evaluate_pairs

    tok = tokenizers.load_tokenizer(str(base))
    tok.chat_template = tok.chat_template or BUILTIN_TEMPLATE  # what the SFT run does for a template-less tokenizer
    src = tokenize_source(SourceSpec(source="builtin:preference"), tok, tokenizers.eos_id(tok), CACHE, 0.05,
                          log=lambda *a: None)
    pairs = PairSet(src.eval, src.eval_starts, src.eval_mask, 128)
    return evaluate_pairs(models.load_model(str(base)), pairs, batch_size=8, pad_id=tokenizers.eos_id(tok),
                          max_tokens=128 * 1000)


def run_seed(seed: int, root: Path, k) -> dict:
    from tunelab.recipe import validate_recipe
    from tunelab.stages import run_stage

    where = root / f"seed-{seed}"
    where.mkdir(parents=True, exist_ok=True)
    for name, recipe in recipes(seed, k, where).items():
        out = where / name
        if (out / "final").is_dir():
            continue
        t0 = time.time()
        run_stage(validate_recipe(recipe, f"exp_preference:{name}"), out=out, resume=(out / "config.yaml").exists(),
                  quiet=True)
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    sft = evals(where / "sft")["instruct"]
    result = {"base_pairs": base_pair_metrics(where / "base" / "final"),
              "sft_response_loss": {"before": sft[0]["loss"], "after": sft[max(sft)]["loss"]}}
    for arm in ARMS:
        ev = evals(where / arm)
        pairs, instruct = ev["preference"], ev["instruct"]
        first, last = min(pairs), max(pairs)
        from tunelab.runs import read_metrics

        train = [e for e in read_metrics(where / arm / "metrics.jsonl") if e.get("event") == "train"]
        result[arm] = {"before": {key: pairs[first][key] for key in PAIR_KEYS},
                       "after": {key: pairs[last][key] for key in PAIR_KEYS},
                       "pairs": pairs[last]["pairs"],
                       "response_loss": {"before": instruct[min(instruct)]["loss"], "after": instruct[max(instruct)]["loss"]},
                       "last_train": {key: train[-1][key] for key in ("loss", "reward_accuracy", "reward_margin")}}
    return result


def render(per_seed: dict, seeds: list[int]) -> str:
    from tunelab.runs import cpu_name

    def col(get):
        return [get(per_seed[s]) for s in seeds]

    def pct(values):
        return fmt(values, 1, 100, "%")

    n_pairs = per_seed[seeds[0]]["dpo"]["pairs"]
    lines = ["## Instruction and preference tuning on the built-in data (`exp_preference.py`)", "",
             f"Setup in the script's docstring (fixed before running); seeds {', '.join(map(str, seeds))}; "
             f"{cpu_name()}, {time.strftime('%Y-%m-%d')}. Mean ± sample std over seeds. Held-out pairs: "
             f"{n_pairs} of builtin:preference; held-out replies: builtin:instruct's held-out split.", "",
             "| model | held-out response loss | pref. accuracy (sum) | pref. accuracy (per token) | log-prob margin |",
             "|---|---:|---:|---:|---:|"]
    base = lambda key: col(lambda r: r["base_pairs"][key])  # noqa: E731
    lines.append(f"| pretrained base | {fmt(col(lambda r: r['sft_response_loss']['before']))} | "
                 f"{pct(base('pref_accuracy'))} | {pct(base('pref_accuracy_norm'))} | "
                 f"{fmt(base('logp_margin'), 2)} |")
    sft = lambda key: col(lambda r: r["dpo"]["before"][key])  # noqa: E731
    lines.append(f"| after SFT | {fmt(col(lambda r: r['sft_response_loss']['after']))} | "
                 f"{pct(sft('pref_accuracy'))} | {pct(sft('pref_accuracy_norm'))} | "
                 f"{fmt(sft('logp_margin'), 2)} |")
    for arm in ARMS:
        after = lambda key: col(lambda r: r[arm]["after"][key])  # noqa: E731
        lines.append(f"| after SFT + {arm.upper() if arm == 'dpo' else 'SimPO'} (LoRA) | "
                     f"{fmt(col(lambda r: r[arm]['response_loss']['after']))} | {pct(after('pref_accuracy'))} | "
                     f"{pct(after('pref_accuracy_norm'))} | {fmt(after('logp_margin'), 2)} |")
    lines += ["", "Per-seed change from the SFT model (after - before):", "",
              "| run | pref. accuracy (sum) | log-prob margin | response loss | last step: train reward accuracy |",
              "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        d = lambda key: col(lambda r: r[arm]["after"][key] - r[arm]["before"][key])  # noqa: E731
        lines.append(f"| {arm} | {pct(d('pref_accuracy'))} | {fmt(d('logp_margin'), 2)} | "
                     f"{fmt(col(lambda r: r[arm]['response_loss']['after'] - r[arm]['response_loss']['before']))} | "
                     f"{pct(col(lambda r: r[arm]['last_train']['reward_accuracy']))} |")
    return "\n".join(lines)


def main() -> None:
    run_experiment(__doc__, "preference-exp", "preference", run_seed, render)


if __name__ == "__main__":
    main()
