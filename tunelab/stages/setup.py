"""The set-up every training stage shares: processes, run directory, recipe checks on resume,
precision, tokenizer, model, data, evaluation, lineage, and the final save.

A training stage (stages/train.py) is these steps in order plus the loop; a later stage kind
(distill, prune with recovery training, ...) reuses them instead of copying them. The data a
training stage reads and scores (sources, replay, roles, batches, evaluation) is set up in
stages/training_data.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import yaml

from tunelab import models, tokenizers
from tunelab.config import dump_config
from tunelab.errors import RunDirError
from tunelab.objectives import objective_class
from tunelab.lineage import make as make_lineage, write as write_lineage
from tunelab.paths import resolve_cache_dir
from tunelab.runs import RunDir, atomic_write, environment, model_lineage, open_run_dir
from tunelab.train import dist as distmod

if TYPE_CHECKING:  # training_data.py builds on this module
    from tunelab.stages.training_data import TrainingData

# Recipe keys a resumed run may change: they alter bookkeeping, not what the next step computes.
# train.max_steps is here because extending a run is the common reason to resume with a new recipe;
# the LR schedule after the checkpoint then follows the new length (said in the log).
SAFE_ON_RESUME = ("name", "train.max_steps", "train.log_every", "train.eval_every", "train.eval_max_tokens",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.gradient_checkpointing",
                  "train.loss_chunk_tokens", "train.release_freed_memory",
                  "data.eval", "data.cache_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process behaves as before); other ranks get independent
    streams, so dropout differs across ranks instead of repeating the same mask on every one."""
    from tunelab.train.objectives import sequence_seed

    return seed if rank == 0 else sequence_seed(seed, rank) % 2**32


# ---------------------------------------------------------------- processes, run directory, resume


@dataclass
class Init:
    """What a run starts from. `model_dir`: the weights (None: a fresh preset). `checkpoint`: the checkpoint
    whose optimizer / data state `init_optimizer` / `init_data_state` carry over. `run`: the run they belong to."""
    model_dir: Path | None = None
    checkpoint: Path | None = None
    run: Path | None = None

    @property
    def trained(self) -> bool:
        return self.model_dir is not None


def resolve_init(cfg) -> Init:
    """model.path (a model directory) or init_from (a tunelab run, or one of its checkpoints/step-N)."""
    from tunelab.errors import ConfigError
    from tunelab.train import checkpoint as ckpt

    if cfg.init_from is None:
        return Init(model_dir=Path(cfg.model.path) if cfg.model.path else None)
    where = Path(cfg.init_from).expanduser()
    if not where.exists():
        raise ConfigError(f"init_from: {where} does not exist: give a tunelab run directory or one of its "
                          "checkpoints/step-N (for a plain model directory use model.path)")
    if where.name == "final" and (where.parent / "config.yaml").is_file():  # a run's final/ (`${stage}` in pipelines)
        where = where.parent
    if (where / "state.json").is_file():  # a checkpoint
        problem = ckpt.verify(where)
        if problem:
            raise RunDirError(f"init_from: {where} is not an intact checkpoint ({problem}): pick another step")
        checkpoint, run, model_dir = where, where.parent.parent, where
    elif (where / "config.yaml").is_file():  # a run: its final model, optimizer/data state from its newest checkpoint
        checkpoint, run = ckpt.latest_intact(where / "checkpoints", log=lambda *a: None), where
        model_dir = where / "final" if (where / "final").is_dir() else checkpoint
        if model_dir is None:
            raise RunDirError(f"init_from: {where} has neither final/ nor an intact checkpoint: finish it "
                              "(tunelab pretrain ... --resume) or point at a checkpoint")
    else:
        raise ConfigError(f"init_from: {where} is not a tunelab run (no config.yaml) or checkpoint (no state.json); "
                          "for a plain model directory use model.path")
    if checkpoint is not None and model_dir == checkpoint and (checkpoint / "adapter.safetensors").is_file():
        raise ConfigError(f"init_from: {checkpoint} holds an adapter (no full weights): start from the run's final/ "
                          f"with model.path, or merge it first (tunelab export {run} --merge --out DIR)")
    if checkpoint is not None and model_dir == checkpoint and not (checkpoint / "config.json").is_file():
        raise ConfigError(f"init_from: {checkpoint} was written before checkpoints held config.json: start from "
                          f"{run / 'final'} with model.path")
    if (cfg.init_optimizer or cfg.init_data_state) and checkpoint is None:
        raise RunDirError(f"init_from: {where} has no intact checkpoint to carry the optimizer/data state from: "
                          "set init_optimizer/init_data_state to false")
    if cfg.init_optimizer and not (checkpoint / "optimizer.pt").is_file():
        raise RunDirError(f"init_optimizer: {checkpoint} has no optimizer.pt (its method has no optimizer): set "
                          "init_optimizer: false")
    return Init(model_dir=model_dir, checkpoint=checkpoint, run=run)


