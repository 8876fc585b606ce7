"""Peak RSS and training tokens/s of the fine-tuning methods (full, LoRA, LISA, MeZO, sparse) at ~200M parameters,
the size at which their memory savings show, and LoRA against peft + HF `Trainer` in the same run.

    python benchmarks/bench_methods.py                 # full run (~45 min on 2 quiet cores), rewrites its RESULTS.md section
    python benchmarks/bench_methods.py --quick         # smoke check: the 10M model only, 4 steps, prints only
    python benchmarks/bench_methods.py --sizes 200M --only lora,peft     # a subset (prints only, unless --write)

What runs:
- models: Llama-shaped configs (`LlamaForCausalLM`, tied embeddings as tunelab's presets, head_dim 64, SiLU MLP of
  ~2.75x hidden) of ~10M, ~40M, ~100M and ~200M parameters with a 32,000-token byte-level BPE trained by
  `tunelab.tokenizers.train_tokenizer` on `builtin:code`; each built once from seed 0 and saved as an HF model dir
  (+ tokenizer) under benchmarks/out/methods/models/, given to every run as `model.path`. The weights are random:
  what is measured (memory, speed) does not depend on them.
- tunelab: every configuration runs the real `finetune` stage (`tunelab.stages.run_stage`) on a recipe built here
  (see `recipe_dict`): `builtin:code`, seq_len 256, micro batch 4 (1,024 tokens/step), fp32, AdamW (fused), weight
  decay 0, constant LR, no step-0 eval, `eval_every: 0` and `checkpoint_every: 0` -- which in tunelab still means
  one evaluation (capped at 1,024 tokens here) and one checkpoint at the end of the run, then final/. Methods and
  options: full; lora r 8, alpha 16, all linear layers (as recipes/lora-code.yaml); lisa gamma 1, interval 20 (as
  lisa-code.yaml: one draw for this short run); mezo eps 1e-3 (two forward passes per step, no backward);
  sparse density 0.01 chosen by gradient magnitude over 1 calibration batch (the option's default is 4: fewer
  extra forward+backward passes before step 1; the memory of one is the same); full+gc and lora+gc: full and LoRA with
  `train.gradient_checkpointing: true` (at the largest size), the lever for activation memory; full+gc+chunk and
  lora+gc+chunk: also `train.loss_chunk_tokens: 256`, the lever for the head's logits.
- peer: peft's `get_peft_model` with the same LoraConfig (r 8, alpha 16, dropout 0, "all-linear", CAUSAL_LM) on the
  same model dir loaded by `AutoModelForCausalLM.from_pretrained` (fp32, sdpa), trained by `transformers.Trainer`
  on the very token windows tunelab's loop draws, in the same order (tunelab's token cache and batch source), same
  batch, fp32, AdamW (Trainer's default, fused torch AdamW) with the same lr/betas/eps/weight decay/clip, constant
  LR, no eval, no saving.

Every configuration runs twice, with two glibc malloc settings (`--malloc`): `default`, and `fixed`
(GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576: glibc's dynamic mmap threshold off, so freed activations go
back to the OS and RSS follows the live tensors; it costs speed). A third mode, `release` (`--malloc
default,release`), sets the same threshold through tunelab's own `train.release_freed_memory: true` (the peer runs
as in `default`). The largest model also runs full/LoRA/MeZO with micro batch 1 (a quarter of the activations).

How it is measured:
- every configuration is a fresh subprocess, one after the other; before each, the script waits for a quiet
  machine and it measures other processes' CPU share during the timed steps (shared 2-core machine: see
  bench_throughput.py, whose helpers it uses); a disturbed configuration is rerun once.
- peak RSS: the child's VmHWM (/proc/self/status), which the child resets (/proc/self/clear_refs) at every phase
  boundary of the stage (imports, model load, data, base-weights hash, method set-up, training steps, final
  evaluation, final checkpoint, final save); the whole-process peak is the largest phase peak, and the phase that
  holds it says what set it. At the final checkpoint the child also records the sizes of the weights, the
  trainable weights and the optimizer state (the tensors themselves, not RSS).
- tokens/s: trained tokens / wall time over the timed steps (the first --warmup steps excluded); tunelab: from the
  per-step `tokens_per_s` of metrics.jsonl (`train.log_every: 1`; a step is everything the loop does per step),
  the peer: a TrainerCallback timestamps every `on_step_end`. A MeZO step is two forward passes (no backward).

Outputs and caches live in benchmarks/out/ (git-ignored: methods/ for models and runs, cache/ for the tokenizer's
token cache, shared with the other benchmarks); everything runs offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_throughput as bt  # noqa: E402  (the shared-machine helpers: quiet waits, other load, machine info)

RESULT_MARK = "BENCH_RESULT "
START, END = "<!-- methods:start -->", "<!-- methods:end -->"
MB = 1 << 20

VOCAB = 32000
# name -> LlamaConfig fields (head_dim 64; intermediate ~2.75x hidden, a multiple of 64; tied embeddings)
SIZES = {
    "10M": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
    "40M": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
    "100M": dict(hidden_size=768, intermediate_size=2112, num_hidden_layers=10, num_attention_heads=12),
    "200M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=13, num_attention_heads=16),
}
SHARED = dict(seq_len=256, micro_batch_size=4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, grad_clip=1.0, seed=0)
# method -> (options, lr). The LR changes neither memory nor speed; these are the recipes' values (MeZO: the
# 1e-6 its recipe recommends for large models).
METHODS = {
    "full": ({}, 1e-4),
    "lora": ({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}, 2e-3),
    "lisa": ({"gamma": 1, "interval": 20}, 1e-4),
    "mezo": ({"eps": 1e-3}, 1e-6),
    "sparse": ({"density": 0.01, "select": "grad", "calibration_steps": 1}, 1e-4),
}
PEER = "peft+trainer"
# "<method>+<option>...": the same method with memory options, run at the largest size with the full micro batch:
# gc = `train.gradient_checkpointing: true` (activations recomputed in the backward pass), the lever for activation
# memory; chunk = `train.loss_chunk_tokens: 256` (the head's 32k-vocabulary logits a quarter of the batch at a time).
MEMORY_OPTIONS = {"gc": {"gradient_checkpointing": True}, "chunk": {"loss_chunk_tokens": 256}}
WITH_MEMORY_OPTIONS = ("full+gc", "lora+gc", "full+gc+chunk", "lora+gc+chunk")
ALL_METHODS = (*METHODS, PEER, *WITH_MEMORY_OPTIONS)
# Which configurations run at which size: everything at the largest, the crossover trio at the others.
SMALL_METHODS = ("full", "lora", "mezo")


def _offline_env(out: Path) -> dict[str, str]:
    env = bt._offline_env(out)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


def model_dir(out: Path, size: str) -> Path:
    return out / "methods" / "models" / size


# ---------------------------------------------------------------- the recipe (tunelab's side)


def recipe_dict(spec: dict) -> dict:
    s = SHARED
    method, *memory = ("lora" if spec["method"] == PEER else spec["method"]).split("+")
    options, lr = METHODS[method]
    memory_options = {k: v for option in memory for k, v in MEMORY_OPTIONS[option].items()}
    memory_options.update(MALLOC[spec.get("malloc", "default")][1])
    return {
        "kind": "finetune",
        "name": f"bench-{spec['size']}-{spec['method']}",
        "model": {"path": spec["model_dir"]},
        "data": {"train": "builtin:code", "seq_len": s["seq_len"], "packing": "concat"},
        "method": {"name": method, "options": options},
        "train": {
            "max_steps": spec["steps"], "micro_batch_size": spec.get("micro", s["micro_batch_size"]), "grad_accum": 1,
            "optimizer": "adamw", "lr": lr, "betas": list(s["betas"]), "eps": s["eps"],
            "weight_decay": s["weight_decay"], "grad_clip": s["grad_clip"],
            "schedule": {"name": "constant", "warmup_steps": 0},
            "precision": "fp32", "compile": False, "seed": s["seed"], **memory_options,
            # One train event per step (tokens/s); no step-0 eval; eval and checkpoint only at the end, which
            # the loop always does: the evaluation capped at 1,024 tokens.
            "log_every": 1, "eval_at_start": False, "eval_every": 0, "checkpoint_every": 0,
            "eval_max_tokens": s["seq_len"] * s["micro_batch_size"],
        },
    }


def load_cfg(spec: dict):
    from tunelab.config.loading import validate_recipe

    return validate_recipe(recipe_dict(spec), "bench_methods", "finetune")


# ---------------------------------------------------------------- memory bookkeeping inside a child


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Phases:
    """Peak RSS per phase: at every boundary the VmHWM since the last boundary is recorded and reset."""

    def __init__(self):
        self.rows: list[dict] = []
        self.name = "interpreter + imports"
        self.t0 = time.perf_counter()
        self.sizes: dict = {}

    def mark(self, next_name: str) -> None:
        peak, rss = _status_kb("VmHWM") / 1024, _status_kb("VmRSS") / 1024
        now = time.perf_counter()
        self.rows.append({"phase": self.name, "peak_mb": round(peak, 1), "end_rss_mb": round(rss, 1),
                          "s": round(now - self.t0, 2)})
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
            f.write("5")
        self.name, self.t0 = next_name, now

    def wrap(self, owner, attr: str, during: str, after: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self.mark(during)
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark(after)

        setattr(owner, attr, wrapped)

    def summary(self) -> dict:
        top = max(self.rows, key=lambda r: r["peak_mb"])
        return {"peak_mb": top["peak_mb"], "peak_phase": top["phase"], "phases": self.rows, "sizes": self.sizes}


class _Mallinfo2(__import__("ctypes").Structure):
    _fields_ = [(name, __import__("ctypes").c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def memory_now() -> dict:
    """RSS (MB) now, split into anonymous and file-backed pages (the weights are mmap'd from the safetensors file
    until written), the VmHWM since the last reset, and glibc's heap: bytes malloc'd and still in use (small
    blocks in the arenas + big blocks served by mmap) and bytes freed but kept in the arenas (retained)."""
    import ctypes

    out = {k: round(_status_kb(f) / 1024) for k, f in
           (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"), ("hwm", "VmHWM"))}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
        out.update(malloc_in_use=round((m.uordblks + m.hblkhd) / MB), malloc_free_kept=round(m.fordblks / MB))
    except (OSError, AttributeError):
        pass
    return out


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def record_sizes(phases: Phases, model, optimizer) -> None:
    params = list(model.parameters())
    state = [v for s in (optimizer.state.values() if optimizer is not None else []) for v in s.values()
             if hasattr(v, "numel") and v.numel() > 1]
    phases.sizes = {"weights_mb": round(_unique_bytes(params) / MB, 1),
                    "trainable_mb": round(_unique_bytes([p for p in params if p.requires_grad]) / MB, 1),
                    "optimizer_state_mb": round(_unique_bytes(state) / MB, 1)}


def instrument_tunelab(phases: Phases, step_rss: list) -> None:
    """Phase boundaries at the calls run_training makes (module attributes, looked up at call time)."""
    from tunelab import models, runs
    from tunelab.stages import setup, training_data
    from tunelab.train import checkpoint as ckpt
    from tunelab.train import loop

    phases.wrap(setup, "initial_model", "load model", "data (token cache, cached)")
    phases.wrap(models, "weights_sha256", "hash of the base weights", "method.prepare + records")
    phases.wrap(loop, "train", "training steps", "after the loop")
    phases.wrap(setup, "save_final", "final/ save", "end")
    from tunelab.methods import sparse  # its choice of entries runs inside the loop, before step 1

    phases.wrap(sparse.SparseFT, "gradient_scores", "sparse: calibration gradients", "training steps")
    from tunelab.ops import prune

    phases.wrap(prune, "select_global", "sparse: choosing the entries", "training steps")

    evaluator = training_data.evaluator

    def counting_evaluator(*args, **kwargs):
        evaluate = evaluator(*args, **kwargs)

        def timed(model, step):
            phases.mark("final evaluation")
            try:
                return evaluate(model, step)
            finally:
                phases.mark("loop end")
        return timed
    training_data.evaluator = counting_evaluator

    save_checkpoint = ckpt.save_checkpoint

    def saving(*args, **kwargs):
        record_sizes(phases, kwargs["model"], kwargs["optimizer"])
        phases.mark("final checkpoint")
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            phases.mark("loop end")
    ckpt.save_checkpoint = saving

    log = runs.RunDir.log

    def logging(self, event):
        if event.get("event") == "train":  # memory after each step, and the peak within the phase so far
            step_rss.append({"step": event["step"], **memory_now()})
        return log(self, event)
    runs.RunDir.log = logging


# ---------------------------------------------------------------- workers (one per subprocess)


def summarize(step_s: list[float], warmup: int, tokens_per_step: int, window: tuple[float, float]) -> dict:
    timed = step_s[warmup:]
    return {"step_s": [round(t, 4) for t in step_s], "timed_steps": len(timed),
            "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
            "median_tokens_per_s": tokens_per_step / statistics.median(timed),
            "s_per_step": sum(timed) / len(timed), "window": list(window)}


def worker_tunelab(spec: dict, phases: Phases) -> dict:
    import torch

    from tunelab.runs import read_metrics
    from tunelab.stages import run_stage

    step_rss: list = []
    instrument_tunelab(phases, step_rss)
    cfg = load_cfg(spec)
    run_dir = Path(spec["workdir"]) / "run"
    phases.mark("set-up (run dir, tokenizer)")
    t0 = time.perf_counter()
    run_stage(cfg, out=run_dir, quiet=True)
    total = time.perf_counter() - t0
    phases.mark("exit")
    events = read_metrics(run_dir / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == list(range(1, spec["steps"] + 1)), "one train event per step expected"
    model_event = next(e for e in events if e["event"] == "model")
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len
    step_s = [tokens_per_step / e["tokens_per_s"] for e in train]
    out = summarize(step_s, spec["warmup"], tokens_per_step, (train[spec["warmup"] - 1]["time"], train[-1]["time"]))
    trainable = model_event["trainable"]  # sparse: the candidate matrices; the entries that train are in the delta
    delta = run_dir / "final" / "sparse_delta.safetensors"
    if delta.is_file():
        from safetensors import safe_open

        with safe_open(str(delta), framework="pt") as f:
            trainable = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".indices"))
    out.update(parameters=model_event["parameters"], trainable=trainable, step_rss=step_rss,
               mean_loss=statistics.fmean(e["loss"] for e in train), stage_s=round(total, 1),
               threads=torch.get_num_threads(),
               final_mb=round(sum(f.stat().st_size for f in (run_dir / "final").iterdir()) / MB, 1))
    return out


def worker_peer(spec: dict, phases: Phases) -> dict:
    """peft + transformers.Trainer on the windows tunelab's loop draws, in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from tunelab import tokenizers
    from tunelab.paths import resolve_cache_dir
    from tunelab.stages.setup import seed_everything
    from tunelab.stages.training_data import build_data, packed_batches
    from tunelab.train.dist import Dist

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = load_cfg(spec)
    tc, opts = cfg.train, cfg.method.options
    phases.mark("set-up (tokenizer, data, cached)")
    seed_everything(tc.seed)
    tokenizer = tokenizers.load_tokenizer(spec["model_dir"])
    batches = packed_batches(cfg, build_data(cfg, tokenizer, resolve_cache_dir(None), lambda *a: None),
                             tokenizer, Dist())
    rows = []
    for step in range(spec["steps"]):
        for batch, _ in batches.next(step):
            rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    phases.mark("load model")
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True)
    phases.mark("peft wrap")
    config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                        target_modules=opts["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, k):
            return rows[k]

    step_rss: list[dict] = []
    clock = bt.step_clock(on_begin=lambda: phases.mark("training steps"),
                          on_step=lambda state: step_rss.append({"step": state.global_step, **memory_now()}))
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "trainer"), max_steps=spec["steps"],
        per_device_train_batch_size=tc.micro_batch_size, gradient_accumulation_steps=1, learning_rate=tc.lr,
        adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], adam_epsilon=tc.eps, weight_decay=tc.weight_decay,
        max_grad_norm=tc.grad_clip, lr_scheduler_type="constant", warmup_steps=0, bf16=False, use_cpu=True,
        torch_compile=False, seed=tc.seed, data_seed=tc.seed, train_sampling_strategy="sequential",
        report_to=[], eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=spec["steps"],
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock])
    result = trainer.train()
    phases.mark("exit")
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    assert len(step_s) == spec["steps"], f"{len(step_s)} steps timed, {spec['steps']} expected"
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    record_sizes(phases, model, opt)
    out = summarize(step_s, spec["warmup"], tc.micro_batch_size * cfg.data.seq_len,
                    (clock.walls[spec["warmup"]], clock.walls[-1]))
    out.update(parameters=parameters, trainable=trainable, step_rss=step_rss, mean_loss=float(result.training_loss),
               threads=torch.get_num_threads(),
               optimizer=f"{type(opt).__module__}.{type(opt).__name__}(fused={opt.defaults.get('fused')})")
    return out


