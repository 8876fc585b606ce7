"""Continual pretraining experiment on the built-in corpus: replay, infinite vs repeated cosine, LAWA vs decay.

    .venv/bin/python benchmarks/exp_continual.py            # full: 3 seeds, ~4,700 optimizer steps; writes
                                                            #   benchmarks/out/continual/results.json and the
                                                            #   exp_continual section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/exp_continual.py --smoke    # plumbing check: steps / 10, seed 0 only, into
                                                            #   benchmarks/out/continual-smoke; RESULTS.md untouched

The setup is fixed before running (never tuned to make a claim pass); see SETUP below. Every run is a
`tunelab` CLI subprocess (`pretrain`, `anneal`, `average`, `eval`, all `--quiet`) with
TUNELAB_CACHE=benchmarks/out/cache. Resumable: a run whose final/ exists (an average whose directory
exists, an eval whose JSON exists) is skipped; an interrupted training run is continued with --resume.

    base (per seed s)   llama-tiny, pretrain builtin:prose 300 steps, cosine (warmup 30, min 0.1), seed s
    A  replay           init_from base, builtin:code 150 steps cosine (warmup 15, min 0.1),
                        data.replay.fraction r in {0 (no replay), 0.01, 0.05, 0.25} (sources: the base's prose)
    B  two domains      cosine route:   A(r=0) -> builtin:tests 150 steps cosine (warmup 15, min 0.1)
                        infinite route: code 150 steps infinite (warmup 15, cooldown 30 to 0.25, no anneal)
                                        -> init_optimizer, tests 150 steps infinite (no warmup/cooldown,
                                           constant 0.25, anneal to 0.1 over the last 30)
    C  release          init_from base, code 180 steps infinite (warmup 15, constant 1.0), checkpoint every 10;
                        candidates after 180 steps: the plateau final/, LAWA of steps 140..180,
                        `tunelab anneal --from step-150 --steps 30`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TUNELAB = ROOT / ".venv" / "bin" / "tunelab"
CACHE = ROOT / "benchmarks" / "out" / "cache"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
KEEP_MARKER = "<!-- kept across reruns"
START, END = "<!-- exp_continual:start -->", "<!-- exp_continual:end -->"

SEEDS = (0, 1, 2)
REPLAY = (0.0, 0.01, 0.05, 0.25)
LR = 3e-3
EVAL_CMD = "tunelab eval FINAL --data ... --split held-out --seq-len 128 --max-tokens 8192 --json"


class Plan:
    """Step counts of the fixed setup; --smoke divides every one of them by 10 (at least 1)."""

    def __init__(self, smoke: bool):
        k = (lambda n: max(1, round(n / 10))) if smoke else (lambda n: n)
        self.smoke = smoke
        self.base_steps, self.base_warmup = k(300), k(30)
        self.cont_steps, self.cont_warmup = k(150), k(15)
        self.cooldown, self.anneal = k(30), k(30)
        self.c_steps, self.c_ckpt_every = k(180), k(10)
        self.c_branch = self.c_steps - self.anneal  # 150
        self.lawa_steps = [self.c_steps - 4 * self.c_ckpt_every + i * self.c_ckpt_every for i in range(5)]
        self.eval_every, self.log_every = k(25), k(10)
        self.ckpt_every = k(50)  # A/B/base: only for crash recovery (exact resume), changes nothing computed


def common(plan: Plan, seed: int) -> dict:
    return {
        "kind": "pretrain",
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"vocab_size": 4096, "train_bytes": 4_000_000},
        "data": {"seq_len": 128, "eval_fraction": 0.05},
        "train": {"micro_batch_size": 16, "precision": "fp32", "lr": LR, "weight_decay": 0.1,
                  "eval_max_tokens": 8192, "log_every": plan.log_every, "seed": seed},
    }


def recipe(plan: Plan, seed: int, name: str, train: str, steps: int, schedule: dict, init_from: Path | None = None,
           **extra) -> dict:
    r = common(plan, seed)
    r["name"] = name
    r["data"]["train"] = train
    r["train"].update({"max_steps": steps, "schedule": schedule,
                       "checkpoint_every": extra.pop("checkpoint_every", plan.ckpt_every),
                       "keep_checkpoints": extra.pop("keep_checkpoints", 2)})
    if init_from is not None:
        r["init_from"] = str(init_from)
        r["train"]["eval_every"] = plan.eval_every
    if "replay" in extra:
        r["data"]["replay"] = extra.pop("replay")
    r.update(extra)
    return r


def cosine(warmup: int) -> dict:
    return {"name": "cosine", "warmup_steps": warmup, "min_lr_ratio": 0.1}


def infinite(warmup: int, cooldown: int, ratio: float, anneal: int) -> dict:
    return {"name": "infinite", "warmup_steps": warmup, "cooldown_steps": cooldown, "constant_ratio": ratio,
            "anneal_steps": anneal, "min_lr_ratio": 0.1}


# ---------------------------------------------------------------- running tunelab


class Runner:
    def __init__(self, out: Path, total_steps: int):
        self.out = out
        self.env = dict(os.environ, TUNELAB_CACHE=str(CACHE))
        self.timings_path = out / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.total_steps, self.done_steps, self.t0 = total_steps, 0, time.time()

    def _save_timings(self) -> None:
        self.timings_path.write_text(json.dumps(self.timings, indent=1, sort_keys=True) + "\n")

    def _call(self, key: str, cmd: list[str], steps: int = 0, stdout: bool = False) -> str:
        log_file = self.out / "logs" / f"{key}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {' '.join(str(c) for c in cmd[1:])}", flush=True)
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=self.env, capture_output=True, text=True)
        log_file.write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        took = time.time() - t
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise SystemExit(f"{key} failed (exit {proc.returncode}, log {log_file}):\n{tail}")
        self.timings[key] = round(self.timings.get(key, 0.0) + took, 1)  # a resumed run adds to its earlier part
        self._save_timings()
        self.done_steps += steps
        rate = f", {took / steps:.2f} s/step" if steps else ""
        print(f"    done in {took:.0f} s{rate}; elapsed {(time.time() - self.t0) / 60:.1f} min, "
              f"{self.done_steps}/{self.total_steps} steps this session", flush=True)
        return proc.stdout

    def train(self, key: str, cfg: dict) -> Path:
        """A pretrain run from a recipe dict; skipped when its final/ exists, resumed when started."""
        run = self.out / key
        if (run / "final").is_dir():
            self.total_steps -= cfg["train"]["max_steps"]
            return run
        recipe_file = self.out / "recipes" / f"{key}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [TUNELAB, "pretrain", recipe_file, "--out", run, "--quiet"]
        if (run / "config.yaml").is_file():
            cmd.append("--resume")
        elif run.exists():  # died before writing anything of use
            shutil.rmtree(run)
        self._call(key, cmd, steps=cfg["train"]["max_steps"])
        return run

    def anneal(self, key: str, parent: Path, at: int, steps: int) -> Path:
        run = self.out / key
        if (run / "final").is_dir():
            self.total_steps -= steps
            return run
        cmd = [TUNELAB, "anneal", parent, "--from", f"step-{at}", "--steps", str(steps), "--out", run, "--quiet"]
        if (run / "config.yaml").is_file():
            cmd.append("--resume")
        elif run.exists():
            shutil.rmtree(run)
        self._call(key, cmd, steps=steps)
        return run

    def average(self, key: str, run: Path, steps: list[int]) -> Path:
        out = self.out / key
        if not out.is_dir():
            self._call(key, [TUNELAB, "average", run, "--steps", ",".join(map(str, steps)), "--out", out, "--quiet"])
        return out

    def evaluate(self, key: str, model_dir: Path, sources: list[str]) -> dict:
        path = self.out / "evals" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        cmd = [TUNELAB, "eval", model_dir]
        for s in sources:
            cmd += ["--data", s]
        cmd += ["--split", "held-out", "--seq-len", "128", "--max-tokens", "8192", "--json"]
        text = self._call(key, cmd)
        result = json.loads(text[text.index("{"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result


# ---------------------------------------------------------------- reading metrics


def evals(run: Path) -> dict[str, dict[int, float]]:
    """domain -> step -> eval loss, from a run's metrics.jsonl."""
    from tunelab.runs import read_metrics

    out: dict[str, dict[int, float]] = {}
    for e in read_metrics(run / "metrics.jsonl"):
        if e.get("event") == "eval":
            out.setdefault(e["domain"], {})[e["step"]] = e["loss"]
    return out


