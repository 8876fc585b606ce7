"""The prune stage (`tunelab prune`, `prune:` in pipelines): a saved model in, a pruned HF model out.

    magnitude | wanda  -> the same architecture with pruned weights at 0 + masks.safetensors
                          (the `masked` method keeps them 0 in any later training)
    heads | ffn | layers -> a smaller HF config with those units removed (ops/structured.py)
    imp                -> lottery tickets: train, prune, rewind, repeat (every round a training run)

Every output is written by the operation scaffold (ops/operation.py) and holds lineage.json (the parent
and its hash) and prune.json: the per-matrix sparsity report, size and held-out loss before and after
(eval/scoring.py), and for structured pruning the forward speed of both (measured in turns on one batch;
unstructured zeros compute the same in dense kernels, so their speed is not measured).
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.config import PruneRecipe, RECIPES_DIR, STRUCTURED, apply_overrides, is_recipe, read_yaml, resolve_recipe_path, validate
from tunelab.errors import ConfigError

PRUNE_RECIPES_DIR = RECIPES_DIR / "prunes"


def load_prune_recipe(recipe: str | Path, overrides: list[str] | None = None) -> PruneRecipe:
    path = resolve_recipe_path(recipe, "prunes")
    data = apply_overrides(PruneRecipe.expand_shorthands(read_yaml(path)), list(overrides or []))
    named = data.get("kind")
    if named is None and (isinstance(data.get("model"), dict) or {"data", "train", "init_from"} & set(data)):
        named = "pretrain"  # a training recipe without a kind: the kind its command gives it
    if named not in (None, "prune"):
        raise ConfigError(f"{path}: kind: this is a {named!r} recipe; run it with `tunelab {named}`")
    return validate({**data, "kind": "prune"}, str(path), PruneRecipe)


def cli_recipe(target: str, method: str | None = None, sparsity: float | None = None, count: int | None = None,
               data: list[str] | None = None, criterion: str | None = None, scope: str | None = None,
               overrides: list[str] | None = None, name: str | None = None) -> PruneRecipe:
    """`tunelab prune RECIPE [--set ...]` or the one-line form `tunelab prune MODEL_DIR --method ... --sparsity ...`."""
    flags = {"--method": method, "--sparsity": sparsity, "--count": count, "--data": data or None,
             "--criterion": criterion, "--scope": scope}
    if is_recipe(target, "prunes"):
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ConfigError(f"prune: {target} is a recipe: change it with --set (e.g. --set sparsity=0.7), "
                              f"not {given[0]}")
        return load_prune_recipe(target, overrides)
    recipe: dict = {"name": name or "prune", "model": target, "method": method or "magnitude"}
    for key, value in (("sparsity", sparsity), ("count", count), ("criterion", criterion), ("scope", scope)):
        if value is not None:
            recipe[key] = value
    if data:  # the one-line form's --data is what it calibrates on and what it scores
        recipe["calibration"] = {"data": list(data)}
        recipe["eval"] = {"data": list(data)}
    data_ = apply_overrides(PruneRecipe.expand_shorthands(recipe), list(overrides or []))
    return validate({**data_, "kind": "prune"}, "prune", PruneRecipe)


# ---------------------------------------------------------------- calibration, size and speed


def calibration_sources(cfg: PruneRecipe, model_path: Path, log) -> list[tuple]:
    """(spec, content hash, eval_fraction) of each calibration source: the split rule of eval/scoring.py, so
    the calibration text is the training split of what the model trained on and never the text scored."""
    from tunelab.config import DataConfig, SourceSpec
    from tunelab.data import source_content_hash
    from tunelab.runs import ancestor_source_specs, trained_sources
    from tunelab.paths import resolve_cache_dir

    if cfg.calibration.data is not None:
        specs = list(cfg.calibration.data)
    else:
        found = ancestor_source_specs([model_path])
        specs = [validate(s, "calibration.data", SourceSpec) for s in (found or [{"source": "builtin:prose"}])]
    trained = trained_sources(model_path)
    found = []
    for spec in specs:
        digest = source_content_hash(spec, resolve_cache_dir(), log=log)
        found.append((spec, digest, cfg.eval.eval_fraction or trained.get(digest) or DataConfig().eval_fraction))
    return found


def calibration_batches(cfg: PruneRecipe, model, tokenizer, model_path: Path, log) -> list[dict]:
    """Windows of the calibration text (its training split: the held-out split stays unseen), as batches."""
    import numpy as np
    import torch

    from tunelab import models, tokenizers
    from tunelab.data import tokenize_source
    from tunelab.eval.perplexity import window_indices
    from tunelab.paths import resolve_cache_dir

    sources = calibration_sources(cfg, model_path, log)
    seq = min(cfg.calibration.seq_len, models.max_positions(model) or cfg.calibration.seq_len)
    eos = tokenizers.eos_id(tokenizer)
    windows = []
    per_source = max(1, cfg.calibration.max_tokens // seq // len(sources))
    for spec, _, fraction in sources:
        tokens = tokenize_source(spec, tokenizer, eos, resolve_cache_dir(), fraction, log=log).train
        n = len(tokens) // seq
        if n == 0:
            raise ConfigError(f"calibration.data: {spec.source} has fewer than {seq} training tokens; give more text "
                              "or a smaller calibration.seq_len")
        for i in window_indices(n, per_source):
            windows.append(np.asarray(tokens[i * seq:(i + 1) * seq], dtype=np.int64))
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(windows), 8):
        ids = torch.from_numpy(np.stack(windows[start:start + 8])).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if models.is_encoder(model):  # the MLM loss of fixed, seeded masks (as evaluation scores it)
            from tunelab.train.objectives import fixed_mlm_labeler

            label = fixed_mlm_labeler(tokenizer.mask_token_id, len(tokenizer), list(tokenizer.all_special_ids))
            batch = label(batch, list(range(start, start + ids.shape[0])))
        else:
            batch["labels"] = ids.clone()
        batches.append(batch)
    log(f"calibration: {len(windows)} windows of {seq} tokens from {', '.join(s.source for s, _, _ in sources)} "
        "(training split)")
    return batches


def measure(model, model_dir: Path) -> dict:
    """Parameters, non-zero parameters and bytes on disk (the weights, not the masks) of a model."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "nonzero_params": sum(int((p.detach() != 0).sum()) for p in model.parameters()),
            "bytes": sum(f.stat().st_size for f in Path(model_dir).glob("model*.safetensors"))}


