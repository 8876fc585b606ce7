"""The prune stage (`tunelab prune`, `prune:` in pipelines): a saved model in, a pruned HF model out.

    magnitude | wanda  -> the same architecture with pruned weights at 0 + masks.safetensors
                          (the `masked` method keeps them 0 in any later training)
    heads | ffn | layers -> a smaller HF config with those units removed (ops/structured.py)
    imp                -> lottery tickets: train, prune, rewind, repeat (every round a training run)

Every output holds lineage.json (the parent and its hash) and prune.json: the per-matrix sparsity
report, and size, speed and held-out loss before and after (the merge stage's evaluation).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.config import PruneRecipe, RECIPES_DIR, STRUCTURED, apply_overrides, read_yaml, resolve_recipe_path, validate
from tunelab.errors import ConfigError, RunDirError

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
    from tunelab.stages.merge import is_recipe

    flags = {"--method": method, "--sparsity": sparsity, "--count": count, "--data": data or None,
             "--criterion": criterion, "--scope": scope}
    if is_recipe(target) or (not Path(target).exists() and (PRUNE_RECIPES_DIR / f"{target}.yaml").is_file()):
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


def calibration_batches(cfg: PruneRecipe, model, tokenizer, model_path: Path, log) -> list[dict]:
    """Windows of the calibration text (its training split: the held-out split stays unseen), as batches."""
    import numpy as np
    import torch

    from tunelab import models
    from tunelab.config import DataConfig, SourceSpec
    from tunelab.data import tokenize_source
    from tunelab.eval.perplexity import window_indices
    from tunelab.runs import ancestor_source_specs, trained_sources
    from tunelab.paths import resolve_cache_dir
    from tunelab.tokenizers import eos_id

    if cfg.calibration.data is not None:
        specs = list(cfg.calibration.data)
    else:
        found = ancestor_source_specs([model_path])
        specs = [validate(s, "calibration.data", SourceSpec) for s in (found or [{"source": "builtin:prose"}])]
    fractions = [f for f in trained_sources(model_path).values() if f is not None]
    fraction = cfg.eval.eval_fraction or min(fractions, default=DataConfig().eval_fraction)
    seq = min(cfg.calibration.seq_len, models.max_positions(model) or cfg.calibration.seq_len)
    eos = eos_id(tokenizer)
    windows = []
    per_source = max(1, cfg.calibration.max_tokens // seq // len(specs))
    for spec in specs:
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
    log(f"calibration: {len(windows)} windows of {seq} tokens from {', '.join(s.source for s in specs)} "
        "(training split)")
    return batches


def measure(model, model_dir: Path | None = None, seq_len: int = 128, repeats: int = 5) -> dict:
    """Parameters, non-zero parameters, bytes on disk and forward tokens/s (CPU or the model's device) of a model."""
    import torch

    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p.detach() != 0).sum()) for p in model.parameters())
    size = (sum(f.stat().st_size for f in Path(model_dir).glob("model*.safetensors")) if model_dir else None)  # not the masks
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (4, seq_len), generator=g).to(device)
    model.eval()
    times = []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {"params": params, "nonzero_params": nonzero, "bytes": size,
            "forward_tokens_per_s": round(ids.numel() / min(times), 1)}  # the fastest: least disturbed by other load


# ---------------------------------------------------------------- the stage


def run_prune(cfg: PruneRecipe, out=None, resume: bool = False, quiet: bool = False, log=None) -> Path:
    """Prune the recipe's model into `out` (default runs/<name>): an HF model directory with lineage.json and
    prune.json. With resume, a finished prune in `out` is kept and returned."""
    log = (lambda *a: None) if quiet else (log or print)
    out = Path(out).expanduser() if out else Path("runs") / cfg.name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if resume and (out / "prune.json").is_file():
            log(f"{out}: prune already done, kept")
            return out
        if not (resume and cfg.method == "imp" and (out / "rounds").is_dir()):  # a lottery resumes round by round
                raise RunDirError(f"{out} already exists and is not empty: choose a new --out (nothing was changed)")
    if cfg.method == "imp":
        from tunelab.stages.lottery import run_lottery

        return run_lottery(cfg, out, quiet=quiet, log=log)
    return _prune_saved_model(cfg, out, log)


def _prune_saved_model(cfg: PruneRecipe, out: Path, log) -> Path:
    import torch

    from tunelab import models
    from tunelab.ops import merge_inputs, prune
    from tunelab.runs import staged_dir, weight_files_sha256
    from tunelab.stages.merge import Scorer
    from tunelab.tokenizers import load_tokenizer, tokenizer_fingerprint

    item = merge_inputs.resolve_input(cfg.model, "pruned", "model")
    started = time.time()
    with staged_dir(out) as staged:
        staging = staged / ".work"
        staging.mkdir()
        merge_inputs.materialize(item, staging, log)  # an adapter: merged onto its base first
        tokenizer = load_tokenizer(str(item.model_dir), "model")
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
        scorer = Scorer(cfg, [item], log) if (cfg.eval.data is None or cfg.eval.data) else None
        scores_before = scorer(item.path) if scorer else None
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        if masks is not None:
            prune.save_masks(masks, staged)
            record["sparsity"] = prune.sparsity_report(model, masks)
            log(prune.render_sparsity(record["sparsity"]))
        after = measure(model, staged)
        record["size"] = {"before": before, "after": after}
        if scorer:
            scores_after = scorer(staged)
            record["eval"] = {**scorer.describe(), "before": scores_before, "after": scores_after}
            log(render_before_after(scores_before, scores_after))
        log(f"parameters {before['params']:,} -> {after['params']:,} ({after['nonzero_params']:,} non-zero); "
            f"on disk {before['bytes'] / 1e6:.2f} -> {after['bytes'] / 1e6:.2f} MB; forward "
            f"{before['forward_tokens_per_s']:,.0f} -> {after['forward_tokens_per_s']:,.0f} tokens/s"
            + (" (unstructured zeros do not speed up dense kernels)" if masks is not None else ""))
        record.update(seconds=round(time.time() - started, 2), recipe=cfg.model_dump(mode="json"))
        lineage = {"name": cfg.name, "stage": "prune",
                   "parents": [{"role": "pruned-from", "path": str(item.path.resolve()), "label": item.label,
                                "weights_sha256": weight_files_sha256(item.path)}],
                   "method": {"name": cfg.method, "sparsity": cfg.sparsity, "count": cfg.count, "scope": cfg.scope,
                              "criterion": cfg.criterion if cfg.method in STRUCTURED else None},
                   "tokenizer": {"source": str(item.path.resolve()),
                                 "fingerprint": tokenizer_fingerprint(tokenizer)}}
        (staged / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (staged / "prune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        shutil.rmtree(staging)
    log(f"wrote {out}")
    return out


def render_before_after(before: dict, after: dict) -> str:
    """Held-out loss per domain before and after pruning, as aligned text."""
    rows = [[d, f"{before[d]['loss']:.4f}", f"{after[d]['loss']:.4f}", f"{after[d]['loss'] - before[d]['loss']:+.4f}"]
            for d in after]
    header = ["domain", "before", "after", "change"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in rows), "held-out loss, lower is better"])
