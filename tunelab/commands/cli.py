"""The `tunelab` command. Thin: parse arguments, load the recipe, call the stage.

Heavy imports (torch, transformers) happen inside the commands so `tunelab --help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.commands.cli_help import (DEFAULT_EVAL, OUT_HELP, QUIET_HELP, RECIPE_HELP, RESUME_HELP,
                                       SET_HELP, Base, Greedy, Seed, Temperature, TopK, quiet_transformers,
                                       stderr)
from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pretrain, adapt, evaluate and compare language models; every run is a self-describing directory.")



def _print_version(value: bool) -> None:
    if value:
        from tunelab import __version__

        print(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")):
    pass


def _train(kind: str, recipe: str, set_: list[str], out: Optional[Path], resume: bool, quiet: bool) -> None:
    from tunelab.recipe import check_data_paths, load_recipe

    cfg = load_recipe(recipe, set_, kind=kind)
    check_data_paths(cfg)  # before torch is imported: a mistyped path fails in a second, not after ~10
    from tunelab.stages import run_stage

    try:
        run_stage(cfg, out=out, resume=resume, quiet=quiet)
    except KeyboardInterrupt:
        # Reported, then re-raised: typer turns it into exit code 130. (Writing a checkpoint on the
        # way out belongs in train/loop.py, which holds the state; this report then names it.)
        run_dir = Path(out) if out else Path("runs") / cfg.name
        command = ["tunelab", kind, recipe, *[a for s in set_ for a in ("--set", s)], "--out", str(run_dir)]
        from tunelab.runs import report_interrupt

        report_interrupt(run_dir, cfg.train.max_steps, command + ["--resume"])
        raise


@app.command()
def pretrain(recipe: str = typer.Argument(..., help=RECIPE_HELP),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP),
             out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
             resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
             quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Train a model from a recipe: pretraining or continued pretraining, with any method."""
    _train("pretrain", recipe, set_, out, resume, quiet)


@app.command()
def finetune(recipe: str = typer.Argument(..., help=RECIPE_HELP),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP),
             out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
             resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
             quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Fine-tune a trained model (model.path) from a recipe; the method defaults to LoRA (final/ is an adapter)."""
    _train("finetune", recipe, set_, out, resume, quiet)


@app.command("eval")
def eval_(model_dirs: list[str] = typer.Argument(..., metavar="MODEL_DIR...",
                                                help="Saved model or adapter directories (e.g. runs/NAME/final)."),
          data: list[str] = typer.Option([], "--data", help="Source to evaluate (repeatable); default: all built-in "
                                         "domains, unless only --task / --generation is asked for."),
          seq_len: int = typer.Option(256, "--seq-len", help="Tokens per scored window."),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on tokens per domain "
                                                   "(default: no cap, every token)."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          split: str = typer.Option("auto", "--split", help="auto: a source the model or an ancestor trained on "
                                    "is scored on its held-out split, any other whole; or held-out | whole."),
          base: Base = None,
          relative_to: Optional[str] = typer.Option(None, "--relative-to", help="A base model directory: every "
                                                    "model's change against it per domain and task."),
          metric: str = typer.Option("loss", "--metric", help="loss | bpb: the value in the table of several models."),
          task: list[str] = typer.Option([], "--task", help="Multiple-choice task (repeatable): a JSONL file of "
                                         "{context, choices, answer} lines, or builtin:stdlib-module."),
          generation: bool = typer.Option(False, "--generation", help="Greedy and sampled continuations of held-out "
                                          "prompts: repetition, distinct-n, entropy."),
          prompts: int = typer.Option(8, "--prompts", min=1, help="--generation: prompts per source."),
          prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=1, help="--generation: tokens per prompt."),
          max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, help="--generation: tokens generated."),
          seed: int = typer.Option(0, "--seed", help="Sampling and bootstrap seed."),
          quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Loss, perplexity and bits per byte of models on each data domain (a source the model or an ancestor
    trained on: its held-out split; any other source: all of it); with several models or --relative-to, one
    table with each model's change against the base; multiple-choice tasks; generation quality."""
    from tunelab.commands.evaluate import evaluate_model, evaluate_suite, render_eval, render_suite

    quiet_transformers()
    log = (lambda *a: None) if (quiet or as_json) else stderr
    if len(model_dirs) > 1 or relative_to or task or generation:
        options = {"sources": data or DEFAULT_EVAL, "prompts": prompts, "prompt_tokens": prompt_tokens,
                   "max_new_tokens": max_new_tokens} if generation else None
        result = evaluate_suite(model_dirs, data or (None if task or generation else DEFAULT_EVAL), tasks=task,
                                generation=options, relative_to=relative_to, metric=metric, seq_len=seq_len,
                                max_tokens=max_tokens, split=split, base=base, seed=seed, log=log)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            render_suite(result)
        return
    model_dir = model_dirs[0]
    results = evaluate_model(model_dir, data or DEFAULT_EVAL, seq_len=seq_len, max_tokens=max_tokens, base=base, split=split,
                             log=log)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    render_eval(results, f"eval: {model_dir}")


