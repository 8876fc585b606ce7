"""What the seeded experiment scripts (exp_lottery.py, exp_merge.py, exp_preference.py) share: their command
line (--smoke, --write), the offline environment, the mean ± std format and writing their RESULTS.md part."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "out" / "cache"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SEEDS = (0, 1, 2)


def start(doc: str, name: str):
    """Parse --smoke / --write, set the offline environment; (args, k: the step scaler, seeds, output root)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Steps / 10, seed 0, prints only.")
    parser.add_argument("--write", action="store_true", help="Write the tables into benchmarks/RESULTS.md.")
    args = parser.parse_args()
    os.environ["TUNELAB_CACHE"] = str(CACHE)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    k = (lambda n: max(1, round(n / 10))) if args.smoke else (lambda n: n)
    root = ROOT / "benchmarks" / "out" / (f"{name}-smoke" if args.smoke else name)
    return args, k, ([0] if args.smoke else list(SEEDS)), root


def fmt(values: list[float], digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """One value, or mean ± sample std over seeds."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f}{unit} ± {statistics.stdev(values):.{digits}f}"


def write_section(marker: str, text: str) -> None:
    """Replace RESULTS.md's part between <!-- marker:start --> and <!-- marker:end --> (append it if absent)."""
    begin, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    md = RESULTS_MD.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in md:
        md = md[:md.index(begin)] + block + md[md.index(end) + len(end):]
    else:
        md = md.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(md)


def run_experiment(doc: str, name: str, marker: str, run_seed, render) -> None:
    """The whole script: `run_seed(seed, root, k) -> result` for every seed, results.json, the table printed and
    (--write) written into RESULTS.md by `render(per_seed, seeds) -> markdown`."""
    args, k, seeds, root = start(doc, name)
    per_seed = {}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed] = run_seed(seed, root, k)
    (root / "results.json").write_text(json.dumps(per_seed, indent=2))
    table = render(per_seed, seeds)
    print("\n" + table)
    if args.write and not args.smoke:
        write_section(marker, table)
        print("wrote benchmarks/RESULTS.md")
