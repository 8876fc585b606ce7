"""The training stages (`pretrain`, `finetune`): the shared set-up, a method x an objective, and the one loop.

    recipe -> processes + run dir -> tokenizer -> model -> data -> method.prepare -> objective.prepare
           -> train/loop.py -> final/

The two kinds run the same code; their recipes differ in what they require (config.py).
Everything here is set-up and bookkeeping (stages/setup.py); the training is in train/loop.py.
"""

from __future__ import annotations

from pathlib import Path

from tunelab import models
from tunelab.config import dump_config
from tunelab.stages import setup, training_data


def run_training(cfg, out: Path | None = None, resume: bool = False, quiet: bool = False) -> Path:
    from tunelab.methods import create_method
    from tunelab.methods.base import MethodContext
    from tunelab.objectives import create_objective
    from tunelab.train import dist as distmod
    from tunelab.train.host_memory import release_freed_memory
    from tunelab.train.loop import train
    from tunelab.train.progress import ProgressBar
    from tunelab.train.schedules import describe as describe_schedule
    from tunelab.train.schedules import warning as schedule_warning

    method = create_method(cfg.method.name, cfg.method.options)
    objective = create_objective(cfg.objective.name, cfg.objective.options)
    objective.loss_chunk_tokens = cfg.train.loss_chunk_tokens  # before prepare: a calibration pass (sparse) chunks too
    stage = setup.open_stage(cfg, out, resume, quiet)
    cfg = stage.cfg  # the recipe with precision and eval_at_start resolved: what is recorded and trained
    d, run, log = stage.d, stage.run, stage.log
    if cfg.train.release_freed_memory and not release_freed_memory():  # before the model's memory is allocated
        log("train.release_freed_memory: the C library is not glibc (no mallopt): memory is managed as usual")
    setup.seed_everything(cfg.train.seed)  # the same initial weights on every process
    init = stage.init
    tokenizer = stage.rank0_first(lambda: setup.resolve_tokenizer(cfg, stage.cache, log, init))
    model = setup.initial_model(cfg, tokenizer, init, log)
    data = stage.rank0_first(lambda: training_data.build_data(cfg, tokenizer, stage.cache, log, init))

    ctx = MethodContext(device=d.device, dist=d, recipe=cfg, tokenizer=tokenizer, max_steps=cfg.train.max_steps,
                        seed=cfg.train.seed, run_path=run.path, log=log, base_sha256=models.weights_sha256(model),
                        model_dir=init.model_dir, objective=objective)
    if init.model_dir and (Path(init.model_dir) / "masks.safetensors").is_file() and cfg.method.name != "masked":
        log(f"warning: {init.model_dir} is pruned (masks.safetensors) and method {cfg.method.name} does not keep "
            "its pruned weights at 0; use method: masked to keep the sparsity")
    if cfg.train.gradient_checkpointing:  # on the base model, before a method wraps it (peft)
        models.enable_gradient_checkpointing(model)
    model = method.prepare(model, ctx).to(d.device)
    objective.prepare(model, ctx)
    if cfg.train.loss_chunk_tokens is not None:  # refused here if the chunks would not give the model's own loss
        from tunelab.train.chunked_loss import check_reproduces_model_loss

        check_reproduces_model_loss(model, len(tokenizer), cfg.train.loss_chunk_tokens, d.device)
    # A teacher or reference: on our device, frozen, in eval mode.
    for aux in {**method.aux_models(), **objective.aux_models()}.values():
        aux.module.to(d.device).eval().requires_grad_(False)
    setup.seed_everything(setup.rank_seed(cfg.train.seed, d.rank))  # dropout streams differ per process
    batches = training_data.packed_batches(cfg, data, tokenizer, d, objective)
    batches = method.batch_source(objective.batch_source(batches, ctx), ctx)
    if stage.resume_from is None and init.checkpoint is not None:  # refused here, before any record is written
        setup.carry_init_state(cfg, init, model, method, batches)
    setup.write_records(stage, cfg, setup.lineage(cfg, tokenizer, data, ctx.base_sha256, init))
    if init.trained and not stage.resuming:  # say what a continued run carries over and what starts afresh
        carried = setup.describe_init(cfg, init)
        run.log({"event": "init", **carried})
        log(f"continuing from {carried['from']}: carried over {', '.join(carried['carried'])}; "
            f"reset {', '.join(carried['reset'])}")
    log(f"LR schedule: {describe_schedule(cfg.train.schedule, cfg.train.max_steps)}")
    if schedule_warning(cfg.train.schedule, cfg.train.max_steps):
        log(schedule_warning(cfg.train.schedule, cfg.train.max_steps))
    if data.replay_sources:
        log(f"replay: {cfg.data.replay.fraction:.1%} of every global batch from "
            + ", ".join(s.domain for s in data.replay_sources))
    roles = data.roles
    evaluate_domains = training_data.evaluator(cfg, data, tokenizer, d.device, objective)
    def evaluate(model, step):  # each domain tagged target (trained on now) or reference (old data)
        return {k: {**v, "role": roles.get(k, "reference")} for k, v in evaluate_domains(model, step).items()}
    trainable = sum(p.numel() for _, p in method.trainable_params(model))
    log(f"model: {models.count_params(model):,} parameters, {trainable:,} trainable ({method.name}, objective "
        f"{objective.name}); "
        f"run directory: {run.path}")
    if not stage.resuming:  # for reports: the sizes, and (its time) when the loop started
        run.log({"event": "model", "parameters": models.count_params(model), "trainable": trainable,
                 "method": method.name, "objective": objective.name})

    progress = ProgressBar(enabled=d.main and not quiet)
    try:
        result = train(model, method, objective, batches, evaluate, cfg, dump_config(cfg), run, d, ctx,
                       resume_from=stage.resume_from, init_from=init.checkpoint,
                       progress=progress, log=log)
    finally:
        progress.stop()
    if d.main:
        setup.save_final(method, result["model"], tokenizer, run)
    d.barrier()
    distmod.shutdown(d)
    log(f"done: {run.path} (final {'adapter' if models.is_adapter_dir(run.final) else 'model'} in {run.final})")
    return run.path