@app.command()
def generate(model_dir: str = typer.Argument(..., help="A saved model or adapter directory."),
             prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens generated."),
             greedy: Greedy = False, temperature: Temperature = 0.8, top_k: TopK = 50, seed: Seed = 0,
             base: Base = None):
    """Continue a prompt with a saved model."""
    from tunelab.commands.evaluate import generate_text

    quiet_transformers()
    print(generate_text(model_dir, prompt, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                        top_k=top_k, seed=seed, base=base))


@app.command()
def chat(model_dir: str = typer.Argument(..., help="A saved model or adapter directory (e.g. an SFT run's final/)."),
         message: Optional[str] = typer.Option(None, "--message", help="Send this one message, print the reply and "
                                               "exit; without it, each line of stdin is a message, until EOF."),
         system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
         max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest reply, in tokens."),
         greedy: Greedy = False, temperature: Temperature = 0.8, top_k: TopK = 50, seed: Seed = 0,
         base: Base = None):
    """Talk to a model through its chat template (the built-in one if its tokenizer has none)."""
    from tunelab.commands.chat import chat as converse, stdin_messages

    quiet_transformers()
    messages = [message] if message is not None else stdin_messages(prompt=sys.stdin.isatty())
    for reply in converse(model_dir, messages, seed=seed, system=system, base=base, max_new_tokens=max_new_tokens,
                          greedy=greedy, temperature=temperature, top_k=top_k, log=stderr):
        print(reply, flush=True)


@app.command()
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run directory."),
               set_: list[str] = typer.Option([], "--set", help=SET_HELP),
               quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """The whole loop on the built-in corpus, offline: tokenizer, pretraining, eval on every domain, a sample; code by
    continued pretraining (with and without replay) and LoRA, the forgetting table; SFT and DPO; the HTML report."""
    from tunelab.commands.quickstart import run_quickstart

    run_quickstart(out, set_, quiet=quiet)


@app.command("run")
def run_pipeline(pipeline: Path = typer.Argument(..., help="Pipeline YAML: a list of stages."),
                 out: Optional[Path] = typer.Option(None, "--out", help="Where stage outputs go (default runs/<name>)."),
                 set_: list[str] = typer.Option([], "--set", help="Override applied to every training stage."),
                 resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a stage that was "
                                             "interrupted (same key), as by default; --no-resume refuses it instead."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Print each stage's output type, key and whether "
                                              "it would run, resume, be skipped (up to date) or re-run (stale); "
                                              "run and write nothing."),
                 only: Optional[str] = typer.Option(None, "--only", metavar="STAGE", help="Run just this stage; the "
                                                    "outputs it reads must exist."),
                 quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Run a pipeline's stages in order, skipping those already done with the same resolved config."""
    from tunelab.commands.pipeline import run_pipeline as run

    run(pipeline, out=out, quiet=quiet, overrides=set_, resume=resume, dry_run=dry_run, only=only)


