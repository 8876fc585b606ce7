"""`tunelab quickstart`: the main job, offline, on the built-in corpus, in a few minutes on 2 CPU cores.

Trains a tokenizer, pretrains a small model on builtin:prose, evaluates it on every built-in
domain, generates a sample; then adapts it to builtin:code three ways: continued pretraining twice
(recipes cpt-rewarm and cpt-replay: without and with 5% prose replay) and LoRA (recipe lora-code:
a PEFT adapter on the frozen prose model). It prints the forgetting table of the three and their
accuracy on a built-in multiple-choice task. Then it instruction-tunes the prose model on the built-in
instruction data (sft-lora) and preference-tunes that with DPO (dpo-lora), prints the held-out reply
loss and how often the model prefers the right answer of a held-out pair before and after, and a chat
reply; and writes the HTML report of all six runs beside them (<out>-report.html). LoRA typically
learns less of code and forgets less of prose ("LoRA Learns Less and Forgets Less"); the table shows
how much on this model.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.recipe import load_recipe


def run_quickstart(out: Path, overrides: list[str], quiet: bool = False) -> Path:
    from rich.table import Table

    from tunelab.commands.compare import render_table
    from tunelab.eval.relative import forgetting_table
    from tunelab.console import table_console
    from tunelab.commands.evaluate import generate_text
    from tunelab.report import write_report
    from tunelab.runs import RunDir
    from tunelab.stages import run_stage
    from tunelab.runs import read_metrics

    console = table_console(quiet=quiet)
    cfg = load_recipe("quickstart", overrides)
    resume = (Path(out) / "config.yaml").exists()  # re-running the quickstart continues/finishes the same run
    run_dir = run_stage(cfg, out=out, resume=resume, quiet=quiet)

    final_step = max(e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e.get("event") == "eval")
    table = Table(title=f"held-out evaluation after {final_step} steps")
    for col in ("domain", "loss", "perplexity", "bits/byte"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for e in read_metrics(run_dir / "metrics.jsonl"):
        if e.get("event") == "eval" and e["step"] == final_step:
            table.add_row(e["domain"], f"{e['loss']:.3f}", f"{e['ppl']:.1f}", f"{e['bpb']:.3f}" if e["bpb"] else "-")
    console.print(table)
    prompt = "Return the number of"
    sample = generate_text(str(run_dir / "final"), prompt, max_new_tokens=48, seed=cfg.train.seed)
    console.print(f"[bold]sample[/bold] ({prompt!r} ->)\n{sample}")
    RunDir(run_dir).log({"event": "sample", "step": final_step, "prompt": prompt, "text": sample})  # for the report
    console.print(f"\nrun directory: [bold]{run_dir}[/bold]  (config.yaml, metrics.jsonl, lineage.json, "
                  f"checkpoints/, final/)")

    # Continued pretraining on code, without and with replay of the old domain: what it gains, what it forgets.
    continued = []
    for recipe, suffix in (("cpt-rewarm", "code"), ("cpt-replay", "code-replay")):
        out_cpt = run_dir.parent / f"{run_dir.name}-{suffix}"
        cpt = load_recipe(recipe, [f"init_from={run_dir}", f"name={out_cpt.name}", *CPT_SCALE, *overrides])
        console.print(f"\n[bold]continued pretraining on code[/bold] ({recipe}) -> {out_cpt}")
        continued.append(run_stage(cpt, out=out_cpt, resume=(out_cpt / "config.yaml").exists(), quiet=quiet))
    # LoRA on the same code: a finetune starts from a model directory (model.path), here the prose run's final/;
    # its base weights stay frozen and its final/ is a PEFT adapter.
    out_lora = run_dir.parent / f"{run_dir.name}-code-lora"
    lora = load_recipe("lora-code", [f"model.path={run_dir / 'final'}", f"name={out_lora.name}", *LORA_SCALE, *overrides])
    console.print(f"\n[bold]LoRA on code[/bold] (lora-code) -> {out_lora}")
    continued.append(run_stage(lora, out=out_lora, resume=(out_lora / "config.yaml").exists(), quiet=quiet))
    render_table(forgetting_table(continued), console=console)
    # A multiple-choice task built from the stdlib ("which module defines this function?"): accuracy with a
    # bootstrap interval, and each code model's paired change against the prose model.
    from tunelab.commands.evaluate import evaluate_suite, render_suite

    render_suite(evaluate_suite([str(r / "final") for r in continued], tasks=["builtin:stdlib-module"],
                                relative_to=str(run_dir / "final"), seed=cfg.train.seed, log=lambda *a: None),
                 console=console)
    tuned = instruction_tune(run_dir, overrides, console, quiet)
    report = write_report([run_dir, *continued, *tuned], run_dir.parent / f"{run_dir.name}-report.html",
                          title=f"tunelab quickstart: {run_dir.name}", warn=lambda m: console.print(f"warning: {m}", markup=False))
    console.print(f"report: [bold]{report}[/bold]  (open it in a browser)", soft_wrap=True)
    console.print(f"next: tunelab eval {run_dir}/final --data builtin:code   |   "
                  f"tunelab generate {run_dir}/final --prompt 'def '   |   tunelab compare {' '.join(map(str, continued))}")
    return run_dir


def instruction_tune(run_dir: Path, overrides: list[str], console, quiet: bool) -> list[Path]:
    """SFT with LoRA on builtin:instruct, then DPO with LoRA on builtin:preference; what each changed, and a reply."""
    from tunelab.commands.chat import Conversation
    from tunelab.runs import read_metrics
    from tunelab.stages import run_stage

    runs = []
    start = run_dir / "final"
    for recipe, suffix, scale in (("sft-lora", "sft", SFT_SCALE), ("dpo-lora", "dpo", DPO_SCALE)):
        out = run_dir.parent / f"{run_dir.name}-{suffix}"
        cfg = load_recipe(recipe, [f"model.path={start}", f"name={out.name}", *scale, *overrides])
        console.print(f"\n[bold]{'instruction tuning' if suffix == 'sft' else 'preference tuning'}[/bold] ({recipe}) "
                      f"-> {out}")
        runs.append(run_stage(cfg, out=out, resume=(out / "config.yaml").exists(), quiet=quiet))
        start = out / "final"  # an adapter: the next stage starts from its merged weights
    evals = {run.name: [e for e in read_metrics(run / "metrics.jsonl") if e.get("event") == "eval"] for run in runs}
    sft, dpo = (evals[r.name] for r in runs)
    replies = [e for e in sft if e["domain"] == "instruct"]
    first, last = replies[0], replies[-1]
    console.print(f"held-out replies (builtin:instruct): loss {first['loss']:.3f} -> {last['loss']:.3f} after SFT")
    pairs = [e for e in dpo if e["domain"] == "preference"]
    console.print(f"held-out pairs (builtin:preference): chosen reply preferred {pairs[0]['pref_accuracy']:.1%} "
                  f"-> {pairs[-1]['pref_accuracy']:.1%} after DPO (log-prob margin {pairs[0]['logp_margin']:+.2f} -> "
                  f"{pairs[-1]['logp_margin']:+.2f})")
    question = "What does `json.dumps` do?"
    reply = Conversation(str(runs[-1] / "final"), max_new_tokens=40, greedy=True, log=lambda *a: None).reply(question)
    console.print(f"[bold]chat[/bold] {question!r} -> {reply!r}   (tunelab chat {runs[-1] / 'final'})")
    return runs


# The continued runs are shorter than the shipped cpt recipes: the quickstart stays a few minutes on 2 cores.
CPT_SCALE = ["train.max_steps=150", "train.eval_every=25", "train.schedule.warmup_steps=15", "train.eval_max_tokens=8192"]
# The LoRA run is scored on the CPT runs' held-out code (their data.eval_fraction and eval_max_tokens: the
# forgetting table compares like with like) and trains in fp32 as they do. A LoRA step costs about what a full
# step does on this model (~14k tok/s on 2 cores: the forward and backward are the model's; only the weight
# gradients and the optimizer shrink), so it gets fewer steps than the CPT runs: 80 keep the branch (training,
# its five evaluations, one more model in the multiple-choice comparison) to ~30 s of the quickstart's wall
# time on 2 cores (measured; the budget is +40 s), and still show both its gain on code and its forgetting.
LORA_SCALE = ["train.max_steps=80", "train.eval_every=20", "train.checkpoint_every=40",
              "train.schedule.warmup_steps=8", "train.eval_max_tokens=8192", "data.eval_fraction=0.05",
              "train.precision=fp32"]
# SFT and DPO at a scale that keeps both to about half a minute on 2 cores (fp32 like the other runs). Both are
# scored on their held-out examples at the start and the end; DPO also on the SFT data (its ancestor's).
SFT_SCALE = ["train.max_steps=60", "train.eval_every=0", "train.checkpoint_every=0", "train.schedule.warmup_steps=6",
             "data.seq_len=128", "train.eval_max_tokens=16384", "train.precision=fp32"]
DPO_SCALE = ["train.max_steps=40", "train.eval_every=0", "train.checkpoint_every=0", "train.schedule.warmup_steps=4",
             "data.seq_len=128", "train.eval_max_tokens=16384", "train.precision=fp32"]
