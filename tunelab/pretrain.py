"""The `pretrain` stage: recipe -> tokenizer, model, data -> train/loop.py -> runs/<name>/.

Everything here is set-up and bookkeeping; the training itself is in train/loop.py.
Also used for continued pretraining and full/bitfit fine-tuning: only the recipe differs.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tunelab import models
from tunelab.config import RecipeConfig, dump_config
from tunelab.errors import DataError
from tunelab.runs import RunDir, atomic_write, environment, model_lineage, open_run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_cache_dir(explicit: str | None = None) -> Path:
    """data.cache_dir, else $TUNELAB_CACHE, else ~/.cache/tunelab: tokenized data and trained tokenizers."""
    path = explicit or os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_tokenizer(cfg: RecipeConfig, cache: Path, log=print):
    """Load the named tokenizer, the model's own, or train a byte-level BPE on the recipe's data (cached)."""
    from tunelab.data import read_documents, tokenizer_training_texts

    if cfg.tokenizer.path:
        return models.load_tokenizer(cfg.tokenizer.path)
    if cfg.model.path:
        return models.load_tokenizer(cfg.model.path, "model.path")
    tc = cfg.tokenizer
    key = hashlib.sha256(repr(([read_documents(s, cache).content_hash for s in cfg.data.train],
                               tc.vocab_size, tc.min_frequency, tc.train_bytes, 1)).encode()).hexdigest()[:24]
    where = cache / "tokenizers" / key
    if (where / "tokenizer.json").is_file():
        return models.load_tokenizer(str(where))
    log(f"training a byte-level BPE tokenizer (vocab {tc.vocab_size}) on up to {tc.train_bytes / 1e6:.0f} MB")
    tok = models.train_tokenizer(tokenizer_training_texts(cfg.data.train, cache, tc.train_bytes),
                                 tc.vocab_size, tc.min_frequency)
    tmp = where.with_name(f".tmp-{key}-{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(where)
    except OSError:  # another process (DDP rank) saved the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
    return models.load_tokenizer(str(where))


def build_data(cfg: RecipeConfig, tokenizer, cache: Path, log=print):
    from tunelab.data import Mixture, PackedSequences, tokenize_sources
    from tunelab.eval.perplexity import token_byte_lengths
    from tunelab.train.loop import TrainData

    eos = models.eos_id(tokenizer)
    doc_mask = cfg.data.packing == "document"
    sources = tokenize_sources(cfg.data.train, tokenizer, eos, cache, cfg.data.eval_fraction, log=log)
    sets = []
    for src in sources:
        packed = PackedSequences(src.train, cfg.data.seq_len, eos, doc_mask)
        if len(packed) == 0:
            raise DataError(f"{src.spec.source}: only {len(src.train)} training tokens, fewer than one sequence "
                            f"(data.seq_len={cfg.data.seq_len}): add text or lower data.seq_len")
        sets.append(packed)
    # Every source is evaluated on its own held-out split; eval-only sources add domains.
    eval_sources = sources + tokenize_sources([s for s in cfg.data.eval if s.domain not in
                                               {x.domain for x in sources}],
                                              tokenizer, eos, cache, cfg.data.eval_fraction, log=log)
    mask_id = tokenizer.mask_token_id if cfg.train.objective == "mlm" else None
    if cfg.train.objective == "mlm" and mask_id is None:
        raise DataError("train.objective=mlm needs a tokenizer with a mask token: train one (unset tokenizer.path) "
                        "or use a BERT-style tokenizer")
    data = TrainData(sets=sets, mixture=Mixture([len(s) for s in sets], [s.weight for s in cfg.data.train],
                                                cfg.train.seed),
                     eval_tokens={s.domain: s.eval for s in eval_sources},
                     byte_lengths=token_byte_lengths(tokenizer), eos_id=eos, mask_id=mask_id,
                     special_ids=tuple(tokenizer.all_special_ids))
    return data, sources, eval_sources


def _lineage(cfg: RecipeConfig, tokenizer, sources, eval_sources) -> dict:
    def describe(src):
        return {"source": src.spec.source, "domain": src.domain, "weight": src.spec.weight,
                "content_hash": src.content_hash, "cache_key": src.cache_key, "train_tokens": int(len(src.train)),
                "eval_tokens": int(len(src.eval)), "decode_errors": src.decode_errors}

    return {
        "name": cfg.name,
        "kind": cfg.kind,
        "parent": model_lineage(cfg.model),
        "tokenizer": {"source": cfg.tokenizer.path or cfg.model.path or "trained",
                      "fingerprint": models.tokenizer_fingerprint(tokenizer)},
        "data": [describe(s) for s in sources],
        "eval_data": [describe(s) for s in eval_sources if s not in sources],
        "method": cfg.method.model_dump(),
    }


class ProgressBar:
    """rich progress bar with loss, tokens/s and ETA; silent when quiet or not rank 0."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, total: int, completed: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
                            TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=completed, loss=float("nan"), tok_s=0.0)

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tok_s=tok_s)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def pretrain(cfg: RecipeConfig, out: Path | None = None, resume: bool = False, quiet: bool = False) -> Path:
    from tunelab.methods import create_method
    from tunelab.train import checkpoint as ckpt
    from tunelab.train import dist as distmod
    from tunelab.train.loop import train

    d = distmod.init()
    log = (lambda *a: None) if (quiet or not d.main) else print
    if quiet or not d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    out = Path(out) if out else Path("runs") / cfg.name
    run = open_run_dir(out, resume, main=d.main)
    method = create_method(cfg.method.name, cfg.method.options)
    resume_from = ckpt.latest_intact(run.checkpoints, log=log) if resume else None
    if resume and resume_from is None:
        log(f"no intact checkpoint in {run.checkpoints}: starting from step 0")
        if run.metrics.exists():  # steps logged before the crash are superseded by the re-run
            run.log({"event": "resume", "step": 0, "checkpoint": None})
    seed_everything(cfg.train.seed)
    cache = resolve_cache_dir(cfg.data.cache_dir)

    # Rank 0 trains the tokenizer and fills the token cache; the other ranks then read the cache.
    if d.main:
        tokenizer = resolve_tokenizer(cfg, cache, log)
    d.barrier()
    if not d.main:
        tokenizer = resolve_tokenizer(cfg, cache, log)
    model = (models.load_model(cfg.model.path, cfg.model.attn_implementation) if cfg.model.path else
             models.build_model(cfg.model.preset, tokenizer, cfg.model.overrides, cfg.model.attn_implementation))
    models.check_pair(model, tokenizer, cfg.data.seq_len)
    models.check_objective(model, cfg.train.objective)
    if d.main:
        data, sources, eval_sources = build_data(cfg, tokenizer, cache, log)
    d.barrier()
    if not d.main:
        data, sources, eval_sources = build_data(cfg, tokenizer, cache, log)

    if d.main:
        atomic_write(run.config, dump_config(cfg))
        run.write_json("env.json", environment())
        run.write_json("lineage.json", _lineage(cfg, tokenizer, sources, eval_sources))
    log(f"model: {models.count_params(model):,} parameters; run directory: {run.path}")
    progress = ProgressBar(enabled=d.main and not quiet)
    try:
        result = train(model, tokenizer, method, data, cfg, run, d, resume_from=resume_from, progress=progress, log=log)
    finally:
        progress.stop()
    if d.main:
        save_final(method, result["model"], tokenizer, run)
    d.barrier()
    distmod.shutdown(d)
    log(f"done: {run.path} (final model in {run.final})")
    return run.path


def save_final(method, model, tokenizer, run: RunDir) -> None:
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