@app.command("export")
def export_(source: str = typer.Argument(..., metavar="RUN_OR_ADAPTER",
                                         help="A run directory (its final/), a model directory or a LoRA adapter."),
            out: Path = typer.Option(..., "--out", help="New directory to write (must not exist, or be empty)."),
            merge: bool = typer.Option(False, "--merge", help="Fold a LoRA adapter into its base model."),
            base: Optional[str] = typer.Option(None, "--base", help="The adapter's base model, if it moved."),
            quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Write a standalone HF model directory (plain AutoModelForCausalLM loads it), with lineage.json."""
    from tunelab.commands.export import export_model

    quiet_transformers()
    export_model(source, out, merge=merge, base=base, log=(lambda *a: None) if quiet else stderr)
    print(out)


@app.command()
def compare(runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories (runs/NAME; a shell glob works)."),
            base: Optional[Path] = typer.Option(None, "--base", help="Measure deltas from this run's final evals "
                                                "instead of each run's own step-0 evals."),
            metric: str = typer.Option("loss", "--metric", help="loss | bpb"),
            as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")):
    """Forgetting table: each run's final eval per domain and its change since step 0 (or against --base);
    a rise on a reference domain is forgetting, a fall on a target domain is gain."""
    from tunelab.commands.compare import render_table
    from tunelab.eval.relative import forgetting_table

    table = forgetting_table(runs, base=base, metric=metric)
    if as_json:
        print(json.dumps(table, indent=2))
    else:
        render_table(table)


@app.command()
def analyze(base: str = typer.Argument(..., metavar="BASE", help="The model it was tuned from: a model directory, a run or "
                                       "package:NAME."),
            tuned: str = typer.Argument(..., metavar="TUNED", help="The fine-tune: a model directory, a run (its final/) or a LoRA "
                                        "adapter (merged onto BASE)."),
            top_k: int = typer.Option(10, "--top-k", min=1, help="Intruders: how many of the tuned matrix's top "
                                      "singular vectors are checked."),
            threshold: float = typer.Option(0.5, "--threshold", help="Intruders: a top singular vector whose "
                                            "|cos| with every base singular vector is below this."),
            limit: int = typer.Option(20, "--limit", min=0, help="Table rows (0: all)."),
            as_json: bool = typer.Option(False, "--json", help="Print every tensor's row and the totals as JSON."),
            quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Weight-space analysis of a fine-tune against its base: changed and trainable parameters, per-matrix
    update norm, rank and effective rank of the update, unchanged share, intruder dimensions."""
    from tunelab.commands.analyze import analyze as run_analysis
    from tunelab.commands.analyze import render_analysis

    quiet_transformers()
    result = run_analysis(base, tuned, top_k=top_k, threshold=threshold,
                          log=(lambda *a: None) if (quiet or as_json) else stderr)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render_analysis(result, limit=limit)


@app.command()
def report(runs: list[str] = typer.Argument(..., metavar="RUN_OR_GLOB...",
                                            help="Run directories, folders of runs (a pipeline's output) or globs."),
           out: Path = typer.Option(Path("report.html"), "-o", "--out", help="The HTML file to write."),
           title: Optional[str] = typer.Option(None, "--title", help="Page title (default: the runs' names)."),
           tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also write the metrics as "
                                                      "TensorBoard scalars under this folder (needs tensorboard).")):
    """One static HTML page across runs: curves by step or tokens, LR, forgetting, final evals, lineage graph,
    each run's config; no server, nothing fetched."""
    from tunelab.report import write_report, write_tensorboard

    print(write_report(runs, out, title=title))
    if tensorboard is not None:
        written = write_tensorboard(runs, tensorboard)
        if written is not None:
            print(f"tensorboard: {written}  (tensorboard --logdir {written})")