def forward_speed(models_: list, seq_len: int = 128, repeats: int = 7) -> list[float]:
    """Forward tokens/s of each model on one batch (4 x seq_len random ids): a warm-up each, then `repeats`
    rounds in which the models take turns (so a change in machine load hits them alike); the median."""
    import statistics

    import torch

    vocab = models_[0].get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (4, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(models_[0].parameters()).device)
    times: list[list[float]] = [[] for _ in models_]
    with torch.no_grad():
        for model in models_:
            model.eval()
            model(input_ids=ids)
        for _ in range(repeats):
            for model, spent in zip(models_, times):
                start = time.perf_counter()
                model(input_ids=ids)
                spent.append(time.perf_counter() - start)
    return [round(ids.numel() / statistics.median(spent), 1) for spent in times]


# ---------------------------------------------------------------- the stage


def run_prune(cfg: PruneRecipe, out=None, resume: bool = False, quiet: bool = False, log=None) -> Path:
    """Prune the recipe's model into `out` (default runs/<name>): an HF model directory with lineage.json and
    prune.json. With resume, a finished prune in `out` is kept and returned."""
    from tunelab.ops import operation
    from tunelab.stages.lottery import run_lottery

    log = (lambda *a: None) if quiet else (log or print)
    rounds = Path(out or Path("runs") / cfg.name).expanduser() / "rounds"
    if cfg.method == "imp" and resume and rounds.is_dir() and not (rounds.parent / "lineage.json").is_file():
        return run_lottery(cfg, rounds.parent, quiet=quiet, log=log)  # an unfinished lottery resumes round by round
    out, done = operation.output_dir(out, cfg.name, "prune", resume, log)
    if done:
        return out
    return run_lottery(cfg, out, quiet=quiet, log=log) if cfg.method == "imp" else _prune_saved_model(cfg, out, log)