def replay_numbers(run: Path, steps: int) -> dict:
    ev = evals(run)
    prose, code = ev["prose"], ev["code"]
    peak_step = max(sorted(prose), key=lambda s: prose[s])
    return {"prose_start": prose[0], "prose_final": prose[steps], "code_start": code[0], "code_final": code[steps],
            "forgetting": prose[steps] - prose[0], "code_gain": code[0] - code[steps],
            "gap_peak": prose[peak_step] - prose[0], "gap_peak_step": peak_step,
            "prose_curve": {str(s): v for s, v in sorted(prose.items())}}


# ---------------------------------------------------------------- the experiment


def experiment(plan: Plan, seeds: tuple[int, ...], out: Path) -> dict:
    per_seed_steps = (plan.base_steps + len(REPLAY) * plan.cont_steps + 3 * plan.cont_steps + plan.c_steps
                      + plan.anneal)
    runner = Runner(out, per_seed_steps * len(seeds))
    results: dict = {"seeds": {}}
    for seed in seeds:
        s = f"s{seed}"
        res: dict = {}
        base = runner.train(f"{s}/base", recipe(plan, seed, f"base-{s}", "builtin:prose", plan.base_steps,
                                                cosine(plan.base_warmup)))
        res["base_prose_loss"] = evals(base)["prose"][plan.base_steps]

        # A: replay fraction
        res["A"] = {}
        for r in REPLAY:
            extra = {"replay": {"fraction": r}} if r else {}
            run = runner.train(f"{s}/A-replay-{r:g}", recipe(plan, seed, f"A-replay-{r:g}-{s}", "builtin:code",
                                                             plan.cont_steps, cosine(plan.cont_warmup), base, **extra))
            res["A"][f"{r:g}"] = replay_numbers(run, plan.cont_steps)
        cos1 = out / s / "A-replay-0"

        # B: repeated cosine vs infinite over code -> tests
        cos2 = runner.train(f"{s}/B-cosine-tests", recipe(plan, seed, f"B-cosine-tests-{s}", "builtin:tests",
                                                          plan.cont_steps, cosine(plan.cont_warmup), cos1))
        inf1 = runner.train(f"{s}/B-infinite-code", recipe(
            plan, seed, f"B-infinite-code-{s}", "builtin:code", plan.cont_steps,
            infinite(plan.cont_warmup, plan.cooldown, 0.25, 0), base))
        inf2 = runner.train(f"{s}/B-infinite-tests", recipe(
            plan, seed, f"B-infinite-tests-{s}", "builtin:tests", plan.cont_steps,
            infinite(0, 0, 0.25, plan.anneal), inf1, init_optimizer=True))
        res["B"] = {}
        for route, stage1, stage2 in (("cosine", cos1, cos2), ("infinite", inf1, inf2)):
            final = runner.evaluate(f"{s}/B-{route}", stage2 / "final",
                                    ["builtin:prose", "builtin:code", "builtin:tests"])
            ev2, ev1 = evals(stage2), evals(stage1)
            res["B"][route] = {
                "final": {d: final[d]["loss"] for d in ("prose", "code", "tests")},
                "eval_tokens": {d: final[d]["eval_tokens"] for d in ("prose", "code", "tests")},
                "code_forgetting_stage2": ev2["code"][plan.cont_steps] - ev2["code"][0],
                "prose_forgetting_stage2": ev2["prose"][plan.cont_steps] - ev2["prose"][0],
                "tests_gain_stage2": ev2["tests"][0] - ev2["tests"][plan.cont_steps],
                "stage1_code_final": ev1["code"][plan.cont_steps],
                "stage1_prose_final": ev1["prose"][plan.cont_steps],
            }

        # C: plateau checkpoint vs LAWA vs decay branch, all after c_steps steps
        plateau = runner.train(f"{s}/C-plateau", recipe(
            plan, seed, f"C-plateau-{s}", "builtin:code", plan.c_steps, infinite(plan.cont_warmup, 0, 1.0, 0), base,
            checkpoint_every=plan.c_ckpt_every, keep_checkpoints=20))
        lawa = runner.average(f"{s}/C-lawa", plateau, plan.lawa_steps)
        decay = runner.anneal(f"{s}/C-decay", plateau, plan.c_branch, plan.anneal)
        res["C"] = {}
        for cand, model_dir in (("plateau", plateau / "final"), ("lawa", lawa), ("decay", decay / "final")):
            r = runner.evaluate(f"{s}/C-{cand}", model_dir, ["builtin:code", "builtin:prose"])
            res["C"][cand] = {d: r[d]["loss"] for d in ("code", "prose")}
            res["C"][cand]["eval_tokens"] = {d: r[d]["eval_tokens"] for d in ("code", "prose")}
        results["seeds"][s] = res
    results["timings_s"] = runner.timings
    return results


