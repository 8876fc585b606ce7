"""Peak memory of `tunelab merge` against the size of one model and of all inputs.

Saves a base and N_max "fine-tuned" copies (base + small seeded noise) of a llama-small model (~20M
parameters, vocab 8192, fp32, tied embedding: 85 MB each) to disk, then merges the first N of them
(N = 2, 4, 8) in a fresh subprocess each, for linear (the uniform soup) and TIES (density 0.5, with the
base: N + 1 files read), with tunelab.ops.merge.measured_merge. Each child reports:
  - peak RSS during the merge (VmHWM, reset right before the merge through /proc/self/clear_refs),
  - the RSS just before it (the interpreter with torch and safetensors imported),
  - what the merge added (the difference), against one model's size (goal: <= 1.5x, whatever N).
A naive merge (safetensors.torch.load_file of every input, a float32 mean, save_file) runs the same way
for linear, for contrast.

    .venv/bin/python benchmarks/bench_merge_memory.py            # N = 2, 4, 8 (about a minute); prints the table
    .venv/bin/python benchmarks/bench_merge_memory.py --write    # ... and writes it into benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_merge_memory.py --sizes 2 --preset llama-tiny   # quick

Models go to benchmarks/out/merge-memory/ (git-ignored; --keep leaves them there for the next run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "RESULTS.md"
START, END = "<!-- merge:start -->", "<!-- merge:end -->"
MB = 1 << 20


def write_section(name: str, text: str, results: Path = RESULTS) -> None:
    """Put `text` between <!-- merge:NAME:start/end --> inside the merge block at the end of RESULTS.md
    (the block and the sub-block are created when missing; everything else in the file is left alone)."""
    content = results.read_text()
    sub_start, sub_end = f"<!-- merge:{name}:start -->", f"<!-- merge:{name}:end -->"
    block = f"{sub_start}\n{text.strip()}\n{sub_end}"
    if START not in content:
        content = content.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = content.split(START, 1)
    inner, tail = rest.split(END, 1)
    if sub_start in inner:
        before, after = inner.split(sub_start, 1)
        inner = before + block + after.split(sub_end, 1)[1]
    else:
        inner = inner.rstrip("\n") + "\n\n" + block + "\n"
    results.write_text(head + START + inner + END + tail)


def make_models(root: Path, n: int, preset: str, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models import PRESETS

    if (root / f"m{n - 1}" / "model.safetensors").is_file():
        return
    config = LlamaConfig(**PRESETS[preset][1], vocab_size=vocab, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(n):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, param in base.named_parameters():
                param.copy_(state[name] + 0.01 * torch.randn(param.shape, generator=gen))
        base.save_pretrained(root / f"m{i}")


def child(root: Path, method: str, n: int) -> None:
    """Runs in a fresh interpreter: one merge, its memory as JSON on stdout."""
    import resource

    from tunelab.ops import merge as ops

    inputs = [ops.WeightFiles(root / f"m{i}", f"m{i}") for i in range(n)]
    out = root / f"out-{method}-{n}.safetensors"
    if method == "naive":
        from safetensors.torch import load_file, save_file

        before = ops.rss_bytes()
        ops.reset_peak_rss()
        start = time.perf_counter()
        loaded = [load_file(str(i.dir / "model.safetensors")) for i in inputs]
        merged = {k: sum(t[k].float() for t in loaded) / n for k in loaded[0]}
        save_file(merged, str(out), metadata={"format": "pt"})
        peak = ops.peak_rss_bytes()
        stats = {"seconds": round(time.perf_counter() - start, 3),
                 "memory": {"peak_rss_bytes": peak, "rss_before_bytes": before, "added_bytes": peak - before,
                            "model_bytes": inputs[0].nbytes(), "inputs_bytes": sum(i.nbytes() for i in inputs)}}
    else:
        base = ops.WeightFiles(root / "base", "base") if method == "ties" else None
        options = {"density": 0.5, "scale": 1.0} if method == "ties" else {"normalize": True}
        stats = ops.measured_merge(inputs, out, method, options, base=base)
    stats["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.unlink()
    print(json.dumps({k: v for k, v in stats.items() if k != "weights"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4,8")
    parser.add_argument("--methods", default="linear,ties,naive")
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--root", type=Path, default=REPO / "benchmarks" / "out" / "merge-memory")
    parser.add_argument("--keep", action="store_true", help="Keep the saved models for the next run.")
    parser.add_argument("--write", action="store_true", help="Write the table into benchmarks/RESULTS.md.")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.root / f"{args.preset}-{args.vocab}"
    if args.child:
        child(root, args.child[0], int(args.child[1]))
        return

    import platform

    import safetensors
    import torch

    from tunelab.runs import cpu_name

    sizes = [int(s) for s in args.sizes.split(",")]
    root.mkdir(parents=True, exist_ok=True)
    make_models(root, max(sizes), args.preset, args.vocab)
    rows = []
    for method in args.methods.split(","):
        for n in sizes:
            result = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--preset", args.preset,
                                     "--vocab", str(args.vocab), "--root", str(args.root)],
                                    capture_output=True, text=True, cwd=REPO)
            if result.returncode != 0:
                sys.exit(result.stderr[-3000:])
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            mem = stats["memory"]
            rows.append((method, n, mem, stats))
            print(f"{method:6s} N={n}: peak {mem['peak_rss_bytes'] / MB:7.1f} MB, before {mem['rss_before_bytes'] / MB:6.1f} MB, "
                  f"added {mem['added_bytes'] / MB:6.1f} MB = {mem['added_bytes'] / mem['model_bytes']:.2f}x one model "
                  f"({mem['model_bytes'] / MB:.1f} MB; inputs {mem['inputs_bytes'] / MB:.1f} MB), {stats['seconds']:.2f} s",
                  flush=True)
    if not args.keep:
        shutil.rmtree(root)

    model_mb = rows[0][2]["model_bytes"] / MB
    lines = [
        "## Merge memory (`bench_merge_memory.py`)",
        "",
        f"`python benchmarks/bench_merge_memory.py` on {cpu_name()} ({platform.machine()}), "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, safetensors {safetensors.__version__}: "
        f"{args.preset} with vocab {args.vocab} (one model {model_mb:.1f} MB in fp32, tied embedding), N copies "
        "(base + seeded noise) merged in a fresh subprocess each; TIES also reads the base (N + 1 files). "
        "\"Added\" is the peak RSS during the merge (VmHWM, reset just before it) minus the RSS before it "
        "(the interpreter with torch imported); the goal is added <= 1.5x one model whatever N.",
        "",
        "| method | N | sum of inputs | peak RSS | RSS before | added by the merge | added / one model | time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"linear": "linear (streamed)", "ties": "TIES d=0.5 (streamed)", "naive": "naive load-all mean"}
    for method, n, mem, stats in rows:
        lines.append(f"| {names.get(method, method)} | {n} | {mem['inputs_bytes'] / MB:,.0f} MB | "
                     f"{mem['peak_rss_bytes'] / MB:,.0f} MB | {mem['rss_before_bytes'] / MB:,.0f} MB | "
                     f"{mem['added_bytes'] / MB:,.1f} MB | {mem['added_bytes'] / mem['model_bytes']:.2f}x | "
                     f"{stats['seconds']:.1f} s |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        write_section("memory", table)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
