"""Streaming tokenization of a big source: wall time, MB/s, peak memory, and the cached re-run.

Generates a ~1 GB folder of text files (or, with --format, a ~1 GB JSON Lines file, or both) in a temporary
folder, trains a small byte-level BPE on the generated text (tunelab.tokenizers.train_tokenizer, vocab 4096),
then tokenizes the source through tunelab.data.tokenize_source in a fresh subprocess and reports its
wall time, MB/s and peak RSS (the child's own ru_maxrss, which includes torch/transformers imports:
the RSS after imports is shown beside it). The fresh run has two passes, both timed: reading and
hashing the source (which writes its stat index) and tokenizing it. A second subprocess then
tokenizes the same source again: a cache hit, which must not open a single source file (the child
makes any open fail).

    .venv/bin/python benchmarks/bench_data_stream.py                  # 1 GB folder (several minutes on 2 cores)
    .venv/bin/python benchmarks/bench_data_stream.py --size-mb 100    # quick
    .venv/bin/python benchmarks/bench_data_stream.py --format both    # the folder, then a 1 GB JSONL
    .venv/bin/python benchmarks/bench_data_stream.py --format jsonl   # only the JSONL
    .venv/bin/python benchmarks/bench_data_stream.py --keep DIR       # keep data and caches in DIR

The text is random words (a Zipf-like vocabulary) in lines and paragraphs: a few MB generated once,
then each file is a slice of it at its own offset with its own header line, so files differ and
generation takes seconds. The files sit in the page cache when they are read (24 GB RAM here), so
this measures the pipeline, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE_MB = 6
FILES_PER_FOLDER = 100


# ---------------------------------------------------------------- data


def base_text(seed: int = 0) -> str:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.choice([1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 11])))
             for _ in range(20_000)]
    rank_weights = [1 / (rank + 1) for rank in range(len(vocab))]  # Zipf: a few words are most of the text
    words = rng.choices(vocab, rank_weights, k=BASE_MB * 1_000_000 // 5)
    lines, i = [], 0
    while i < len(words):
        n = rng.randint(6, 16)
        line = " ".join(words[i:i + n])
        lines.append(line.capitalize() + rng.choice([".", ".", ",", "?", ":"]))
        if rng.random() < 0.12:
            lines.append("")  # paragraph break
        i += n
    return "\n".join(lines) + "\n"


def write_folder(root: Path, size_mb: int, text: str) -> int:
    rng = random.Random(1)
    total, target, n = 0, size_mb * 1_000_000, 0
    while total < target:
        size = min(rng.randint(20_000, 500_000), target - total)
        start = text.find("\n", rng.randrange(len(text) - size)) + 1
        body = f"Document {n}: generated for the streaming benchmark.\n" + text[start:start + size]
        folder = root / f"part-{n // FILES_PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = body.encode()
        (folder / f"doc-{n:06d}.txt").write_bytes(data)
        total, n = total + len(data), n + 1
    return total


def write_jsonl(path: Path, size_mb: int, text: str) -> int:
    rng = random.Random(2)
    total, target = 0, size_mb * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        while total < target:
            size = rng.randint(500, 12_000)
            start = rng.randrange(len(text) - size)
            line = json.dumps({"id": total, "text": text[start:start + size]}) + "\n"
            f.write(line)
            total += len(line)
    return path.stat().st_size


def source_bytes(source: Path) -> int:
    if source.is_file():
        return source.stat().st_size
    return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the measured child


def child(args) -> None:
    from tunelab import tokenizers
    from tunelab.config import SourceSpec
    from tunelab.data import source_content_hash, tokenize_source

    tokenizer = tokenizers.load_tokenizer(args.tokenizer)
    eos = tokenizers.eos_id(tokenizer)
    spec = SourceSpec(source=args.source)
    cache = Path(args.cache)
    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    if args.child == "cached":
        import tunelab.data.readers as readers

        def no_reading(path):
            raise AssertionError(f"the cached run opened {path}")

        readers._open = no_reading
    start = time.perf_counter()
    if args.child == "fresh":
        source_content_hash(spec, cache, log=lambda *a: None)  # pass 1: read + hash, writes the stat index
        out["hash_s"] = time.perf_counter() - start
    src = tokenize_source(spec, tokenizer, eos, cache, 0.02, log=lambda *a: None)
    out["total_s"] = time.perf_counter() - start
    out.update(tokens=len(src.train) + len(src.eval), train_docs=src.train_docs, eval_docs=src.eval_docs,
               text_bytes=src.train_bytes + src.eval_bytes, rss_after_imports_kb=rss_after_imports,
               peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps(out))


def busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all processes), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(mode: str, source: Path, tokenizer: Path, cache: Path) -> dict:
    """One measured run in a fresh process; `other_load`: the share of the machine's CPU that other
    processes used meanwhile (the machines are shared: a busy neighbour slows the run)."""
    cmd = [sys.executable, __file__, "--child", mode, "--source", str(source), "--tokenizer", str(tokenizer),
           "--cache", str(cache)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, start = busy_seconds(), time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall, busy = time.perf_counter() - start, busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out["other_load"] = max(0.0, busy - own) / (wall * os.cpu_count())
    return out


# ---------------------------------------------------------------- main


def measure(name: str, source: Path, tokenizer: Path, cache: Path) -> None:
    size = source_bytes(source)
    for kept in (cache / "tokens", cache / "sources"):  # a fresh run starts from no cache (--keep reuses DIR)
        shutil.rmtree(kept, ignore_errors=True)
    fresh = run_child("fresh", source, tokenizer, cache)
    cached = run_child("cached", source, tokenizer, cache)
    mb = size / 1e6
    tokenize_s = fresh["total_s"] - fresh["hash_s"]
    print(f"\n{name}: {mb:,.0f} MB, {fresh['tokens']:,} tokens "
          f"({fresh['train_docs']:,} train + {fresh['eval_docs']:,} eval pieces)")
    print(f"  fresh run      {fresh['total_s']:7.1f} s  {mb / fresh['total_s']:6.1f} MB/s   "
          f"(read+hash {fresh['hash_s']:.1f} s = {mb / fresh['hash_s']:.0f} MB/s, "
          f"tokenize {tokenize_s:.1f} s = {mb / tokenize_s:.1f} MB/s)")
    print(f"  peak RSS       {fresh['peak_rss_kb'] / 1024:7.0f} MB     "
          f"(after imports: {fresh['rss_after_imports_kb'] / 1024:.0f} MB)")
    print(f"  other load     {fresh['other_load']:7.0%}        (CPU used by other processes during the fresh run)")
    print(f"  cached re-run  {cached['total_s']:7.2f} s  (no source file opened; peak RSS "
          f"{cached['peak_rss_kb'] / 1024:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--format", choices=["folder", "jsonl", "both"], default="folder",
                        help="a folder of text files, a JSON Lines file, or both (one after the other)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--child", choices=["fresh", "cached"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import tokenizers as hf_tokenizers
    import transformers

    from tunelab import runs, tokenizers
    from tunelab.data.sources import RACY_SECONDS

    work = args.keep or Path(tempfile.mkdtemp(prefix="tunelab-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {runs.cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"tokenizers {hf_tokenizers.__version__}, transformers {transformers.__version__}")
    print(f"working in {work}")
    try:
        start = time.perf_counter()
        text = base_text()
        sources, written = [], 0
        if args.format in ("folder", "both"):
            sources.append(("folder of text files", work / "folder"))
            written += write_folder(work / "folder", args.size_mb, text)
        if args.format in ("jsonl", "both"):
            sources.append(("JSON Lines file", work / "data.jsonl"))
            written += write_jsonl(work / "data.jsonl", args.size_mb, text)
        generated_at = time.time()
        print(f"generated {written / 1e6:,.0f} MB in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        # Trained on the generated text itself (every file is made of it): the same tokenizer for every --format.
        tok = tokenizers.train_tokenizer((text[i:i + 65536] for i in range(0, len(text), 65536)), 4096)
        tok.save_pretrained(work / "tokenizer")
        print(f"trained a byte-level BPE (vocab 4096) on {len(text) / 1e6:.0f} MB in "
              f"{time.perf_counter() - start:.1f} s")
        # Files younger than RACY_SECONDS are not put in the stat index (sources.py); real data is older.
        time.sleep(max(0.0, RACY_SECONDS + 1 - (time.time() - generated_at)))
        for name, source in sources:
            measure(name, source, work / "tokenizer", work / "cache")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
