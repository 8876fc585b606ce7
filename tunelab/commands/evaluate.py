"""`tunelab eval` and `tunelab generate`: work on any saved model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab import models, tokenizers
from tunelab.eval.scoring import SPLITS, evaluate_model, load, run_recipe, source_specs  # noqa: F401 (eval's body)
from tunelab.paths import resolve_cache_dir


def eval_record(results: dict, model_dir: str) -> dict:
    """What an eval stage writes to eval.json: the scores per domain and, under "model", the model they are
    of ({"path" (absolute), "weights_sha256"}), so a report made later still links the two."""
    from tunelab.runs import weight_files_sha256

    path = Path(model_dir).expanduser()
    model = {"path": str(path.resolve()), "weights_sha256": weight_files_sha256(path)} if path.is_dir() else \
        {"path": str(model_dir)}
    return {**results, "model": model}


def generate_text(model_dir: str, prompt: str, max_new_tokens: int = 64, greedy: bool = False,
                  temperature: float = 0.8, top_k: int = 50, seed: int = 0, base: str | None = None) -> str:
    tokenizer = tokenizers.load_tokenizer(model_dir, "MODEL_DIR")
    model = models.load_model(model_dir, field="MODEL_DIR", base=base)
    if models.is_encoder(model):
        from tunelab.errors import ModelError

        raise ModelError(f"{model_dir}: an encoder (masked LM) cannot generate text; use `tunelab eval` instead")
    torch.manual_seed(seed)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:  # an empty prompt starts from the document separator
        ids = torch.tensor([[tokenizers.eos_id(tokenizer)]])
    limit = models.max_positions(model)
    if limit is not None:
        max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    # `or` would treat pad id 0 as missing.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizers.eos_id(tokenizer)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k or None}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, pad_token_id=pad_id,
                             **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------- several models, tasks, generation


def _require_decoder(model, model_dir: str, what: str) -> None:
    if models.is_encoder(model):
        from tunelab.errors import ModelError

        raise ModelError(f"{model_dir}: an encoder (masked LM) has no left-to-right likelihood for {what}; "
                         "score it with tunelab eval --data")


def evaluate_suite(model_dirs: list[str], sources: list[str] | None = None, tasks: list[str] | None = None,
                   generation: dict | None = None, relative_to: str | None = None, metric: str = "loss",
                   seq_len: int = 256, max_tokens: int | None = None, split: str = "auto", base: str | None = None,
                   seed: int = 0, log=print) -> dict:
    """Several models (and a base to measure from) on the same data, tasks and prompts; each model is
    loaded once. Returns {"models": {name: path}, "base": name | None, "perplexity": relative table | None,
    "tasks": {task: ...} | None, "generation": {name: {domain: ...}} | None}.

    Perplexity: every model scores the same text per source: held out if any of the models (or their
    ancestors) trained on it, with the smallest eval_fraction any of them used, whole otherwise (with
    split="auto"). generation: the keyword arguments of eval.generation.generation_quality plus
    "prompts" (per source) and "prompt_tokens"; prompts come from each source's held-out split.
    """
    from tunelab.data import source_content_hash
    from tunelab.errors import ConfigError
    from tunelab.eval import relative
    from tunelab.runs import trained_sources

    if not model_dirs:
        raise ConfigError("MODEL_DIR: give at least one model directory")
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if metric not in relative.METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(relative.METRICS)}")
    # Path() drops a trailing slash, so the base given twice is scored once.
    ordered = list(dict.fromkeys(str(Path(p)) for p in ([relative_to] if relative_to else []) + list(model_dirs)))
    names = relative.labels(ordered)
    paths = dict(zip(names, ordered))
    base_name = names[0] if relative_to else None
    cache = resolve_cache_dir()
    specs = source_specs(sources) if sources else []
    digests = {spec.domain: source_content_hash(spec, cache, log=lambda *a: None) for spec in specs}
    histories = {name: trained_sources(path) for name, path in paths.items()}
    shared: dict = {}  # what any of the models trained on, at the smallest held-out fraction any used
    for seen in histories.values():
        for digest, fraction in seen.items():
            known = [f for f in (shared.get(digest), fraction) if f is not None]
            shared[digest] = min(known) if known else None
    task_sets = [_task(t, cache) for t in dict.fromkeys(tasks or [])]
    stems = [t["name"] for t in task_sets]
    for t in task_sets:  # two files with one name (a/task.jsonl, b/task.jsonl): named by their paths
        t["name"] = t["name"] if stems.count(t["name"]) == 1 else t["file"]
    out = {"models": paths, "base": base_name, "perplexity": None, "tasks": None, "generation": None}
    scores, task_results, quality, fingerprints = {}, {}, {}, {}
    for name, path in paths.items():
        log(f"eval: {name} ({path})")
        model, tokenizer = load(path, base)
        if task_sets or generation is not None:
            _require_decoder(model, path, "multiple-choice tasks and generation")
        fingerprints[name] = tokenizers.tokenizer_fingerprint(tokenizer)
        if specs:
            scores[name] = evaluate_model(path, sources, seq_len=seq_len, max_tokens=max_tokens, split=split, log=log,
                                          trained=shared, loaded=(model, tokenizer))
        if task_sets:
            from tunelab.eval.multiple_choice import evaluate_task

            task_results[name] = {t["name"]: evaluate_task(model, tokenizer, t["examples"], seed=seed)
                                  for t in task_sets}
        if generation is not None:
            quality[name] = _generation(path, model, tokenizer, generation.get("sources") or sources, split, shared,
                                        generation, seed, log)
        del model
    if specs:
        if base_name is None:
            roles = {n: {d: "target" if digests[d] in histories[n] else "reference" for d in digests} for n in names}
        else:
            before = histories[base_name]
            roles = {n: {d: "target" if digests[d] in histories[n] and digests[d] not in before else "reference"
                         for d in digests} for n in names}
        notes = []
        if len(set(fingerprints.values())) > 1 and metric == "loss":
            notes.append("the models have different tokenizers: their losses are per token of different "
                         "vocabularies; compare with --metric bpb")
        out["perplexity"] = relative.relative_table(scores, paths, roles, base=base_name, metric=metric,
                                                    footnotes=notes)
    if task_sets:
        out["tasks"] = _task_table(task_sets, task_results, base_name, seed)
    if generation is not None:
        out["generation"] = quality
    return out


def _task(task: str, cache) -> dict:
    from tunelab.eval.multiple_choice import load_task

    name, path, examples = load_task(task, cache)
    return {"name": name, "file": path, "examples": examples}


def _task_table(task_sets: list[dict], results: dict, base_name: str | None, seed: int) -> dict:
    """Per task: file, examples, chance, and per model each accuracy with its interval (and, against a
    base, the paired difference); the per-example correctness lists stay out of the JSON."""
    from tunelab.eval.multiple_choice import METRICS, paired_delta

    table = {}
    for t in task_sets:
        name = t["name"]
        first = next(iter(results.values()))[name]
        entry = {"file": t["file"], "examples": first["examples"], "chance": first["chance"],
                 "confidence": first["confidence"], "resamples": first["resamples"], "seed": seed, "models": {}}
        for model_name, per_task in results.items():
            r = per_task[name]
            cell = {m: {"value": r[m]["value"], "ci": r[m]["ci"]} for m in METRICS}
            if base_name is not None and model_name != base_name:
                base = results[base_name][name]
                for m in METRICS:
                    cell[m]["delta"] = paired_delta(r, base, m, seed=seed)
            entry["models"][model_name] = cell
        table[name] = entry
    return table


def _generation(path: str, model, tokenizer, sources: list[str], split: str, shared: dict, options: dict, seed: int,
                log) -> dict:
    """Generation measures per source, from prompts at document starts in its held-out split."""
    from tunelab.config import DataConfig
    from tunelab.data import source_content_hash, tokenize_source
    from tunelab.eval.generation import generation_quality, prompt_windows

    recipe = run_recipe(path) or {}
    fraction = recipe.get("data", {}).get("eval_fraction") or DataConfig().eval_fraction
    cache = resolve_cache_dir()
    eos = tokenizers.eos_id(tokenizer)
    prompt_tokens = int(options.get("prompt_tokens", 32))
    max_new = int(options.get("max_new_tokens", 96))
    limit = models.max_positions(model)
    if limit is not None and prompt_tokens + max_new > limit:
        max_new = max(1, limit - prompt_tokens)
        log(f"generation: {max_new} new tokens at most (the model has {limit} positions)")
    out = {}
    for spec in source_specs(sources):
        digest = source_content_hash(spec, cache, log=lambda *a: None)  # perplexity logged the data already
        held_out = split == "held-out" or (split == "auto" and digest in shared)
        src = tokenize_source(spec, tokenizer, eos, cache, shared.get(digest) or fraction, log=lambda *a: None,
                              split=held_out)
        prompts = prompt_windows(src.eval, eos, prompt_tokens, int(options.get("prompts", 8)))
        if not prompts:
            log(f"generation: {spec.domain}: its {'held-out split' if held_out else 'text'} has fewer than "
                f"{prompt_tokens} tokens; skipped")
            continue
        result = generation_quality(model, tokenizer, prompts, max_new_tokens=max_new, seed=seed,
                                    temperature=float(options.get("temperature", 1.0)),
                                    top_k=int(options.get("top_k", 0)), samples=int(options.get("samples", 2)))
        result["split"] = "held-out" if held_out else "whole"
        out[spec.domain] = result
    return out


def render_eval(results: dict, title: str, console=None) -> None:
    """Print evaluate_model's result: one row per domain (tunelab eval, a pipeline's eval stage)."""
    from rich.table import Table

    from tunelab.console import table_console

    table = Table(title=title)
    for col in ("domain", "split", "loss", "ppl", "bits/byte", "tokens"):
        table.add_column(col, justify="left" if col in ("domain", "split") else "right")
    for domain, r in results.items():
        if domain == "model":  # eval.json's record of the model scored (eval_record), not a domain
            continue
        split = r["split"] + (f" ({r['eval_fraction']})" if r.get("eval_fraction") else "")  # the training's split
        table.add_row(domain, split, f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
                      f"{r['bpb']:.4f}" if r["bpb"] else "-", f"{r['eval_tokens']:,}")
    (console or table_console()).print(table)


def render_suite(result: dict, console=None) -> None:
    """Print evaluate_suite's result: the perplexity table, one table per task, the generation measures."""
    from rich.table import Table

    from tunelab.console import table_console

    from tunelab.eval.relative import render_relative

    console = console or table_console()
    if result["perplexity"] is not None:
        render_relative(result["perplexity"], console)
    for name, task in (result["tasks"] or {}).items():
        table = Table(title=f"task {name}: {task['examples']} examples, chance {task['chance']:.3f} "
                            f"({task['confidence']:.0%} bootstrap intervals, {task['resamples']} resamples)")
        table.add_column("model")
        for label in ("acc (sum)", "acc per token", "acc per byte"):
            table.add_column(label, justify="right")
        for model_name, cell in task["models"].items():
            table.add_row(model_name, *(f"{cell[m]['value']:.3f} [{cell[m]['ci'][0]:.3f}, {cell[m]['ci'][1]:.3f}]"
                                        for m in ("acc", "acc_token", "acc_byte")))
            if "delta" in cell["acc"]:  # paired: the same examples resampled for both models
                table.add_row(f"  vs {result['base']}", *(
                    f"{cell[m]['delta']['value']:+.3f} [{cell[m]['delta']['ci'][0]:+.3f}, {cell[m]['delta']['ci'][1]:+.3f}]"
                    for m in ("acc", "acc_token", "acc_byte")), style="dim")
        console.print(table)
    if result["generation"]:
        table = Table(title="generation: greedy / sampled continuations of held-out prompts (model tokens)")
        for col in ("model", "domain", "mode", "rep-1", "rep-4", "distinct-2", "longest repeat", "entropy (nats)"):
            table.add_column(col, justify="left" if col in ("model", "domain", "mode") else "right")
        for model_name, per_domain in result["generation"].items():
            for domain, g in per_domain.items():
                for mode in ("greedy", "sampled"):
                    m = g[mode]
                    table.add_row(model_name, domain, mode, f"{m['rep_1']:.3f}", f"{m['rep_4']:.3f}",
                                  f"{m['distinct_2']:.3f}", f"{m['longest_repeat']:.1f}", f"{m['mean_entropy']:.3f}")
        console.print(table)
        console.print("rep-n: share of a continuation's n-grams seen earlier in it; distinct-n: unique n-grams over "
                      "all continuations; longest repeat: tokens in the longest span occurring twice (mean)",
                      style="dim", markup=False, highlight=False)