@app.command()
def scaling(runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories of one family "
                                             "(different sizes and/or token counts)."),
            form: str = typer.Option("lc", "--form", help="lc: L(C) = E + A*C^-b with C = 6ND; ln: the Chinchilla "
                                     "form L(N, D) = E + A/N^alpha + B/D^beta."),
            no_floor: bool = typer.Option(False, "--no-floor", help="lc: fit L = A*C^-b (no irreducible loss E)."),
            domain: Optional[str] = typer.Option(None, "--domain", help="Domain whose final eval is L (default: "
                                                 "the one every run trained on)."),
            metric: str = typer.Option("loss", "--metric", help="loss | bpb"),
            params: str = typer.Option("total", "--params", help="N: total | non-embedding parameters."),
            svg: Optional[Path] = typer.Option(None, "--svg", help="Write the plot (points, fit, extrapolation) here."),
            as_json: bool = typer.Option(False, "--json", help="Print the points and fit as JSON.")):
    """Fit a scaling law over runs (N = parameters, D = tokens trained, L = final eval) and print the fitted
    exponents with 95% confidence intervals and the extrapolated loss at 10x and 100x the compute."""
    from tunelab.eval.scaling import render_fit, scaling_fit, svg_plot

    result = scaling_fit(runs, form=form, domain=domain, metric=metric, params=params, floor=not no_floor)
    if svg is not None:
        svg.write_text(svg_plot(result))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render_fit(result)
        if svg is not None:
            print(f"plot: {svg}")


