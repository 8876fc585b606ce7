"""Iterative magnitude pruning with rewinding (lottery tickets): `method: imp` of the prune stage.

    init (the weights before training) -> round-0: dense training (the recipe as given)
    for r in 1..rounds: prune by magnitude of round r-1's trained weights to 1 - (1 - sparsity)^(r/rounds)
                        (pruned weights stay pruned), rewind the survivors to init or to step K of round 0,
                        train again under the masks (method masked)  -> round-r
    random ticket (optional): the last round's per-matrix sparsity, random positions, same rewind point

Every round trains the recipe's whole schedule, so every ticket (and the random control) gets the same
budget. Each round is an ordinary run directory under OUT/rounds/, so an interrupted lottery resumes
(`--resume`): finished rounds are kept, an unfinished one resumes from its checkpoint, and the next
round's masks are recomputed from the saved weights (deterministic).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.config import PruneRecipe, apply_overrides, expand_shorthands, read_yaml, resolve_recipe_path, validate_recipe
from tunelab.errors import ConfigError, ModelError

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "masks.safetensors")


def round_sparsity(target: float, r: int, rounds: int) -> float:
    """The sparsity after round r: the same share of the remaining weights pruned every round."""
    return 1 - (1 - target) ** (r / rounds)


def final_losses(run: Path) -> dict:
    """Held-out loss per domain at the run's last evaluation, and its last training loss."""
    from tunelab.runs import read_metrics, train_losses

    events = read_metrics(run / "metrics.jsonl")
    evals = [e for e in events if e.get("event") == "eval"]
    last = max((e["step"] for e in evals), default=None)
    losses = train_losses(run / "metrics.jsonl")
    return {"eval": {e["domain"]: e["loss"] for e in evals if e["step"] == last}, "eval_step": last,
            "train_loss": losses[max(losses)] if losses else None}


def write_start(rewind_dir: Path, masks: dict, out: Path) -> None:
    """A round's starting model: the rewind point's weights with the pruned ones set to 0, plus the masks."""
    from tunelab import models
    from tunelab.ops import prune
    from tunelab.runs import staged_dir
    from tunelab.tokenizers import load_tokenizer

    if (out / prune.MASKS_FILE).is_file():
        shutil.rmtree(out)  # recomputed (deterministic): a resumed lottery never trusts a half-written start
    model = models.load_model(str(rewind_dir), field="lottery.rewind")
    prune.apply_masks(model, masks)
    with staged_dir(out) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        load_tokenizer(str(rewind_dir)).save_pretrained(staged)
        prune.save_masks(masks, staged)