def describe_init(cfg, init: Init) -> dict:
    """What a new run carries over from the one it continues, and what starts afresh (logged and printed)."""
    if not init.trained:
        return {"from": None, "carried": [], "reset": ["weights (a fresh preset)"]}
    carried, reset = ["weights"], ["step counter", "LR schedule (its own warmup/decay from step 0)"]
    (carried if cfg.init_optimizer else reset).append("optimizer moments")
    (carried if cfg.init_data_state else reset).append("data position")
    step = json.loads((init.checkpoint / "state.json").read_text()).get("step") if init.checkpoint else None
    return {"from": str(init.model_dir), "run": str(init.run) if init.run else None,
            "checkpoint": str(init.checkpoint) if init.checkpoint else None, "checkpoint_step": step,
            "carried": carried, "reset": reset}


def carry_init_state(cfg, init: Init, model, method, batches) -> None:
    """init_data_state: continue the checkpoint's data stream; init_optimizer: check now that its optimizer
    state fits this run's trainable parameters (the loop loads it into the real optimizer). Both fail
    before the run directory gets any record, so the fix the error names can reuse the same --out."""
    from tunelab.train import checkpoint as ckpt
    from tunelab.train.optim import build_optimizer

    if cfg.init_data_state:
        ckpt.load_data_state(init.checkpoint, batches)
    if cfg.init_optimizer and method.uses_backward:
        # Mapped, not read: the check looks at names and shapes; the loop reads the moments once.
        ckpt.carry_optimizer_moments(init.checkpoint, build_optimizer(method.trainable_params(model), cfg.train),
                                     mmap=True)


@dataclass
class Stage:
    """A training stage's processes and run directory, opened before any heavy work."""
    cfg: object
    d: distmod.Dist
    run: RunDir
    log: Callable
    cache: Path
    resume_from: Path | None
    resuming: bool
    precision_reason: str = ""
    init: Init = field(default_factory=Init)

    def rank0_first(self, work: Callable):
        """Rank 0 does `work` (training a tokenizer, filling the token cache); the others then
        repeat it and find the cache filled."""
        if self.d.main:
            result = work()
        self.d.barrier()
        if not self.d.main:
            result = work()
        return result