# ---------------------------------------------------------------- summary and RESULTS.md


def ms(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(results: dict) -> dict:
    seeds = list(results["seeds"].values())
    summary: dict = {"A": {}, "B": {}, "C": {}}
    for r in REPLAY:
        rows = [s["A"][f"{r:g}"] for s in seeds]
        summary["A"][f"{r:g}"] = {k: ms([x[k] for x in rows]) for k in
                                  ("forgetting", "code_gain", "gap_peak", "code_final", "prose_final")}
        summary["A"][f"{r:g}"]["gap_peak_steps"] = [x["gap_peak_step"] for x in rows]
    for route in ("cosine", "infinite"):
        rows = [s["B"][route] for s in seeds]
        summary["B"][route] = {d: ms([x["final"][d] for x in rows]) for d in ("prose", "code", "tests")}
        summary["B"][route]["code_forgetting_stage2"] = ms([x["code_forgetting_stage2"] for x in rows])
        summary["B"][route]["code_after_stage1"] = ms([x["stage1_code_final"] for x in rows])
    for cand in ("plateau", "lawa", "decay"):
        rows = [s["C"][cand] for s in seeds]
        summary["C"][cand] = {d: ms([x[d] for x in rows]) for d in ("code", "prose")}
    return summary


def f(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:+.{digits}f} ± {m['std']:.{digits}f}" if m["mean"] < 0 else \
        f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


class Diff:
    """b - a over seeds, paired (the runs of one seed share their base model)."""

    def __init__(self, a: dict, b: dict):
        self.per_seed = [y - x for x, y in zip(a["values"], b["values"])]
        self.mean = statistics.fmean(self.per_seed)
        self.sd = statistics.stdev(self.per_seed) if len(self.per_seed) > 1 else 0.0
        self.n = len(self.per_seed)
        self.agree = sum(1 for x in self.per_seed if (x > 0) == (self.mean > 0))
        self.beyond = abs(self.mean) > a["std"] + b["std"]  # larger than the two seed spreads together

    def __str__(self) -> str:
        where = "beyond" if self.beyond else "within"
        return f"{self.mean:+.3f}, {where} the seed spread, {self.agree}/{self.n} seeds agree"

    @property
    def solid(self) -> bool:
        return self.beyond and self.agree == self.n


def what_it_shows(summary: dict, n: int) -> list[str]:
    """Sentences generated from the numbers (so a rerun cannot leave stale claims behind)."""
    A, B, C = summary["A"], summary["B"], summary["C"]
    lines = []
    f0, g0 = A["0"]["forgetting"], A["0"]["code_gain"]
    ks = [k for k in A if k != "0"]
    cuts = [Diff(f0, A[k]["forgetting"]) for k in ks]
    costs = [Diff(A[k]["code_gain"], g0) for k in ks]  # gain lost to replay (positive = smaller gain)
    few = ks.index("0.05")
    holds = cuts[few].solid and cuts[few].mean < 0 and costs[few].mean < 0.1 * g0["mean"]
    lines.append(
        f"**Replay.** Replay of the base's prose cut prose forgetting from {f0['mean']:.3f} (none) to "
        + " / ".join(f"{A[k]['forgetting']['mean']:.3f}" for k in ks) + " with "
        + " / ".join(f"{float(k):.0%}" for k in ks) + " replay ("
        + " / ".join(f"{-c.mean / f0['mean']:.0%}" for c in cuts) + " less; "
        + ("each beyond the seed spread, all seeds agree" if all(c.solid for c in cuts)
           else "; ".join(f"{k}: {c}" for k, c in zip(ks, cuts)))
        + "), while the code gain shrank by only " + " / ".join(f"{c.mean:.3f}" for c in costs) + " ("
        + " / ".join(f"{c.mean / g0['mean']:.1%}" for c in costs) + f" of {g0['mean']:.3f}): the claim that a few % "
        f"replay cuts forgetting sharply at small cost on the new domain {'holds' if holds else 'does not hold'} "
        "at this scale.")
    rec = {k: A[k]["gap_peak"]["mean"] - A[k]["forgetting"]["mean"] for k in A}
    shape = (" The jump-then-recover shape of the stability gap appears only with replay; without it the old-domain "
             "loss climbs and stays up." if rec["0"] < 0.5 * min(rec[k] for k in ks) else "")
    lines.append(
        f"**Stability gap.** Without replay the prose loss peaked at steps {', '.join(map(str, A['0']['gap_peak_steps']))} "
        f"(+{A['0']['gap_peak']['mean']:.3f}) and recovered only {rec['0']:.3f} by the end; with "
        + " / ".join(f"{float(k):.0%}" for k in ks) + " replay it peaked at steps "
        + " / ".join(", ".join(map(str, A[k]["gap_peak_steps"])) for k in ks) + " and recovered "
        + " / ".join(f"{rec[k]:.3f}" for k in ks) + "." + shape)
    ci, ii = B["cosine"], B["infinite"]
    dp, dc, dt = (Diff(ci[d], ii[d]) for d in ("prose", "code", "tests"))
    dfc = Diff(ci["code_forgetting_stage2"], ii["code_forgetting_stage2"])
    less = dp.solid and dp.mean < 0 and dfc.solid and dfc.mean < 0
    lines.append(
        f"**Infinite vs repeated cosine.** After prose -> code -> tests the infinite route, against the cosine route, "
        f"had prose loss {ii['prose']['mean']:.3f} vs {ci['prose']['mean']:.3f} ({dp}), code {ii['code']['mean']:.3f} "
        f"vs {ci['code']['mean']:.3f} ({dc}) and tests {ii['tests']['mean']:.3f} vs {ci['tests']['mean']:.3f} ({dt}); "
        f"its code forgetting during the tests stage was {ii['code_forgetting_stage2']['mean']:.3f} vs "
        f"{ci['code_forgetting_stage2']['mean']:.3f} ({dfc}), from a code loss the unannealed code stage had left "
        f"{ii['code_after_stage1']['mean'] - ci['code_after_stage1']['mean']:+.3f} higher. So "
        + ("the claim of less forgetting at equal tokens holds here" if less else
           "the claim of less forgetting at equal tokens is not borne out here")
        + (f", but the new domain was learned less well (tests {dt.mean:+.3f}): its tests stage ran at 0.25x the "
           "peak LR, so it traded plasticity for stability rather than winning on every domain."
           if dt.mean > 0 else "."))
    best = min(C, key=lambda c: C[c]["code"]["mean"])
    dl, dd = Diff(C["plateau"]["code"], C["lawa"]["code"]), Diff(C["plateau"]["code"], C["decay"]["code"])
    dld = Diff(C["lawa"]["code"], C["decay"]["code"])
    pl, pd = Diff(C["plateau"]["prose"], C["lawa"]["prose"]), Diff(C["plateau"]["prose"], C["decay"]["prose"])
    spread = f"{min(C[c]['code']['std'] for c in C):.3f}-{max(C[c]['code']['std'] for c in C):.3f}"
    lines.append(
        f"**Averaging vs decay.** LAWA ({dl.mean:+.3f} code loss, paired sd {dl.sd:.3f}, {dl.agree}/{dl.n} seeds) and "
        f"the decay branch ({dd.mean:+.3f}, paired sd {dd.sd:.3f}, {dd.agree}/{dd.n} seeds) both improved on the "
        f"plateau checkpoint ({C['plateau']['code']['mean']:.3f}), also on prose ({pl.mean:+.3f} / {pd.mean:+.3f}), "
        f"{'beyond' if dl.beyond and dd.beyond else 'though within'} the between-seed spread of the candidates "
        f"(sd {spread}). Decay minus LAWA is {dld.mean:+.3f} on code (paired sd {dld.sd:.3f}, {dld.agree}/{dld.n} "
        f"seeds): lowest mean code loss: {best}, "
        + ("but the gap is inside the seed spread" + (f" (though all {dld.n} seeds order them the same way)"
                                                       if dld.agree == dld.n else "")
           + ", so the two release candidates are effectively tied, and LAWA needs no extra training steps off the "
           "main line." if not dld.beyond else
           "a difference beyond the seed spread."))
    return lines


def section(results: dict, summary: dict, meta: dict) -> str:
    A, B, C = summary["A"], summary["B"], summary["C"]
    n = len(results["seeds"])
    out = [START, "", "## Continual pretraining experiment (`exp_continual.py`)", "",
           f"Generated by `python benchmarks/exp_continual.py`, runs finished {meta['date']} ({n} seeds: "
           f"{', '.join(s[1:] for s in results['seeds'])}; total wall time {meta['wall_min']:.0f} min of training "
           f"and evaluation, {meta['steps']:,} optimizer steps; {meta['cpu']}, {os.cpu_count()} cores, torch "
           f"{meta['torch']}; other processes shared the CPU). Per-seed values: "
           "`benchmarks/out/continual/results.json`.", "",
           "Fixed setup (chosen before running, not tuned): `llama-tiny` preset, the base run's BPE tokenizer "
           "(vocab 4,096, trained on 4 MB of prose), seq_len 128, micro batch 16 (2,048 tokens/step), fp32, AdamW "
           "lr 3e-3, weight decay 0.1, eval_fraction 0.05, 8,192 eval tokens per domain. Base: 300 steps on "
           "`builtin:prose`, cosine (warmup 30, floor 0.1), seed s. Continued runs: `init_from` the base (step-0 "
           "eval, prose tracked as the ancestor domain), train.seed s, eval every 25 steps. Loss = held-out "
           "cross-entropy (nats/token); mean ± sample std over seeds. A difference is \"beyond the seed spread\" when "
           "|difference of means| > the sum of the two stds; \"k/n seeds agree\" counts seeds (each pair of runs "
           "shares its base model and seed) whose own difference has the sign of the mean difference.", "",
           "**A. Replay**: `builtin:code` 150 steps, cosine re-warm (warmup 15, floor 0.1), `data.replay.fraction` r "
           "of every batch from the base's prose. Forgetting = final prose loss - step-0 prose loss; gain = step-0 "
           "code loss - final code loss; gap peak = max prose loss during training - step 0 (evals every 25 steps).",
           "", "| replay r | prose forgetting | code gain | final code loss | gap peak | peak at step (per seed) |",
           "|---:|---:|---:|---:|---:|---|"]
    for r in REPLAY:
        row = A[f"{r:g}"]
        out.append(f"| {r:g} | {f(row['forgetting'])} | {f(row['code_gain'])} | {f(row['code_final'])} | "
                   f"{f(row['gap_peak'])} | {', '.join(map(str, row['gap_peak_steps']))} |")
    out += ["", "**B. Infinite vs repeated cosine** over prose -> code (150 steps) -> tests (150 steps), equal tokens. "
            "Cosine route: each stage cosine (warmup 15, floor 0.1), fresh optimizer. Infinite route: code with "
            "`infinite` (warmup 15, cosine cooldown over 30 to 0.25, then constant), then tests with "
            "`init_optimizer: true`, constant 0.25 and an anneal to 0.1 over the last 30 steps. Final losses from "
            f"`{EVAL_CMD}` on both final models (identical text); code forgetting = code loss at the end of the tests "
            "stage - at its step 0 (that run's metrics).", "",
            "| route | prose | code | tests | code loss after stage 1 | code forgetting in stage 2 |",
            "|---|---:|---:|---:|---:|---:|"]
    for route in ("cosine", "infinite"):
        row = B[route]
        out.append(f"| {route} | {f(row['prose'])} | {f(row['code'])} | {f(row['tests'])} | "
                   f"{f(row['code_after_stage1'])} | {f(row['code_forgetting_stage2'])} |")
    out += ["", "**C. Release candidates after 180 steps on code**: a plateau run (`infinite`, warmup 15, constant "
            "1.0 = lr 3e-3, checkpoint every 10). Plateau = its step-180 final/; LAWA = `tunelab average RUN --steps "
            "140,150,160,170,180`; decay = `tunelab anneal RUN --from step-150 --steps 30` (linear decay from 1.0 to "
            "0.1, optimizer and data stream carried). Scored with the same `tunelab eval ... --split held-out`.", "",
            "| candidate | code loss | prose loss |", "|---|---:|---:|"]
    best = min(C, key=lambda c: C[c]["code"]["mean"])
    for cand, label in (("plateau", "plateau step 180"), ("lawa", "LAWA 140-180"), ("decay", "decay branch 150->180")):
        b = " (best on code)" if cand == best else ""
        out.append(f"| {label}{b} | {f(C[cand]['code'])} | {f(C[cand]['prose'])} |")
    out += ["", "### What it shows", ""]
    out += [f"- {line}" for line in what_it_shows(summary, n)]
    out += ["", END]
    return "\n".join(out) + "\n"


def write_results_md(text: str) -> None:
    md = RESULTS_MD.read_text()
    if START in md and END in md:
        head, rest = md.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        md = head + text + ("\n" + tail if tail else "")
    else:
        if KEEP_MARKER not in md:
            raise SystemExit(f"{RESULTS_MD}: no '{KEEP_MARKER}' line to append below")
        md = md.rstrip("\n") + "\n\n" + text
    RESULTS_MD.write_text(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="steps / 10, seed 0, into benchmarks/out/continual-smoke; "
                                                         "RESULTS.md untouched")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite the RESULTS.md section")
    args = ap.parse_args()
    plan = Plan(args.smoke)
    seeds = (0,) if args.smoke else SEEDS
    out = ROOT / "benchmarks" / "out" / ("continual-smoke" if args.smoke else "continual")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = experiment(plan, seeds, out)
    summary = summarize(results)

    import torch

    from tunelab.runs import cpu_name

    steps = len(seeds) * (plan.base_steps + (len(REPLAY) + 3) * plan.cont_steps + plan.c_steps + plan.anneal)
    # The date the last run or eval finished (a rerun that only re-reads finished runs keeps it).
    last = max(p.stat().st_mtime for p in out.rglob("*") if p.name in ("metrics.jsonl", "lineage.json")
               or p.parent.name.startswith("s") and p.suffix == ".json")
    meta = {"date": dt.datetime.fromtimestamp(last, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "wall_min": sum(results["timings_s"].values()) / 60, "this_session_min": (time.time() - t0) / 60,
            "steps": steps, "smoke": args.smoke}
    results.update({"meta": meta, "summary": summary})
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = section(results, summary, meta)
    print("\n" + text)
    if not args.smoke and not args.no_write:
        write_results_md(text)
        print(f"wrote the exp_continual section of {RESULTS_MD}")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