def run_lottery(cfg: PruneRecipe, out: Path, quiet: bool = False, log=print) -> Path:
    from tunelab import models
    from tunelab.ops import prune
    from tunelab.paths import resolve_cache_dir
    from tunelab.runs import staged_dir, weight_files_sha256
    from tunelab.stages import run_stage, setup

    lot = cfg.lottery
    started = time.time()
    recipe_path = resolve_recipe_path(lot.train)
    base = apply_overrides(expand_shorthands(read_yaml(recipe_path)), list(lot.set))
    kind = base.get("kind") or "pretrain"
    source = f"lottery.train ({recipe_path})"
    dense_cfg = validate_recipe(base, source, kind)
    if dense_cfg.method.name != "full":
        raise ConfigError(f"{source}: method: a lottery trains every weight of the dense network (method full); "
                          f"this recipe uses {dense_cfg.method.name}")
    steps = dense_cfg.train.max_steps
    rewind_step = None if lot.rewind == "init" else int(lot.rewind.removeprefix("step-"))
    if rewind_step is not None and rewind_step >= steps:
        raise ConfigError(f"lottery.rewind: step {rewind_step} is not before the end of training ({steps} steps)")

    rounds = out / "rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    started_with = rounds / "lottery.json"  # a resumed lottery must be the same lottery: rounds are reused
    this = {"prune": cfg.model_dump(mode="json", exclude={"name"}), "train": base}
    if started_with.is_file():
        before = json.loads(started_with.read_text())
        if before != this:
            changed = sorted(k for k in set(before["prune"]) | set(this["prune"])
                             if before["prune"].get(k) != this["prune"].get(k))
            changed += ["lottery.train (the training recipe)"] if before["train"] != this["train"] else []
            raise ConfigError(f"{out}: this lottery started with another recipe (changed: {', '.join(changed)}); "
                              "resume it unchanged or choose a new --out")
    else:
        started_with.write_text(json.dumps(this, indent=2) + "\n")
    init_dir = rounds / "init"
    if not (init_dir / "config.json").is_file():  # the weights before training: what rewind: init returns to
        setup.seed_everything(dense_cfg.train.seed)
        cache = resolve_cache_dir(dense_cfg.data.cache_dir)
        tokenizer = setup.resolve_tokenizer(dense_cfg, cache, log)
        model = setup.initial_model(dense_cfg, tokenizer, log=log)
        shutil.rmtree(init_dir, ignore_errors=True)
        with staged_dir(init_dir) as staged:
            model.save_pretrained(staged, safe_serialization=True)
            tokenizer.save_pretrained(staged)

    def train_round(name: str, start: Path, masked: bool, extra: list[str] = ()) -> Path:
        data = json.loads(json.dumps(base))
        sets = [f"model.path={json.dumps(str(start))}", "init_from=null", f"name={name}", *extra]
        if masked:
            sets.append("method=" + json.dumps({"name": "masked", "options": {}}))
        round_cfg = validate_recipe(apply_overrides(data, sets), f"{source} round {name}", kind)
        run = rounds / name
        if (run / "final" / "config.json").is_file():
            log(f"[lottery] {name}: done, kept")
            return run
        log(f"[lottery] {name}: training {steps} steps from {start.name}")
        run_stage(round_cfg, out=run, resume=(run / "config.yaml").is_file(), quiet=quiet)
        return run

    keep = [] if rewind_step is None else [f"train.checkpoint_every={rewind_step}",
                                           f"train.keep_checkpoints={steps // rewind_step + 1}"]
    trained = train_round("round-0", init_dir, masked=False, extra=keep)
    rewind_dir = init_dir if rewind_step is None else trained / "checkpoints" / f"step-{rewind_step}"
    if not (rewind_dir / "config.json").is_file():
        raise ModelError(f"lottery.rewind: {rewind_dir} is missing (the dense run kept no checkpoint at step "
                         f"{rewind_step}); remove {out} and run again")
    summary = [{"round": 0, "run": str(trained), "sparsity": 0.0, **final_losses(trained)}]
    masks = None
    for r in range(1, lot.rounds + 1):
        target = round_sparsity(cfg.sparsity, r, lot.rounds)
        weights = models.load_model(str(trained / "final"), field="lottery")
        params = prune.prunable_params(weights, cfg.targets)
        masks = prune.masks_from_scores(prune.magnitude_scores(params), target, cfg.scope, masks)
        start = rounds / f"round-{r}-start"
        write_start(rewind_dir, masks, start)
        trained = train_round(f"round-{r}", start, masked=True)
        summary.append({"round": r, "run": str(trained), "sparsity": target, **final_losses(trained)})
        log(f"[lottery] round {r}: sparsity {target:.1%}, held-out loss "
            + ", ".join(f"{d} {v:.4f}" for d, v in summary[-1]["eval"].items()))
    record: dict = {"name": cfg.name, "method": "imp", "rewind": lot.rewind, "rounds": summary}
    if lot.random_ticket:
        start = rounds / "random-start"
        write_start(rewind_dir, prune.random_masks_like(masks, cfg.seed), start)
        random_run = train_round("random", start, masked=True)
        record["random_ticket"] = {"run": str(random_run), "sparsity": summary[-1]["sparsity"], "seed": cfg.seed,
                                   **final_losses(random_run)}
        log("[lottery] random ticket: held-out loss "
            + ", ".join(f"{d} {v:.4f}" for d, v in record["random_ticket"]["eval"].items()))

    ticket = trained / "final"
    for file in ticket.iterdir():  # the last ticket is the stage's output model (the rounds stay beside it)
        if file.is_file() and (file.name in MODEL_FILES or file.name.startswith(("tokenizer", "special_tokens"))):
            shutil.copy2(file, out / file.name)
    model = models.load_model(str(out), field="lottery")
    record["sparsity"] = prune.sparsity_report(model, prune.load_masks(out))
    log(prune.render_sparsity(record["sparsity"]))
    record.update(seconds=round(time.time() - started, 2), recipe=cfg.model_dump(mode="json"))
    lineage = {"name": cfg.name, "stage": "prune",
               "parents": [{"role": "lottery-ticket", "path": str(ticket.resolve()),
                            "weights_sha256": weight_files_sha256(ticket)},
                           {"role": "rewind", "path": str(rewind_dir.resolve()),
                            "weights_sha256": weight_files_sha256(rewind_dir)}],
               "method": {"name": "imp", "sparsity": cfg.sparsity, "rounds": lot.rounds, "rewind": lot.rewind,
                          "scope": cfg.scope}}
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    (out / "prune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    log(f"wrote {out} (rounds in {rounds})")
    return out
