"""Iterative magnitude pruning with rewinding (lottery tickets): `method: imp` of the prune stage.

    init (the weights before training) -> round-0: dense training (the recipe as given)
    for r in 1..rounds: prune by magnitude of round r-1's trained weights to 1 - (1 - sparsity)^(r/rounds)
                        (pruned weights stay pruned), rewind the survivors to init or to step K of round 0,
                        train again under the masks (method masked)  -> round-r
    random ticket (optional): the last round's per-matrix sparsity, random positions, same rewind point

Every round trains the recipe's whole schedule, so every ticket (and the random control) gets the same
budget. Each round is an ordinary run directory under OUT/rounds/, keyed as pipeline stages are
(stage_keys.py), so an interrupted lottery resumes (`--resume`): finished rounds are kept, an unfinished
one resumes from its checkpoint, the next round's masks are recomputed from the saved weights
(deterministic), and rounds whose recipe changed run again into fresh directories.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.config import PruneRecipe, apply_overrides, expand_shorthands, read_yaml, resolve_recipe_path
from tunelab.recipe import validate_recipe
from tunelab.errors import ConfigError, ModelError
from tunelab.paths import resolve_cache_dir

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
    from tunelab.runs import weight_files_sha256
    from tunelab.stage_keys import data_hashes, plan_stage, stage_key
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

    # Every round (and init, the weights before training) is keyed with stage_keys, as a pipeline's stages are:
    # a round whose key holds a finished run is kept, an interrupted one resumes from its checkpoint, and a
    # changed recipe sends the rounds it changes to fresh directories (round-1.<key8>), never over old ones.
    rounds = out / "rounds"
    cache = resolve_cache_dir(dense_cfg.data.cache_dir)
    outside = dense_cfg.model.path if dense_cfg.model.path and Path(dense_cfg.model.path).is_dir() else None
    replay = dense_cfg.data.replay.sources if dense_cfg.data.replay else []
    init = plan_stage(rounds, "init", stage_key({
        "train": base, "data": data_hashes(dense_cfg.data.train + dense_cfg.data.eval + replay, cache, log),
        "model": weight_files_sha256(Path(outside)) if outside else None}), "model.safetensors")
    if init.action != "skip":  # what rewind: init returns to
        init.begin(role="init")
        setup.seed_everything(dense_cfg.train.seed)
        tokenizer = setup.resolve_tokenizer(dense_cfg, cache, log)
        setup.initial_model(dense_cfg, tokenizer, log=log).save_pretrained(init.dir, safe_serialization=True)
        tokenizer.save_pretrained(init.dir)
        init.finish(role="init")

    def train_round(name: str, parts: dict, masks: dict | None = None, extra: list[str] = ()) -> tuple[Path, str]:
        """(the round's run directory, its key); `masks`: train from the rewind point under them."""
        plan = plan_stage(rounds, name, stage_key({"round": name, **parts}), "final")
        if plan.action == "skip":
            log(f"[lottery] {name}: done, kept")
            return plan.dir, plan.key
        start = init.dir
        sets = ["init_from=null", f"name={name}", *extra]
        if masks is not None:
            start = plan.dir.with_name(f"{plan.dir.name}-start")
            write_start(rewind_dir, masks, start)
            sets.append("method=" + json.dumps({"name": "masked", "options": {}}))
        sets.append(f"model.path={json.dumps(str(start))}")
        round_cfg = validate_recipe(apply_overrides(json.loads(json.dumps(base)), sets), f"{source} round {name}", kind)
        log(f"[lottery] {name}: training {steps} steps from {start.name}")
        plan.begin(role="lottery round")
        run_stage(round_cfg, out=plan.dir, resume=(plan.dir / "config.yaml").is_file(), quiet=quiet)
        plan.finish(role="lottery round")
        return plan.dir, plan.key

    keep = [] if rewind_step is None else [f"train.checkpoint_every={rewind_step}",
                                           f"train.keep_checkpoints={steps // rewind_step + 1}"]
    trained, key = train_round("round-0", {"after": init.key, "extra": keep}, extra=keep)
    rewind_dir = init.dir if rewind_step is None else trained / "checkpoints" / f"step-{rewind_step}"
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
        trained, key = train_round(f"round-{r}", {"after": key, "rewind": lot.rewind, "sparsity": target,
                                                  "scope": cfg.scope, "targets": cfg.targets}, masks)
        summary.append({"round": r, "run": str(trained), "sparsity": target, **final_losses(trained)})
        log(f"[lottery] round {r}: sparsity {target:.1%}, held-out loss "
            + ", ".join(f"{d} {v:.4f}" for d, v in summary[-1]["eval"].items()))
    record: dict = {"name": cfg.name, "method": "imp", "rewind": lot.rewind, "rounds": summary}
    if lot.random_ticket:
        random_run, _ = train_round("random", {"after": key, "rewind": lot.rewind, "seed": cfg.seed},
                                    prune.random_masks_like(masks, cfg.seed))
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
    from tunelab.ops.operation import write_records

    write_records(out, "prune", cfg.name, [
        {"role": "lottery-ticket", "path": str(ticket.resolve()), "weights_sha256": weight_files_sha256(ticket)},
        {"role": "rewind", "path": str(rewind_dir.resolve()), "weights_sha256": weight_files_sha256(rewind_dir)}],
        "prune.json", record, method={"name": "imp", "sparsity": cfg.sparsity, "rounds": lot.rounds,
                                      "rewind": lot.rewind, "scope": cfg.scope})
    log(f"wrote {out} (rounds in {rounds})")
    return out