def open_stage(cfg, out: Path | None, resume: bool, quiet: bool) -> Stage:
    """Processes and run directory. `Stage.cfg` is a copy of the recipe with train.eval_at_start and
    train.precision resolved (config.yaml holds the answers); the caller's recipe is left as given."""
    from tunelab.train import checkpoint as ckpt
    from tunelab.train.precision import resolve_precision

    init = resolve_init(cfg)
    if not init.trained:  # a mistyped preset override fails now, not after the tokenizer is trained
        models.check_preset(cfg.model.preset, cfg.model.overrides)
    eval_at_start = init.trained if cfg.train.eval_at_start is None else cfg.train.eval_at_start
    d = distmod.init()
    log = (lambda *a: None) if (quiet or not d.main) else print
    if quiet or not d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    run = open_run_dir(Path(out) if out else Path("runs") / cfg.name, resume, main=d.main)
    saved = yaml.safe_load(run.config.read_text()) if resume and run.config.is_file() else None
    if saved is not None and cfg.train.precision == "auto":  # a resumed run keeps the precision it chose
        precision, reason = saved["train"]["precision"], "as the run being resumed"
    else:
        precision, reason = resolve_precision(cfg.train.precision, d.device, log)
    # Resolved before the resume check, which compares them with config.yaml's.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"eval_at_start": eval_at_start, "precision": precision}, deep=True)}, deep=True)
    if saved is not None:
        check_resume_config(run, saved, cfg, log)
    # Rank 0 alone inspects (and may repair) the checkpoints; every rank resumes from its choice.
    resume_from = ckpt.latest_intact(run.checkpoints, log=log) if (resume and d.main) else None
    resume_from = d.broadcast_object(resume_from)
    if resume and resume_from is None:
        log(f"no intact checkpoint in {run.checkpoints}: starting from step 0")
        if run.metrics.exists():  # steps logged before the crash are superseded by the re-run
            run.log({"event": "resume", "step": 0, "checkpoint": None})
    log(f"precision: {cfg.train.precision} ({reason})")
    return Stage(cfg=cfg, d=d, run=run, log=log, cache=resolve_cache_dir(cfg.data.cache_dir),
                 resume_from=resume_from, resuming=saved is not None, precision_reason=reason, init=init)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_resume_config(run: RunDir, saved: dict, cfg, log) -> None:
    """Refuse to resume a run with a recipe that changes what it computes; allow (and record) safe changes."""
    now = yaml.safe_load(dump_config(cfg))
    old, new = _flatten(saved), _flatten(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    safe = lambda k: any(k == s or k.startswith(s + ".") for s in SAFE_ON_RESUME)  # noqa: E731
    unsafe = [k for k in changed if not safe(k)]
    if unsafe:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe[:4])
        more = f" (+{len(unsafe) - 4} more)" if len(unsafe) > 4 else ""
        raise RunDirError(f"{run.config}: the recipe changed since this run started ({shown}{more}); resume with "
                          f"the run's own recipe, or start a new run with --out DIR (safe to change on resume: "
                          f"{', '.join(SAFE_ON_RESUME)})")
    if changed:
        log("resuming with changed settings: " + "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
        run.log({"event": "config_change", "changes": {k: [old.get(k), new.get(k)] for k in changed}})
        if run.main:
            atomic_write(run.config, dump_config(cfg))


# ---------------------------------------------------------------- tokenizer and model


def resolve_tokenizer(cfg, cache: Path, log=print, init: Init | None = None):
    """Load the named tokenizer, the model's own, or train a byte-level BPE on the recipe's data (cached)."""
    from tunelab.data import source_content_hash, tokenizer_training_texts

    init = init or resolve_init(cfg)
    if cfg.tokenizer.path:
        return tokenizers.load_tokenizer(cfg.tokenizer.path)
    if init.trained:
        return tokenizers.load_tokenizer(str(init.model_dir), "init_from" if cfg.init_from else "model.path")
    tc = cfg.tokenizer
    key = hashlib.sha256(repr(([source_content_hash(s, cache, log=log) for s in cfg.data.train],
                               tc.vocab_size, tc.min_frequency, tc.train_bytes, 1)).encode()).hexdigest()[:24]
    return tokenizers.cached_tokenizer(cache / "tokenizers" / key,
                                       lambda: tokenizer_training_texts(cfg.data.train, cache, tc.train_bytes),
                                       tc.vocab_size, tc.min_frequency, log, f" on up to {tc.train_bytes / 1e6:.1f} MB")


def initial_model(cfg, tokenizer, init: Init | None = None, log=print):
    """The model training starts from: a saved model (model.path / init_from) or a fresh preset, checked
    against the tokenizer, the sequence length and the objective."""
    init = init or resolve_init(cfg)
    field_name = "init_from" if cfg.init_from else "model.path"
    # merge=True: training continues from an adapter's merged weights, never through a peft wrapper.
    model = (models.load_model(str(init.model_dir), cfg.model.attn_implementation, field_name, merge=True, log=log)
             if init.trained else
             models.build_model(cfg.model.preset, tokenizer, cfg.model.overrides, cfg.model.attn_implementation))
    models.check_pair(model, tokenizer, cfg.data.seq_len)
    models.check_objective(model, objective_class(cfg.objective.name))
    return model


# ---------------------------------------------------------------- records and the final save


def lineage(cfg, tokenizer, data: TrainingData, base_sha256: str | None, init: Init | None = None) -> dict:
    """Where the run came from: its parents (each with a role and a hash), tokenizer, data, method, objective."""
    init = init or resolve_init(cfg)

    def describe(src):
        return {"source": src.spec.source, "domain": src.domain, "weight": src.spec.weight,
                "content_hash": src.content_hash, "cache_key": src.cache_key, "train_tokens": int(len(src.train)),
                "eval_tokens": int(len(src.eval)), "decode_errors": src.decode_errors,
                "spec": src.spec.model_dump(exclude_defaults=True)}

    def trained(src, role):  # the held-out fraction is part of what was trained on (see runs.trained_sources)
        return {**describe(src), "role": role, "eval_fraction": data.fractions.get(src.domain, cfg.data.eval_fraction)}

    parent = {"role": "init", **model_lineage(cfg.model, init.model_dir), "weights_sha256_in_memory": base_sha256}
    if init.checkpoint is not None:  # init_from: the state carried over came from this checkpoint
        parent.update(describe_init(cfg, init))
    return make_lineage(
        cfg.kind, cfg.name, [parent],
        tokenizer={"source": cfg.tokenizer.path or (str(init.model_dir) if init.trained else "trained"),
                   "fingerprint": tokenizers.tokenizer_fingerprint(tokenizer)},
        data=[trained(s, "train") for s in data.sources] + [trained(s, "replay") for s in data.replay_sources],
        eval_data=[describe(s) for s in data.eval_sources],
        method=cfg.method.model_dump(), objective=cfg.objective.model_dump())


def write_records(stage: Stage, cfg, lineage_record: dict) -> None:
    """config.yaml, env.json and lineage.json of a new run; a resumed run keeps the ones it started with."""
    if not stage.d.main or stage.resuming:
        return
    atomic_write(stage.run.config, dump_config(cfg))
    stage.run.write_json("env.json", {**environment(), "precision": {"used": cfg.train.precision,
                                                                      "why": stage.precision_reason}})
    write_lineage(stage.run.path, lineage_record)


def save_final(method, model, tokenizer, run: RunDir) -> None:
    """final/ via the method (a full HF model, or an adapter), swapped in atomically."""
    tmp = run.path / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method.save_final(model, tokenizer, tmp)
    if run.final.exists():
        old = run.path / f".final-old-{os.getpid()}"
        run.final.rename(old)
        tmp.rename(run.final)
        shutil.rmtree(old)
    else:
        tmp.rename(run.final)