def worker_prepare(spec: dict) -> dict:
    """The tokenizer, one saved model per size, and the token cache of builtin:code (all cached across runs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab import tokenizers
    from tunelab.config import SourceSpec
    from tunelab.data import tokenizer_training_texts
    from tunelab.paths import resolve_cache_dir
    from tunelab.stages.training_data import build_data

    t0 = time.perf_counter()
    cache = resolve_cache_dir(None)
    out = Path(spec["out"])
    tok_dir = out / "methods" / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"  training a {VOCAB}-token BPE on builtin:code ...", flush=True)
        tok = tokenizers.train_tokenizer(tokenizer_training_texts([SourceSpec(source="builtin:code")], cache, 8_000_000),
                                     VOCAB)
        tok.save_pretrained(tok_dir)
    tokenizer = tokenizers.load_tokenizer(str(tok_dir))
    info = {"vocab": len(tokenizer), "sizes": {}}
    for size in spec["sizes"]:
        where = model_dir(out, size)
        eos = tokenizers.eos_id(tokenizer)
        fields = dict(vocab_size=len(tokenizer), num_key_value_heads=SIZES[size]["num_attention_heads"],
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id, **SIZES[size])
        wanted = LlamaConfig(**fields).to_dict()
        saved = json.loads((where / "config.json").read_text()) if (where / "config.json").is_file() else None
        if saved is None or any(saved.get(k) != v for k, v in fields.items()):
            print(f"  building the {size} model (seed 0) ...", flush=True)
            shutil.rmtree(where, ignore_errors=True)
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**fields))
            model.save_pretrained(where)
            tokenizer.save_pretrained(where)
            del model
        config = LlamaConfig.from_pretrained(where)
        with torch.device("meta"):
            meta = LlamaForCausalLM(config)
        info["sizes"][size] = {"parameters": sum(p.numel() for p in meta.parameters()),
                               "file_mb": round(sum(f.stat().st_size for f in where.glob("*.safetensors")) / MB, 1),
                               "config": {k: wanted[k] for k in ("hidden_size", "intermediate_size",
                                                                 "num_hidden_layers", "num_attention_heads")}}
    # Fill the token cache once (a cached child then only reads it), with the first size's recipe.
    cfg = load_cfg({"size": spec["sizes"][0], "method": "full", "model_dir": str(model_dir(out, spec["sizes"][0])),
                    "steps": 2})
    data = build_data(cfg, tokenizer, cache, lambda *a: print("  " + " ".join(map(str, a)), flush=True))
    info.update(train_tokens=int(len(data.sets[0].tokens)), windows=len(data.sets[0]),
                seconds=round(time.perf_counter() - t0, 1))
    return info


def run_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec["framework"] == "prepare":
        result = worker_prepare(spec)
    else:
        phases = Phases()
        Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
        fn = worker_peer if spec["framework"] == "peer" else worker_tunelab
        result = fn(spec, phases)
        result.update(phases.summary())
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the harness


def spawn(spec: dict, out: Path, echo: bool = False, extra_env: dict | None = None) -> tuple[dict, list, float]:
    """Run one worker; returns (its result, (time, busy ticks, its ticks) samples, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                            env={**_offline_env(out), **(extra_env or {})}, cwd=str(out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples, own_last = [], 0
    while proc.poll() is None:
        own = bt._proc_ticks(proc.pid)
        own_last = own if own is not None else own_last
        samples.append((time.time(), bt._cpu_busy_ticks(), own_last))
        time.sleep(0.25)
    stdout, stderr = proc.communicate()
    if echo:
        sys.stdout.write("".join(ln + "\n" for ln in stdout.splitlines() if not ln.startswith(RESULT_MARK)))
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise SystemExit(f"{spec.get('name', spec['framework'])}: worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):]), samples, time.perf_counter() - t0


# glibc's malloc raises its mmap threshold each time a big block is freed (up to 32 MiB), after which freed
# activations stay in the heap instead of going back to the OS. "fixed" pins the threshold (which turns the
# dynamic raise off): every block >= 1 MiB is its own mmap, returned on free, so RSS follows live memory.
# "release": tunelab's `train.release_freed_memory: true`, which sets the same threshold from inside the stage
# (the peer, which has no such key, runs as in "default"). Each mode: (environment, train keys).
MALLOC = {"default": ({}, {}), "fixed": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, {}),
          "release": ({}, {"release_freed_memory": True})}


def configurations(args) -> list[dict]:
    """Per allocator mode: full/LoRA/MeZO at every size, every method (+ the peer) at the largest; then the
    largest with a micro batch of 1 (full/LoRA/MeZO): less activation memory."""
    runs = []
    for size in args.sizes:  # sorted by size: the last is the largest
        names = ALL_METHODS if size == args.sizes[-1] or args.all_methods else SMALL_METHODS
        runs += [(size, m, SHARED["micro_batch_size"]) for m in names]
    if args.micro1 and not args.quick:
        runs += [(args.sizes[-1], m, 1) for m in SMALL_METHODS]
    confs = []
    for size, m, micro in runs:
        for malloc in args.malloc:
            if args.only and not any(k == m or k in m for k in args.only):
                continue
            label = "peft + HF Trainer (LoRA)" if m == PEER else "tunelab " + m
            confs.append({"framework": "peer" if m == PEER else "tunelab", "size": size, "method": m,
                          "micro": micro, "malloc": malloc,
                          "name": f"{size} {label}, micro batch {micro}, malloc {malloc}"})
    # Run order: by size, micro batch and allocator mode, so each group's rows follow each other.
    order = {s: i for i, s in enumerate(args.sizes)}
    confs.sort(key=lambda c: (c["micro"] != SHARED["micro_batch_size"], order[c["size"]],
                              args.malloc.index(c["malloc"])))
    return confs


def run_config(conf: dict, args, out: Path, index: int) -> dict:
    spec = {**conf, "model_dir": str(model_dir(out, conf["size"])), "steps": args.steps, "warmup": args.warmup,
            "workdir": str(out / "methods" / "work" / f"{index:02d}-{conf['size']}-{conf['method']}")}
    shutil.rmtree(spec["workdir"], ignore_errors=True)
    result, samples, wall = spawn(spec, out, extra_env=MALLOC[conf["malloc"]][0])
    result = {**conf, **result, "process_s": round(wall, 1)}
    result["other_load"] = bt.other_load_in(samples, tuple(result["window"]))
    shutil.rmtree(spec["workdir"], ignore_errors=True)  # a run of the 200M model writes ~2.4 GB
    return result


def _key(r: dict, method: str | None = None) -> tuple:
    return (r["size"], method or r["method"], r["micro"], r["malloc"])


def ratios(results: list[dict]) -> None:
    """rss_vs_full / tps_vs_full against full with the same size, micro batch and allocator; LoRA / peer."""
    by = {_key(r): r for r in results}
    for r in results:
        full = by.get(_key(r, "full"))
        r["rss_vs_full"] = r["peak_mb"] / full["peak_mb"] if full else None
        r["tps_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"] if full else None
        peer = by.get(_key(r, PEER))
        if r["method"] == "lora" and peer:
            r["vs_peer"] = {"tokens_per_s": r["tokens_per_s"] / peer["tokens_per_s"],
                            "median_tokens_per_s": r["median_tokens_per_s"] / peer["median_tokens_per_s"],
                            "peak_mb": r["peak_mb"] / peer["peak_mb"]}


def crossover(results: list[dict], method: str, malloc: str, threshold: float = 0.7) -> str:
    rows = sorted((r for r in results if r["method"] == method and r["malloc"] == malloc
                   and r["micro"] == SHARED["micro_batch_size"] and r.get("rss_vs_full") is not None),
                  key=lambda r: r["parameters"])
    if not rows:
        return "not measured"
    trail = ", ".join(f"{r['rss_vs_full']:.2f}x at {r['size']}" for r in rows)
    below = [r for r in rows if r["rss_vs_full"] <= threshold]
    if not below:
        return f"not reached up to {rows[-1]['size']} ({trail})"
    return f"from {below[0]['size']} ({trail})"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _load(r: dict | None, threshold: float) -> str:
    if r is None:
        return "-"
    if r.get("other_load") is None:
        return "?"
    return f"{r['other_load']:.0%}{' (disturbed)' if r['other_load'] > threshold else ''}"


def results_table(results: list[dict], args, micro: int) -> str:
    """One row per (size, method): the allocator modes side by side."""
    by = {_key(r): r for r in results}
    modes = [m for m in args.malloc if any(r["malloc"] == m and r["micro"] == micro for r in results)]
    head = "| size | parameters | configuration | trainable |"
    align = "|---|---:|---|---:|"
    for m in modes:
        head += f" peak RSS MB ({m}) | / full |"
        align += "---:|---:|"
    head += " peak set in |"
    align += "---|"
    for m in modes:
        head += f" tokens/s ({m}) | / full |"
        align += "---:|---:|"
    head += " other load |"
    align += "---:|"
    lines = [head, align]
    seen = []
    for r in results:
        if r["micro"] == micro and (r["size"], r["method"]) not in seen:
            seen.append((r["size"], r["method"]))
    for size, method in seen:
        rows = [by.get((size, method, micro, m)) for m in modes]
        first = next(x for x in rows if x)
        label = "peft + HF Trainer (LoRA)" if method == PEER else method
        line = f"| {size} | {first['parameters']:,} | {label} | {first['trainable']:,} |"
        for x in rows:
            line += f" {x['peak_mb']:,.0f} | {_ratio(x['rss_vs_full'])} |" if x else " - | - |"
        where = [x["peak_phase"] for x in rows if x]
        line += " " + (where[0] if len(set(where)) == 1 else " / ".join(where)) + " |"
        for x in rows:
            line += f" {x['tokens_per_s']:,.1f} | {_ratio(x['tps_vs_full'])} |" if x else " - | - |"
        line += " " + " / ".join(_load(x, args.busy_threshold) for x in rows) + " |"
        lines.append(line)
    return "\n".join(lines)


PHASE_COLUMNS = [("interpreter + imports", "imports"), ("set-up (run dir, tokenizer)", "set-up"),
                 ("load model", "load"), ("hash of the base weights", "hash"),
                 ("sparse: calibration gradients", "sparse: calibration"), ("sparse: choosing the entries", "sparse: top-k"),
                 ("training steps", "training"),
                 ("final evaluation", "final eval"), ("final checkpoint", "checkpoint"), ("final/ save", "final/")]


def phase_table(results: list[dict], size: str, malloc: str) -> str:
    rows = [r for r in results if r["size"] == size and r["micro"] == SHARED["micro_batch_size"]
            and r["malloc"] == malloc]
    if not rows:
        return ""
    head = ("| method | " + " | ".join(c for _, c in PHASE_COLUMNS)
            + " | weights | trainable | optimizer state | after the last step: RSS (file-backed) | malloc'd, in use "
              "| freed, kept by malloc |\n|---|" + "---:|" * (len(PHASE_COLUMNS) + 6))
    lines = [head]
    for r in rows:
        peaks = {}
        for p in r["phases"]:  # a phase name can repeat (peer: no such phases): keep its highest peak
            peaks[p["phase"]] = max(peaks.get(p["phase"], 0), p["peak_mb"])
        s, last = r["sizes"], r["step_rss"][-1]
        label = "peft + Trainer" if r["method"] == PEER else r["method"]
        lines.append(f"| {label} | " + " | ".join(f"{peaks[k]:,.0f}" if k in peaks else "-" for k, _ in PHASE_COLUMNS)
                     + f" | {s.get('weights_mb', 0):,.0f} | {s.get('trainable_mb', 0):,.0f} | "
                       f"{s.get('optimizer_state_mb', 0):,.0f} | {last['rss']:,} ({last['file']:,}) | "
                       f"{last.get('malloc_in_use', '?'):,} | {last.get('malloc_free_kept', '?'):,} |")
    return "\n".join(lines)


def section(args, machine: dict, prep: dict, results: list[dict], total_s: float) -> str:
    s = SHARED
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sizes = "; ".join(f"{k}: {v['parameters']:,} parameters (hidden {v['config']['hidden_size']}, MLP "
                      f"{v['config']['intermediate_size']}, {v['config']['num_hidden_layers']} layers, "
                      f"{v['config']['num_attention_heads']} heads; {v['file_mb']:,.0f} MB of fp32 weights)"
                      for k, v in prep["sizes"].items() if k in args.sizes)
    largest, micro = args.sizes[-1], s["micro_batch_size"]
    by = {_key(r): r for r in results}
    summary = []
    for malloc in args.malloc:
        lora, peer = by.get((largest, "lora", micro, malloc)), by.get((largest, PEER, micro, malloc))
        if lora and peer:
            v = lora["vs_peer"]
            summary.append(f"- **tunelab LoRA / peft + HF Trainer at {largest}, malloc {malloc}**: tokens/s "
                           f"**{v['tokens_per_s']:.2f}x** (median step {v['median_tokens_per_s']:.2f}x), peak RSS "
                           f"{v['peak_mb']:.2f}x; mean training loss {lora['mean_loss']:.4f} vs {peer['mean_loss']:.4f}"
                           f" (peer optimizer: {peer.get('optimizer')})")
        goals = []
        for m, goal in (("lora", 0.5), ("lora+gc", 0.5), ("lora+gc+chunk", 0.5), ("mezo", 0.4)):
            r = by.get((largest, m, micro, malloc))
            if r and r["rss_vs_full"] is not None:
                goals.append(f"{m} {r['rss_vs_full']:.2f}x of full (goal <= {goal}x: "
                             f"{'met' if r['rss_vs_full'] <= goal else 'missed'})")
        for variant in ("+gc", "+gc+chunk"):  # against full fine-tuning with the same memory options
            both = by.get((largest, "lora" + variant, micro, malloc)), by.get((largest, "full" + variant, micro, malloc))
            if all(both):
                goals.append(f"lora{variant} {both[0]['peak_mb'] / both[1]['peak_mb']:.2f}x of full{variant}")
        if goals:
            summary.append(f"- goals at {largest}, malloc {malloc} (whole-process peak RSS): {'; '.join(goals)}")
        summary.append(f"- crossover, malloc {malloc} (RSS <= 0.7x full's, micro batch {micro}): LoRA "
                       f"{crossover(results, 'lora', malloc)}; MeZO {crossover(results, 'mezo', malloc)}")
    small_batch = ""
    if any(r["micro"] != micro for r in results):
        small_batch = (f"\nThe largest model with micro batch 1 (256 tokens/step, a quarter of the activations; "
                       f"everything else as above):\n\n{results_table(results, args, 1)}\n")
    phases = "\n\n".join(f"malloc {m}:\n\n{phase_table(results, largest, m)}" for m in args.malloc
                         if phase_table(results, largest, m))
    cmd = " ".join(["python benchmarks/bench_methods.py", *args.argv])
    return f"""{START}
## Fine-tuning methods: peak RSS and tokens/s (`bench_methods.py`)

Generated by `{cmd}` on {date} (total {total_s / 60:.1f} min). Machine: {machine['cpu']}, {machine['cores']} cores,
torch threads {machine['threads']}, torch {machine['torch']}, transformers {machine['transformers']}, peft
{machine['peft']}, accelerate {machine['accelerate']}, glibc {machine['glibc']}. Each configuration ran once, in its
own fresh subprocess, one after the other (the machine is shared: before each the script waited for other
processes to use < 10% of the CPU; "other load" is their share during the timed steps; a disturbed configuration
was rerun once).

| setting | value |
|---|---|
| models | Llama-shaped, random init (seed 0), tied embeddings, vocab {prep['vocab']:,} (byte-level BPE trained on builtin:code); {sizes} |
| data | `builtin:code` from tunelab's token cache ({prep['train_tokens']:,} training tokens), packed windows of {s['seq_len']} (concat); the peer reads the very windows tunelab draws, in the same order |
| batch | micro batch {micro} x seq {s['seq_len']} = {micro * s['seq_len']:,} tokens/step (last table: micro batch 1), no accumulation; {args.steps} steps, the first {args.warmup} not timed |
| precision | fp32 (`train.precision: fp32`; the peer: no bf16/fp16), sdpa attention, no torch.compile |
| optimizer | AdamW, fused (tunelab `torch.optim.AdamW(fused=True)`; the Trainer's default `adamw_torch_fused`), betas {s['betas']}, eps {s['eps']}, weight decay {s['weight_decay']}, clip {s['grad_clip']}, constant LR (full/LISA/sparse 1e-4, LoRA 2e-3, MeZO 1e-6: no optimizer, SGD along z) |
| methods | full; lora r 8, alpha 16, dropout 0, all linear layers; lisa gamma 1, interval 20; mezo eps 1e-3 (a step = 2 forward passes, no backward); sparse density 0.01 by gradient over 1 calibration batch; `full+gc`, `lora+gc`: the same with `train.gradient_checkpointing: true` (each layer's activations recomputed in the backward pass); `+chunk`: also `train.loss_chunk_tokens: 256` (head + cross-entropy over 256 targets at a time, each chunk's logits recomputed in the backward pass) |
| tunelab run | the `finetune` stage (`run_stage`), `eval_at_start: false`, `eval_every: 0`, `checkpoint_every: 0`: the loop still evaluates (1,024 tokens) and checkpoints once at the end, then writes final/; all inside the measured process |
| peer | peft `get_peft_model` (same LoraConfig) + `transformers.Trainer`, no eval, no saving |
| malloc | `default`: glibc as installed. `fixed`: `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576` in the child, which turns off glibc's dynamic mmap threshold: blocks >= 1 MiB (activations, gradients) are mmap'd and unmapped when freed, so RSS follows the live tensors. `release`: tunelab's `train.release_freed_memory: true`, the same threshold set by the stage itself (the peer as in `default`) |
| peak RSS | the child's VmHWM, reset at each phase boundary; the whole-process peak is the largest phase peak ("peak set in") |
| tokens/s | timed tokens / timed wall time (tunelab: per-step `tokens_per_s` of metrics.jsonl; peer: `on_step_end` timestamps) |
| trainable | parameters with `requires_grad` as the stage logs them; sparse: the entries that train (the candidate matrices get dense gradients and moments) |

{results_table(results, args, micro)}
{small_batch}
{chr(10).join(summary)}

Peak RSS (MB) per phase of the tunelab stage at {largest} (each phase's own peak, VmHWM reset at its start;
"weights", "trainable", "optimizer state": the tensors' sizes at the final checkpoint; after the last step: RSS,
of which file-backed (weights still mmap'd from the model's safetensors), and glibc's `mallinfo2`: bytes malloc'd
and in use, bytes freed but kept in the heap).

{phases}

Raw per-step times, per-step memory and every phase: `benchmarks/out/methods/last-results.json`.
{END}"""


def write_section(text: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace the methods section (or append it at the end); everything else, including the hand-written notes
    that follow the end marker, stays."""
    content = path.read_text() if path.exists() else ""
    if START in content and END in content:
        head, rest = content.split(START, 1)
        content = head + text + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(content)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(SIZES)} (default: all; quick 10M)")
    ap.add_argument("--steps", type=int, default=None, help="steps per configuration (default 7; quick 4)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps excluded from timing (default 2)")
    ap.add_argument("--only", default=None, help=f"comma-separated methods ({', '.join(ALL_METHODS)})")
    ap.add_argument("--malloc", default="default,fixed",
                    help="allocator modes: default, fixed, release (default: default,fixed)")
    ap.add_argument("--no-micro1", dest="micro1", action="store_false",
                    help="skip the largest model's micro-batch-1 runs")
    ap.add_argument("--all-methods", action="store_true", help="every method at every size, not only the largest")
    ap.add_argument("--quick", action="store_true", help="smoke check (10M model, 4 steps), prints only")
    ap.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section even for a partial run")
    ap.add_argument("--out", default=str(HERE / "out"), help="outputs and caches (default benchmarks/out)")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a configuration disturbed by other processes")
    ap.add_argument("--busy-threshold", type=float, default=0.10,
                    help="other processes' CPU share above which a measurement counts as disturbed")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    args.argv = argv
    args.sizes = [s.strip() for s in args.sizes.split(",")] if args.sizes else (["10M"] if args.quick else list(SIZES))
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        ap.error(f"--sizes: unknown {unknown}; known: {', '.join(SIZES)}")
    args.sizes.sort(key=list(SIZES).index)
    args.malloc = [m.strip() for m in args.malloc.split(",")]
    if any(m not in MALLOC for m in args.malloc):
        ap.error(f"--malloc: one or more of {', '.join(MALLOC)}")
    args.steps = args.steps or (4 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else 2
    args.only = [k.strip() for k in args.only.split(",")] if args.only else None
    if args.steps <= args.warmup or args.warmup < 1:
        ap.error("need 1 <= --warmup < --steps")
    out = Path(args.out).resolve()
    (out / "methods").mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    print(f"tunelab methods benchmark: sizes {', '.join(args.sizes)}, {args.steps} steps ({args.warmup} warm-up), "
          f"batch {SHARED['micro_batch_size']} x {SHARED['seq_len']}, fp32, malloc {', '.join(args.malloc)}; "
          f"outputs in {out / 'methods'}")
    print("preparing (tokenizer, models, token cache; cached after the first run) ...", flush=True)
    prep, _, _ = spawn({"framework": "prepare", "out": str(out), "sizes": args.sizes}, out, echo=True)
    for size, info in prep["sizes"].items():
        print(f"  {size}: {info['parameters']:,} parameters, {info['file_mb']:,.0f} MB")
    print(f"  {prep['train_tokens']:,} training tokens ({prep['seconds']}s)")
    os.environ.update({k: v for k, v in _offline_env(out).items() if k != "PYTHONPATH"})
    machine = bt.machine_info()
    import platform

    import peft

    machine.update(peft=peft.__version__, glibc=" ".join(platform.libc_ver()[1:]) or "?")
    confs = configurations(args)
    results = []
    for i, conf in enumerate(confs):
        attempts = []
        for attempt in range(1 + args.retries):
            print(f"[{i + 1}/{len(confs)}] {conf['name']}{' (rerun: the machine was busy)' if attempt else ''} ...",
                  end=" ", flush=True)
            bt.wait_for_quiet(args.max_wait, args.busy_threshold)
            r = run_config(conf, args, out, i)
            attempts.append(r)
            load = r["other_load"]
            print(f"peak RSS {r['peak_mb']:,.0f} MB ({r['peak_phase']}), {r['tokens_per_s']:,.1f} tok/s, "
                  f"{r['s_per_step']:.2f} s/step, other load {'?' if load is None else f'{load:.0%}'}, "
                  f"process {r['process_s']:.0f}s", flush=True)
            if load is not None and load <= args.busy_threshold:
                break
        best = min(attempts, key=lambda a: a["other_load"] if a["other_load"] is not None else 1.0)
        best["attempts"] = [{k: a[k] for k in ("tokens_per_s", "peak_mb", "other_load")} for a in attempts]
        results.append(best)
    ratios(results)
    total = time.perf_counter() - start
    (out / "methods" / "last-results.json").write_text(json.dumps(
        {"machine": machine, "prepare": prep, "results": results, "argv": argv, "total_s": total}, indent=1))
    text = section(args, machine, prep, results, total)
    print()
    print(text)
    print(f"\ntotal {total / 60:.1f} min")
    full_run = not args.quick and not args.only and args.sizes == list(SIZES)
    if args.write or full_run:
        write_section(text)
        print(f"wrote the methods section of {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