def _prune_saved_model(cfg: PruneRecipe, out: Path, log) -> Path:
    import torch

    from tunelab import models, tokenizers
    from tunelab.eval.scoring import render_before_after
    from tunelab.ops import operation, prune

    (item,) = operation.resolve_inputs([(cfg.model, "pruned-from", "model")])
    started = time.time()
    with operation.staged_output(out) as (staged, work):
        operation.materialize(item, work, log)  # an adapter: merged onto its base first
        tokenizer = tokenizers.load_tokenizer(str(item.model_dir), "model")
        torch.manual_seed(cfg.seed)
        model = models.load_model(str(item.model_dir), field="model")
        model.eval()
        before = measure(model, item.model_dir)
        needs_data = cfg.method == "wanda" or (cfg.method in STRUCTURED and cfg.criterion == "loss")
        batches = calibration_batches(cfg, model, tokenizer, item.path, log) if needs_data else None

        record: dict = {"name": cfg.name, "method": cfg.method, "model": str(item.path.resolve())}
        if cfg.method in STRUCTURED:
            from tunelab.ops import structured

            try:
                record["structured"] = structured.shrink(model, cfg.method, fraction=cfg.sparsity, count=cfg.count,
                                                         criterion=cfg.criterion, batches=batches)
            except ConfigError as err:  # shrink names its own argument; the recipe calls it sparsity
                message = str(err)
                raise ConfigError("sparsity:" + message[len("fraction:"):] if message.startswith("fraction:")
                                  else message) from None
            masks = None
        else:
            params = prune.prunable_params(model, cfg.targets)
            previous = None
            if (item.model_dir / prune.MASKS_FILE).is_file():  # pruning a pruned model prunes further
                previous = prune.load_masks(item.model_dir)
                params = {k: p for k, p in model.named_parameters() if k in previous or k in params}
                previous = {k: previous.get(k, torch.ones(p.shape, dtype=torch.bool)) for k, p in params.items()}
            scores = (prune.magnitude_scores(params) if cfg.method == "magnitude"
                      else prune.wanda_scores(model, params, batches))
            masks = prune.masks_from_scores(scores, cfg.sparsity, cfg.scope, previous)
            prune.apply_masks(model, masks)
        # Scored after pruning, so a refused amount fails before any evaluation (the parent is scored from disk).
        calibrated = {d: f for _, d, f in calibration_sources(cfg, item.path, log)} if needs_data else None
        scorer = operation.make_scorer(cfg.eval, [item.path], log, calibrated)
        scores_before = scorer(item.path) if scorer else None
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        if masks is not None:
            prune.save_masks(masks, staged)
            record["sparsity"] = prune.sparsity_report(model, masks)
            log(prune.render_sparsity(record["sparsity"]))
        after = measure(model, staged)
        speed = ""
        if masks is None:  # a smaller architecture runs faster; zeros in dense weights compute the same (not timed)
            parent = models.load_model(str(item.model_dir), field="model")
            before["forward_tokens_per_s"], after["forward_tokens_per_s"] = forward_speed([parent, model])
            del parent
            speed = (f"; forward {before['forward_tokens_per_s']:,.0f} -> {after['forward_tokens_per_s']:,.0f} "
                     "tokens/s (median of 7 interleaved runs on one batch)")
        record["size"] = {"before": before, "after": after}
        if scorer:
            scores_after = scorer(staged)
            record["eval"] = {**scorer.describe(), "before": scores_before, "after": scores_after}
            log(render_before_after(scores_before, scores_after))
        log(f"parameters {before['params']:,} -> {after['params']:,} ({after['nonzero_params']:,} non-zero); "
            f"on disk {before['bytes'] / 1e6:.2f} -> {after['bytes'] / 1e6:.2f} MB" + speed)
        record.update(seconds=round(time.time() - started, 2), recipe=cfg.model_dump(mode="json"))
        method = {"name": cfg.method, "sparsity": cfg.sparsity, "count": cfg.count, "scope": cfg.scope,
                  "criterion": cfg.criterion if cfg.method in STRUCTURED else None}
        operation.write_records(staged, "prune", cfg.name, [operation.parent_entry(item)], "prune.json", record,
                                method=method, tokenizer=operation.tokenizer_entry(item, tokenizer))
    log(f"wrote {out}")
    return out
