"""The training stages (`pretrain`, `finetune`): the shared set-up, a method, and the one loop.

    recipe -> processes + run dir -> tokenizer -> model -> data -> method.prepare -> train/loop.py -> final/

The two kinds run the same code; their recipes differ in what they require (config.py).
Everything here is set-up and bookkeeping (stages/setup.py); the training is in train/loop.py.
"""

from __future__ import annotations

from pathlib import Path

from tunelab import models
from tunelab.config import dump_config
from tunelab.stages import setup


def run_training(cfg, out: Path | None = None, resume: bool = False, quiet: bool = False) -> Path:
    from tunelab.methods import create_method
    from tunelab.methods.base import MethodContext
    from tunelab.train import dist as distmod
    from tunelab.train.loop import train
    from tunelab.train.progress import ProgressBar

    method = create_method(cfg.method.name, cfg.method.options)
    stage = setup.open_stage(cfg, out, resume, quiet)
    d, run, log = stage.d, stage.run, stage.log
    setup.seed_everything(cfg.train.seed)  # the same initial weights on every process
    tokenizer = stage.rank0_first(lambda: setup.resolve_tokenizer(cfg, stage.cache, log))
    model = setup.initial_model(cfg, tokenizer)
    data = stage.rank0_first(lambda: setup.build_data(cfg, tokenizer, stage.cache, log))

    ctx = MethodContext(device=d.device, dist=d, recipe=cfg, tokenizer=tokenizer, max_steps=cfg.train.max_steps,
                        seed=cfg.train.seed, run_path=run.path, log=log, base_sha256=models.weights_sha256(model))
    model = method.prepare(model, ctx).to(d.device)
    for aux in method.aux_models().values():  # a teacher or reference: on our device, frozen, in eval mode
        aux.module.to(d.device).eval().requires_grad_(False)
    setup.seed_everything(setup.rank_seed(cfg.train.seed, d.rank))  # dropout streams differ per process
    batches = method.batch_source(setup.packed_batches(cfg, data, tokenizer, d), ctx)
    setup.write_records(stage, cfg, setup.lineage(cfg, tokenizer, data, ctx.base_sha256))
    trainable = sum(p.numel() for _, p in method.trainable_params(model))
    log(f"model: {models.count_params(model):,} parameters, {trainable:,} trainable ({method.name}); "
        f"run directory: {run.path}")

    progress = ProgressBar(enabled=d.main and not quiet)
    try:
        result = train(model, method, batches, setup.evaluator(cfg, data, tokenizer, d.device), cfg,
                       dump_config(cfg), run, d, ctx, resume_from=stage.resume_from, progress=progress, log=log)
    finally:
        progress.stop()
    if d.main:
        setup.save_final(method, result["model"], tokenizer, run)
    d.barrier()
    distmod.shutdown(d)
    log(f"done: {run.path} (final {'adapter' if models.is_adapter_dir(run.final) else 'model'} in {run.final})")
    return run.path
