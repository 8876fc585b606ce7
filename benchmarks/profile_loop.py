"""Where does a tunelab training step spend its time? torch.profiler over a few steps of train/loop.py.

    python benchmarks/profile_loop.py                       # llama-small, bf16, eager
    python benchmarks/profile_loop.py --compile             # ... with train.compile=true
    python benchmarks/profile_loop.py --precision fp32 --preset llama-tiny

It sets up exactly what `tunelab.stages.train.run_training` sets up (same recipe as bench_throughput.py), then
calls `tunelab.train.loop.train` with a progress object whose `update` (called once per step, since
train.log_every=1) advances the profiler's schedule: the first steps are skipped, the next --active are
recorded. It prints
- the recorded CPU time (operators and Python) charged to the call made from train/loop.py that led to
  it (make_batch, method.loss, backward, clip_grad_norm_, optimizer.step, ...), via the profiler's tree of
  Python function events;
- the top operators by self time.
The Chrome trace goes to benchmarks/out/profile/ (open it in chrome://tracing or perfetto).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


class ProfilerProgress:
    """Stands in for pretrain's progress bar: the loop calls update() after every logged step."""

    def __init__(self, prof):
        self.prof, self.marks = prof, []

    def start(self, total, completed):
        self.marks = [time.perf_counter()]

    def update(self, step, loss, tok_s):
        self.marks.append(time.perf_counter())
        self.prof.step()

    def stop(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip", type=int, default=4, help="steps run before recording (compilation, warm-up)")
    ap.add_argument("--active", type=int, default=3, help="steps recorded")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, e.g. --set model.attn_implementation=eager")
    ap.add_argument("--out", default=str(HERE / "out"))
    args = ap.parse_args()

    import bench_throughput as bench

    out = Path(args.out).resolve()
    os.environ.update({k: v for k, v in bench._offline_env(out).items() if k != "PYTHONPATH"})
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from tunelab import models
    from tunelab.methods import create_method
    from tunelab.objectives import create_objective
    from tunelab.config import dump_config
    from tunelab.methods.base import MethodContext
    from tunelab.stages.setup import seed_everything
    from tunelab.runs import open_run_dir
    from tunelab.train import dist as distmod
    from tunelab.train.loop import train

    steps = args.skip + args.active + 1
    tag = "".join("-" + x.split(".")[-1].replace("=", "-") for x in args.set)
    work = out / "profile" / f"{args.preset}-{args.precision}{'-compile' if args.compile else ''}{tag}"
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {"workdir": str(work), "preset": args.preset, "steps": steps, "precision": args.precision,
            "compile": args.compile, "overrides": args.set}
    cfg = bench.load_cfg(spec)
    # The same set-up as the pretrain stage (seed, tokenizer, model, data), minus the bookkeeping.
    d = distmod.init()
    seed_everything(cfg.train.seed)
    tokenizer, batches = bench.tunelab_data(cfg)
    model = models.build_model(cfg.model.preset, tokenizer, cfg.model.overrides, cfg.model.attn_implementation)
    run = open_run_dir(work / "run", resume=False)
    method = create_method(cfg.method.name, cfg.method.options)
    objective = create_objective(cfg.objective.name, cfg.objective.options)
    ctx = MethodContext(device=d.device, dist=d, recipe=cfg, tokenizer=tokenizer, max_steps=cfg.train.max_steps,
                        seed=cfg.train.seed, objective=objective)
    model = method.prepare(model, ctx).to(d.device)
    objective.prepare(model, ctx)

    print("load of other processes:", f"{bench.wait_for_quiet(120):.0%}")
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=False,
                 schedule=schedule(wait=0, warmup=args.skip, active=args.active, repeat=1)) as prof:
        progress = ProfilerProgress(prof)
        train(model, method, objective, batches, lambda m, s: {}, cfg, dump_config(cfg), run, d, ctx, progress=progress,
              log=lambda *a: None)
    step_s = [b - a for a, b in zip(progress.marks, progress.marks[1:])]
    recorded = step_s[args.skip:args.skip + args.active]
    wall_us = sum(recorded) * 1e6

    # Python function events (with_stack) form a tree above the operators: charge every operator's self
    # time to the call made directly from loop.py's train() (or from its nested make_batch/n_targets) that
    # led to it, e.g. "tunelab/methods/base.py(..): loss" or "torch/_tensor.py(..): backward".
    by_call: dict[str, float] = defaultdict(float)
    by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    covered = 0.0

    def in_loop(ev) -> bool:
        return ev is not None and "tunelab/train/loop.py(" in ev.name

    for ev in prof.events():
        if ev.device_type.name != "CPU" or ev.name.startswith(("ProfilerStep", "tunelab/train/loop.py(", "threading.py")):
            continue
        if not ev.name.startswith("aten::") and "(" in ev.name and ev.self_cpu_time_total == 0:
            continue
        is_op = ev.name.startswith("aten::") or not ("/" in ev.name or ev.name.startswith("<built-in"))
        self_us = ev.self_cpu_time_total
        if is_op:
            covered += self_us
            by_op[ev.name][0] += self_us
            by_op[ev.name][1] += 1
        node, child = ev, None
        while node is not None and not in_loop(node):
            if not node.name.startswith("ProfilerStep"):  # the schedule's step marker sits in between
                child = node
            node = node.cpu_parent
        if node is None:
            where = "(not under train(): autograd engine / profiler)"
        else:
            where = f"{node.name.rsplit(': ', 1)[-1]}() -> {(child or ev).name[:80]}"  # loop.py's function
        by_call[where] += self_us

    n = args.active
    print(f"{args.preset} {args.precision}{' + compile' if args.compile else ''} {' '.join(args.set)}: step times (s) "
          + " ".join(f"{t:.3f}" for t in step_s))
    print(f"recorded {n} steps: {wall_us / n / 1e3:.0f} ms/step wall, {covered / n / 1e3:.0f} ms/step inside "
          f"operators (threads add up, so this can exceed wall time)\n")
    print("self CPU time per step (operators and Python), by the call made from train/loop.py:")
    for where, us in sorted(by_call.items(), key=lambda x: -x[1])[:25]:
        if us / n < 500:
            continue
        print(f"  {us / n / 1e3:8.1f} ms  {100 * us / wall_us:5.1f}%  {where}")
    print("\ntop operators by self CPU time per step:")
    for name, (us, count) in sorted(by_op.items(), key=lambda x: -x[1][0])[:20]:
        print(f"  {us / n / 1e3:8.1f} ms  {count / n:6.0f} calls  {name[:90]}")
    trace = work / "trace.json"
    prof.export_chrome_trace(str(trace))
    (work / "summary.json").write_text(json.dumps({"step_s": step_s, "by_call_ms": {
        k: v / n / 1e3 for k, v in by_call.items()}}, indent=1))
    print(f"\ntrace: {trace}")


if __name__ == "__main__":
    main()