@app.command()
def average(run: Path = typer.Argument(..., help="A run directory with checkpoints/ (full weights, not adapters)."),
            out: Path = typer.Option(..., "--out", help="New directory to write (must not exist, or be empty)."),
            last: Optional[int] = typer.Option(None, "--last", min=1, help="Average the last K intact checkpoints "
                                               "(default 3)."),
            steps: Optional[str] = typer.Option(None, "--steps", help="Average these checkpoint steps, e.g. 200,300,400."),
            quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Uniform average of a run's last checkpoints (LAWA), written as a plain HF model directory with lineage.json."""
    from tunelab.ops.average import parse_steps
    from tunelab.stages.average import cli_recipe, run_average

    cfg = cli_recipe(run, last=last, steps=parse_steps(steps) if steps is not None else None, name=out.name)
    print(run_average(cfg, out=out, quiet=quiet, log=stderr))


@app.command()
def merge(args: list[str] = typer.Argument(..., metavar="RECIPE | MODEL_DIR...",
                                           help="A merge recipe (YAML file or shipped name), or the models to merge: "
                                                "model directories, runs (their final/) or LoRA adapters."),
          method: Optional[str] = typer.Option(None, "--method", help="linear (default), greedy_soup, task_arithmetic, "
                                               "ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, slerp."),
          base: Optional[str] = typer.Option(None, "--base", help="The model the inputs were fine-tuned from "
                                             "(task_arithmetic, ties, dare_*, breadcrumbs*)."),
          weights: Optional[str] = typer.Option(None, "--weights", help="One weight per model, e.g. 0.5,0.5."),
          density: Optional[float] = typer.Option(None, "--density", help="Share of each task vector kept, in (0, 1] "
                                               "(default: 0.5 for ties and dare_*, 0.9 for breadcrumbs*)."),
          seed: Optional[int] = typer.Option(None, "--seed", help="DARE's drop masks."),
          data: list[str] = typer.Option([], "--data", help="Source to score every model on (repeatable); default: "
                                         "what the inputs trained on."),
          set_: list[str] = typer.Option([], "--set", help="Override a recipe value, e.g. --set options.gamma=0.05."),
          out: Optional[Path] = typer.Option(None, "--out", help="New directory for the merged model "
                                             "(default runs/<name>)."),
          quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Merge models (soups, task arithmetic, TIES, DARE, breadcrumbs, SLERP) into a plain HF model directory,
    scored against its parents on held-out data; lineage.json lists every input."""
    from tunelab.stages.merge import cli_recipe, run_merge

    quiet_transformers()
    cfg = cli_recipe(args, method=method, base=base, weights=weights, density=density, seed=seed, data=data,
                     overrides=set_, name=out.name if out else None)
    print(run_merge(cfg, out=out, quiet=quiet, log=stderr))


@app.command()
def prune(target: str = typer.Argument(..., metavar="RECIPE | MODEL_DIR",
                                       help="A prune recipe (YAML file or shipped name), or the model to prune: a "
                                            "model directory, a run (its final/) or a LoRA adapter."),
          method: Optional[str] = typer.Option(None, "--method", help="magnitude (default), wanda, heads, ffn, layers "
                                               "(imp: lottery tickets, recipe only)."),
          sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Share pruned, in [0, 1): of the weights "
                                                   "(magnitude, wanda), of the heads / neurons per layer, or of the layers."),
          count: Optional[int] = typer.Option(None, "--count", help="heads / ffn: units removed per layer; layers: "
                                              "layers removed (instead of --sparsity)."),
          criterion: Optional[str] = typer.Option(None, "--criterion", help="heads, ffn, layers: magnitude (default) "
                                                  "or loss (on calibration data)."),
          scope: Optional[str] = typer.Option(None, "--scope", help="magnitude: layer (default) or global; wanda: row "
                                              "(default) or layer."),
          data: list[str] = typer.Option([], "--data", help="Calibration and evaluation source (repeatable); default: "
                                         "what the model trained on."),
          set_: list[str] = typer.Option([], "--set", help="Override a recipe value, e.g. --set sparsity=0.7."),
          out: Optional[Path] = typer.Option(None, "--out", help="New directory for the pruned model (default "
                                             "runs/<name>)."),
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted lottery (imp) in --out."),
          quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Prune a model: unstructured (magnitude, Wanda; masks keep the zeros through later training with method
    masked), structured (heads, FFN neurons, layers: a smaller HF model), or lottery tickets (imp, a recipe).
    Prints a sparsity report and size, speed and held-out loss before and after."""
    from tunelab.stages.prune import cli_recipe, run_prune

    quiet_transformers()
    cfg = cli_recipe(target, method=method, sparsity=sparsity, count=count, data=data, criterion=criterion,
                     scope=scope, overrides=set_, name=out.name if out else None)
    print(run_prune(cfg, out=out, resume=resume, quiet=quiet, log=stderr))


@app.command()
def anneal(run: Path = typer.Argument(..., help="The run to branch from (its checkpoints/ hold the branch point)."),
           from_: str = typer.Option(..., "--from", help="Checkpoint to branch from: step-N, N, or a path."),
           steps: int = typer.Option(..., "--steps", help="Length of the decay, in steps."),
           shape: Optional[str] = typer.Option(None, "--shape", help="linear | cosine | sqrt (default: the run's "
                                               "train.schedule.decay_shape)."),
           set_: list[str] = typer.Option([], "--set", help=SET_HELP),
           out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: RUN-anneal-N beside RUN)."),
           resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
           quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP)):
    """Branch a short LR decay off a stable-phase checkpoint into a release model; the main run is untouched.

    The branch continues the run's optimizer and data stream and decays from the LR the run had at
    that step to its min_lr_ratio."""
    from tunelab.commands.anneal import run_anneal

    run_anneal(run, from_, steps, shape=shape, out=out, overrides=set_, resume=resume, quiet=quiet)


# The second half's commands live in their own modules (tunelab/commands/NAME.py), each with
# register(app) adding its command(s): a new command is one entry here, not more lines in this file.
COMMAND_MODULES: tuple[str, ...] = ()


def _register_command_modules() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"tunelab.commands.{name}").register(app)


_register_command_modules()


def main() -> None:
    import os

    # typer vendors click: its usage errors are typer._click's exceptions, not the installed click's.
    from typer._click.exceptions import ClickException

    # Offline by design, and transformers' own progress bars would interleave with ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if hasattr(sys.stdout, "reconfigure"):  # piped (nohup, CI), each log line shows when it is printed
        sys.stdout.reconfigure(line_buffering=True)
    from tunelab.commands.cli_help import conventional_metavars

    command = typer.main.get_command(app)
    conventional_metavars(command)
    try:
        code = command.main(standalone_mode=False)  # 130 after Ctrl-C, 0 after --help, else a command's None
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ClickException as exc:  # a usage error: the short message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:  # EOF at a prompt
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
