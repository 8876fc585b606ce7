"""THE training loop. Read it top to bottom; methods and objectives change it only through their hooks
(methods/base.py: which weights train; objectives/base.py: what the loss is).

One optimizer step = `grad_accum` micro-batches on each of the `world` processes, handed out by a
batch source (train/batches.py). The default source draws the global batch from the mixture in
one deterministic order that does not depend on the number of processes; rank r takes its slice.
That is why a 2-process DDP run reproduces a 1-process run with the same global batch, and why a
resumed run reproduces an uninterrupted one: the data order is a pure function of the batch
source's state, saved in every checkpoint next to the weights, optimizer and every rank's RNG.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train import dist as distmod
from tunelab.train.optim import build_optimizer, carry_optimizer_state
from tunelab.train.precision import autocast_dtype
from tunelab.train.schedules import lr_multiplier


def train(model, method, objective, batches, evaluate, cfg, config_yaml: str, run, d, ctx,
          resume_from: Path | None = None, init_from: Path | None = None, progress=None, log=print) -> dict:
    """Train `model` (already prepared and on ctx.device) with `method` on `batches`, `objective`'s loss.

    `evaluate(model, step) -> {domain: metrics}` runs on rank 0; `config_yaml` goes into checkpoints.
    `resume_from`: a checkpoint of this very run (everything restored). `init_from`: a checkpoint of the
    run this new one continues, whose optimizer state is loaded when the recipe says init_optimizer.
    """
    tc = cfg.train
    aux = {**method.aux_models(), **objective.aux_models()}
    model.train()
    step, tokens = 0, 0
    start_eval: dict = {}  # domain -> the step-0 metrics that deltas are measured from
    if resume_from is not None:
        restored = ckpt.load_checkpoint(resume_from, model, method, rank=d.rank, world=d.world,
                                        base_sha256=ctx.base_sha256, aux_hashes={k: a.sha256 for k, a in aux.items()},
                                        log=log)
        step, tokens = restored.step, restored.state["tokens"]
        batches.load_state_dict(restored.state["data"])
        start_eval = restored.state.get("eval_start", {})
        run.log({"event": "resume", "step": step, "checkpoint": resume_from.name})
        log(f"resumed from {resume_from} at step {step}")

    def build(old_optimizer=None):
        """Optimizer and (DDP, compiled) forward over the current trainable set."""
        named = method.trainable_params(model)
        optimizer = build_optimizer(named, tc) if method.uses_backward else None
        if old_optimizer is not None:  # parameters that stay trainable keep their moments
            carry_optimizer_state(old_optimizer, optimizer)
        # DDP only synchronises gradients: a method without backward (MeZO) reduces what it needs itself.
        ddp_model = distmod.wrap(model, d) if method.uses_backward else model
        return named, optimizer, ddp_model, (torch.compile(ddp_model) if tc.compile else ddp_model)

    # On resume the saved optimizer belongs to the trainable set of the step before the checkpoint: build
    # that one and load it; the loop's own select_trainable(step) then switches as an uninterrupted run did.
    method.select_trainable(model, step - 1 if resume_from is not None and step > 0 else step)
    named, optimizer, ddp_model, forward_model = build()
    if resume_from is not None:
        ckpt.load_optimizer(resume_from, optimizer)
    elif init_from is not None and cfg.init_optimizer and optimizer is not None:  # checked in set-up
        carried = ckpt.carry_optimizer_moments(init_from, optimizer)
        run.log({"event": "init_optimizer", "step": 0, **carried})
        log(f"init_optimizer: moments of {carried['carried']} trainable tensors carried, {carried['fresh']} fresh")
    dtype = autocast_dtype(tc.precision)
    world, accum = d.world, tc.grad_accum

    def check_finite(what: str) -> None:
        # One host sync, only at log and checkpoint steps: a non-finite model is never saved.
        if d.all_reduce_sum(nonfinite.clone()).item() > 0:
            raise TunelabError(f"loss, gradients or weights became non-finite by step {step} ({what} refused): lower "
                               f"train.lr or use train.precision=fp32; checkpoints so far are kept in {run.checkpoints}")

    def save(at_step: int) -> None:
        # An update can overflow the weights even when the step's loss and gradients were finite (a huge lr).
        for _, p in method.trainable_params(model):
            nonfinite.add_((~torch.isfinite(p.detach())).any())
        check_finite(f"checkpoint step-{at_step}")
        rng = d.all_gather_object(ckpt.rng_state())
        if d.main:
            state = {"step": at_step, "tokens": tokens, "data": batches.state_dict(), "world_size": world,
                     "eval_start": start_eval,
                     "method": method.state_dict(), "aux": {k: {"reference": a.reference, "sha256": a.sha256}
                                                            for k, a in aux.items()}}
            ckpt.save_checkpoint(run.checkpoints, at_step, model=model, optimizer=optimizer, method=method,
                                 state=state, config_yaml=config_yaml, rng=rng, keep=tc.keep_checkpoints,
                                 base_sha256=ctx.base_sha256, tokenizer=ctx.tokenizer)
        d.barrier()

    def run_eval(at_step: int, baseline: bool = False) -> dict:
        results = evaluate(model, at_step) if d.main else {}
        if baseline:  # the step-0 evaluation: every later delta is measured from it
            start_eval.update({k: {"loss": v["loss"], "bpb": v.get("bpb")} for k, v in results.items()})
        for domain, r in results.items():
            base = start_eval.get(domain)
            if base is not None:  # > 0 on an old domain is forgetting; < 0 on the new one is the gain
                r["delta_from_start"] = r["loss"] - base["loss"]
                r["bpb_delta_from_start"] = (r["bpb"] - base["bpb"]) if r.get("bpb") and base.get("bpb") else None
            run.log({"event": "eval", "step": at_step, "tokens": tokens, "domain": domain, **r})
        if results:
            log(f"eval step {at_step}: " + "  ".join(f"{k} {v['loss']:.3f}" + (f"/{v['bpb']:.3f}bpb" if v["bpb"] else "")
                                                     for k, v in results.items()))
        return results

    t_last, tokens_last = time.perf_counter(), tokens
    loss_sum = torch.zeros((), device=d.device)
    nonfinite = torch.zeros((), device=d.device)
    grad_norm = None
    if tc.eval_at_start and resume_from is None:  # the baseline: before any step changes the weights
        run_eval(0, baseline=True)
    if progress is not None:
        progress.start(total=tc.max_steps, completed=step)
    while step < tc.max_steps:
        if method.select_trainable(model, step):  # e.g. LISA switched layers: new optimizer groups
            named, optimizer, ddp_model, forward_model = build(optimizer)
        # ---- data: this process's micro-batches of the step's global batch
        micro_batches = batches.next(step)
        counts = [c for _, c in micro_batches]
        if batches.targets_known:
            n_global = sum(counts) * world
        else:  # summed on the device: no host sync
            n_global = d.all_reduce_sum(torch.tensor(sum(counts), dtype=torch.int64, device=d.device))
        on_device = [{k: v.to(d.device, non_blocking=True) for k, v in b.items()} for b, _ in micro_batches]
        lr = tc.lr * lr_multiplier(step, tc.max_steps, tc.schedule)

        if not method.uses_backward:  # zeroth-order methods own the whole update
            loss_sum = method.train_step(forward_model, on_device, step, lr).detach() * sum(counts)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum.zero_()
            for m, batch in enumerate(on_device):
                # Only the last micro-batch synchronises gradients across processes.
                sync = contextlib.nullcontext() if (m == accum - 1 or not d.enabled) else ddp_model.no_sync()
                with sync, torch.autocast(d.device.type, dtype=dtype, enabled=dtype is not None):
                    loss = objective.loss(forward_model, batch)
                    # Weight each micro-batch by its share of the global targets: the mean over the whole
                    # global batch, whatever the split (DDP averages gradients, hence * world).
                    (loss * (counts[m] * world) / n_global).backward()
                loss_sum += loss.detach().float() * counts[m]
            method.after_backward(model, step)
            grad_norm = (torch.nn.utils.clip_grad_norm_([p for _, p in named], tc.grad_clip, foreach=True)
                         if tc.grad_clip else None)
            if grad_norm is not None:
                nonfinite += ~torch.isfinite(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        nonfinite += ~torch.isfinite(loss_sum)
        method.after_step(model, step)
        objective.after_step(model, step)
        step += 1
        tokens += batches.tokens_per_step

        # ---- log (the .item() host syncs happen only here)
        if step % tc.log_every == 0 or step == tc.max_steps:
            check_finite("training")
            loss_value = float(d.all_reduce_sum(loss_sum.clone()).item()) / float(n_global)
            now = time.perf_counter()
            tok_s = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            event = {"event": "train", "step": step, "tokens": tokens, "lr": lr, "loss": loss_value,
                     "tokens_per_s": round(tok_s, 1)}
            if grad_norm is not None:
                event["grad_norm"] = float(grad_norm)
            event.update(objective.metrics())  # e.g. DPO's rewards (a collective: every process calls it)
            if hasattr(batches, "source_tokens"):  # what each source (replay included) actually contributed
                event["source_tokens"] = batches.source_tokens()
            run.log(event)
            if progress is not None:
                progress.update(step, loss=loss_value, tok_s=tok_s)
        paused = False
        if tc.eval_every and step % tc.eval_every == 0 and step != tc.max_steps:
            run_eval(step)
            paused = True
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != tc.max_steps:
            save(step)
            paused = True
        if paused:  # tokens/s measures training only, not the evaluation or checkpoint just done
            t_last, tokens_last = time.perf_counter(), tokens

    if progress is not None:
        progress.stop()
    final_eval = run_eval(step)
    save(step)
    return {"step": step, "tokens": tokens, "eval": final_eval, "model": model}
