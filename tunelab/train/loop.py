"""THE training loop. Read it top to bottom; methods change it only through methods/base.py hooks.

One optimizer step = `grad_accum` micro-batches of `micro_batch_size` sequences on each of the
`world` processes. The global batch is drawn from the mixture in one deterministic order that
does not depend on the number of processes; rank r takes its slice of it. That is why a
2-process DDP run reproduces a 1-process run with the same global batch, and why a resumed run
reproduces an uninterrupted one: the data order is a pure function of the mixture state, which
is saved in every checkpoint next to the weights, optimizer and RNG states.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config import RecipeConfig, dump_config
from tunelab.data import Mixture, PackedSequences, collate
from tunelab.errors import TunelabError
from tunelab.eval.perplexity import evaluate_tokens
from tunelab.runs import RunDir
from tunelab.train import checkpoint as ckpt
from tunelab.train import dist as distmod
from tunelab.train.objectives import add_labels, fixed_mlm_labeler
from tunelab.train.optim import build_optimizer
from tunelab.train.schedules import lr_multiplier


@dataclass
class TrainData:
    sets: list[PackedSequences]  # one per training source
    mixture: Mixture
    eval_tokens: dict[str, np.ndarray]  # domain -> held-out tokens
    byte_lengths: np.ndarray | None  # bytes per token id, for bits per byte
    eos_id: int
    mask_id: int | None = None  # MLM only
    special_ids: tuple[int, ...] = ()


def train(model, tokenizer, method, data: TrainData, cfg: RecipeConfig, run: RunDir, d: distmod.Dist,
          resume_from: Path | None = None, progress=None, log=print) -> dict:
    tc = cfg.train
    model = method.prepare(model).to(d.device)
    model.train()
    named = method.trainable_params(model)
    optimizer = build_optimizer(named, tc) if method.uses_backward else None
    step, tokens = 0, 0
    if resume_from is not None:
        restored = ckpt.load_checkpoint(resume_from, model, optimizer)
        step, tokens = restored.step, restored.state["tokens"]
        data.mixture.load_state_dict(restored.state["data"])
        method.load_state_dict(restored.state["method"])
        run.log({"event": "resume", "step": step, "checkpoint": resume_from.name})
        log(f"resumed from {resume_from} at step {step}")

    ddp_model = distmod.wrap(model, d)
    forward_model = torch.compile(ddp_model) if tc.compile else ddp_model
    autocast_dtype = torch.bfloat16 if tc.precision == "bf16" else None
    micro, accum, world = tc.micro_batch_size, tc.grad_accum, d.world
    global_batch = micro * accum * world
    seq_len = cfg.data.seq_len
    config_yaml = dump_config(cfg)

    def make_batch(pairs, step_idx: int, micro_idx: int) -> tuple[dict[str, torch.Tensor], int]:
        batch = collate([data.sets[s][i] for s, i in pairs])
        # MLM masks depend only on (seed, step, position in the global batch): resumable without saved
        # RNG state, and the same whatever the number of processes.
        gen = torch.Generator().manual_seed(hash((tc.seed, step_idx, micro_idx * world + d.rank)) & 0x7FFFFFFF)
        batch = add_labels(batch, tc.objective, mask_id=data.mask_id, mlm_probability=tc.mlm_probability,
                           vocab_size=len(tokenizer), special_ids=list(data.special_ids), generator=gen)
        # Count targets while the batch is still on the CPU: counting on a GPU would sync the host.
        labels = batch["labels"][:, 1:] if tc.objective == "clm" else batch["labels"]
        return {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}, int((labels != -100).sum())

    def run_eval(at_step: int) -> dict:
        if not d.main:
            return {}
        results = {}
        for domain, tokens_ in data.eval_tokens.items():
            results[domain] = evaluate_tokens(
                model, tokens_, seq_len, eos_id=data.eos_id, document_mask=cfg.data.packing == "document",
                byte_lengths=data.byte_lengths, max_tokens=tc.eval_max_tokens, batch_size=micro,
                device=d.device, autocast_dtype=autocast_dtype, objective=tc.objective,
                label_fn=None if tc.objective == "clm" else
                fixed_mlm_labeler(data.mask_id, len(tokenizer), list(data.special_ids), tc.mlm_probability))
            run.log({"event": "eval", "step": at_step, "tokens": tokens, "domain": domain, **results[domain]})
        summary = "  ".join(f"{k} {v['loss']:.3f}" + (f"/{v['bpb']:.3f}bpb" if v["bpb"] else "")
                            for k, v in results.items())
        log(f"eval step {at_step}: {summary}")
        return results

    def save(at_step: int) -> None:
        if d.main:
            state = {"step": at_step, "tokens": tokens, "data": data.mixture.state_dict(),
                     "method": method.state_dict(), "world_size": world}
            ckpt.save_checkpoint(run.checkpoints, at_step, model, optimizer, state, config_yaml,
                                 keep=tc.keep_checkpoints)
        d.barrier()

    t_last, tokens_last = time.perf_counter(), tokens
    loss_sum = torch.zeros((), device=d.device)
    if progress is not None:
        progress.start(total=tc.max_steps, completed=step)
    while step < tc.max_steps:
        # ---- data: this step's global batch, this rank's micro-batches of it
        pairs = data.mixture.take(global_batch)
        batches, counts = zip(*[make_batch(pairs[(m * world + d.rank) * micro:(m * world + d.rank + 1) * micro],
                                           step, m) for m in range(accum)])
        n_global = int(d.all_reduce_sum(torch.tensor(float(sum(counts)))).item())
        lr = tc.lr * lr_multiplier(step, tc.max_steps, tc.schedule)

        if not method.uses_backward:  # zeroth-order methods own the whole update
            loss_sum = method.train_step(forward_model, batches, step, lr).detach() * sum(counts)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum.zero_()
            for m, batch in enumerate(batches):
                # Only the last micro-batch synchronises gradients across processes.
                sync = contextlib.nullcontext() if (m == accum - 1 or not d.enabled) else ddp_model.no_sync()
                with sync, torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = method.loss(forward_model, batch)
                    # Weight each micro-batch by its share of the global targets: the mean over the whole
                    # global batch, whatever the split (DDP averages gradients, hence * world).
                    (loss * (counts[m] * world / n_global)).backward()
                loss_sum += loss.detach() * counts[m]
            method.after_backward(model, step)
            grad_norm = (torch.nn.utils.clip_grad_norm_([p for _, p in named], tc.grad_clip, foreach=True)
                         if tc.grad_clip else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        method.after_step(model, step)
        step += 1
        tokens += global_batch * seq_len

        # ---- log (the .item() host sync happens only here)
        if step % tc.log_every == 0 or step == tc.max_steps:
            loss_value = float(d.all_reduce_sum(loss_sum.clone()).item()) / n_global
            if not math.isfinite(loss_value):
                raise TunelabError(f"loss became {loss_value} at step {step}: lower train.lr or use "
                                   f"train.precision=fp32; checkpoints so far are kept in {run.checkpoints}")
            now = time.perf_counter()
            tok_s = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            event = {"event": "train", "step": step, "tokens": tokens, "lr": lr, "loss": loss_value,
                     "tokens_per_s": round(tok_s, 1)}
            if method.uses_backward and grad_norm is not None:
                event["grad_norm"] = float(grad_norm)
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
