"""Hand-written run directories for the report tests: a small lifecycle with the files real runs write.

    base (pretrain from a preset on prose) -> cont (continued on code, forgetting tracked)
                                           -> lora (finetune, adapter)
    cont + lora -> soup (a merge: lineage.json with several parents, merge.json, no metrics)
    soup -> score (an eval stage)

The shapes (events, lineage fields) follow what tunelab writes; the numbers are made up, smooth and
deterministic.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

TOKENIZER = "4f92c3f7ee0a95a3db04665e6e0ad76dfe8535d39794f25f5eeb6f589b491a40"
PROSE = "f565d68c4a5d6872c0dc07d0b5909cc30cc83176093e19b85e2f3e20db011048"
CODE = "db36a7a884b185f49ccdd4297f5e592064957c318fbcc2fa06f12788d1ce66df"
TOKENS_PER_STEP = 4096


def _data(source: str, domain: str, digest: str, role: str = "train") -> dict:
    return {"source": source, "domain": domain, "weight": 1.0, "content_hash": digest, "cache_key": "0" * 64,
            "train_tokens": 1_000_000, "eval_tokens": 50_000, "decode_errors": 0, "spec": {"source": source},
            "role": role, "eval_fraction": 0.05}


def _fake_weights(directory: Path, shapes: dict[str, list[int]], name: str = "model.safetensors") -> None:
    """A safetensors file whose header is real (the report counts parameters from headers only)."""
    directory.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for tensor, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[tensor] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(directory / name, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(b"\0" * offset)


def write_run(path: Path, events: list[dict], lineage: dict | None, config: str = "name: x\n",
              env: dict | None = None, torn_last_line: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(e) for e in events]
    if torn_last_line:
        lines.append('{"event": "train", "step": 99, "lo')
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "config.yaml").write_text(config)
    if lineage is not None:
        (path / "lineage.json").write_text(json.dumps(lineage, indent=2))
    (path / "env.json").write_text(json.dumps(env or {"python": "3.11.7", "cpu": "test CPU", "cpu_count": 2,
                                                       "gpus": [], "world_size": 1,
                                                       "packages": {"torch": "2.13.0+cpu"},
                                                       "precision": {"used": "fp32", "why": "recipe"}}))
    return path


def curve(steps: int, log_every: int, eval_every: int, domains: dict[str, tuple[str, float, float]],
          start: float = 8.0, end: float = 4.0, lr: float = 1e-3, t0: float = 1000.0, eval_at_start: bool = False,
          params: int | None = 926_336, trainable: int | None = None) -> list[dict]:
    """Events of a run: a `model` event, train events every log_every steps, evals every eval_every steps.
    domains: {domain: (role, loss at start, loss at end)}; deltas from step 0 when eval_at_start."""
    events = []
    if params is not None:
        events.append({"event": "model", "parameters": params, "trainable": trainable or params, "method": "full",
                       "time": t0})
    first = {}
    for step in range(0, steps + 1):
        frac = step / steps
        if step and step % log_every == 0:
            events.append({"event": "train", "step": step, "tokens": step * TOKENS_PER_STEP,
                           "lr": lr * min(1.0, step / (0.1 * steps)) * (0.55 + 0.45 * math.cos(math.pi * frac)),
                           "loss": end + (start - end) * math.exp(-4 * frac) + 0.05 * math.sin(step),
                           "grad_norm": 1.0 + 0.3 * math.exp(-3 * frac), "tokens_per_s": 12000.0 + 100 * (step % 7),
                           "time": t0 + step * 0.5})
        if (step % eval_every == 0 and (step or eval_at_start)) or step == steps:
            for domain, (role, a, b) in domains.items():
                loss = a + (b - a) * (1 - math.exp(-3 * frac))
                event = {"event": "eval", "step": step, "tokens": step * TOKENS_PER_STEP, "domain": domain,
                         "loss": loss, "ppl": math.exp(loss), "bpb": loss / 2.1, "eval_tokens": 16384, "role": role,
                         "time": t0 + step * 0.5 + 0.2}
                if eval_at_start:
                    first.setdefault(domain, (loss, loss / 2.1))
                    event["delta_from_start"] = loss - first[domain][0]
                    event["bpb_delta_from_start"] = loss / 2.1 - first[domain][1]
                events.append(event)
    return events


def make_lifecycle(root: Path) -> dict[str, Path]:
    """The runs above under root (a pipeline's output folder); returns {name: path given to the report}."""
    base = write_run(root / "base", curve(200, 10, 50, {"prose": ("target", 7.9, 4.2), "code": ("reference", 8.0, 5.6)}),
                     {"name": "base", "stage": "pretrain",
                      "parents": [{"role": "init", "kind": "preset", "preset": "llama-tiny", "overrides": {},
                                   "weights_sha256_in_memory": "2cb3234e" + "0" * 56}],
                      "tokenizer": {"source": "trained", "fingerprint": TOKENIZER},
                      "data": [_data("builtin:prose", "prose", PROSE)], "method": {"name": "full", "options": {}}},
                     config="name: base\ntrain:\n  max_steps: 200\n  precision: fp32\n")
    _fake_weights(base / "final", {"embed": [4096, 128], "layers.0.w": [128, 512]})
    from_base = {"kind": "local", "path": str((base / "final").resolve()), "run": str(base.resolve()),
                 "weights_sha256": "a1b2c3d4" + "e" * 56}
    cont = write_run(root / "cont", curve(100, 10, 25, {"code": ("target", 5.6, 3.9), "prose": ("reference", 4.2, 4.6)},
                                          start=5.0, end=3.9, lr=3e-3, t0=2000.0, eval_at_start=True),
                     {"name": "cont", "stage": "pretrain",
                      "parents": [{**from_base, "role": "init", "checkpoint": str(base / "checkpoints/step-200"),
                                   "checkpoint_step": 200}],
                      "tokenizer": {"source": str(base / "final"), "fingerprint": TOKENIZER},
                      "data": [_data("builtin:code", "code", CODE), _data("builtin:prose", "prose", PROSE, "replay")],
                      "method": {"name": "full", "options": {}}},
                     config="name: cont\ninit_from: base\ntrain:\n  precision: fp32\n")
    _fake_weights(cont / "final", {"embed": [4096, 128], "layers.0.w": [128, 512]})
    lora = write_run(root / "lora", curve(60, 5, 20, {"code": ("target", 5.6, 4.5), "prose": ("reference", 4.2, 4.3)},
                                          start=5.2, end=4.5, t0=3000.0, eval_at_start=True, trainable=20_480),
                     {"name": "lora", "stage": "finetune", "parents": [{**from_base, "role": "init"}],
                      "tokenizer": {"source": str(base / "final"), "fingerprint": TOKENIZER},
                      "data": [_data("builtin:code", "code", CODE)], "method": {"name": "lora", "options": {"r": 8}}},
                     config="name: lora\nmethod:\n  name: lora\ntrain:\n  precision: fp32\n")
    _fake_weights(lora / "final", {"lora_A": [8, 128], "lora_B": [128, 8]}, name="adapter_model.safetensors")
    soup = root / "soup" / "final"
    _fake_weights(soup, {"embed": [4096, 128], "layers.0.w": [128, 512]})
    (root / "soup" / "stage.json").write_text(json.dumps({"key": "k", "kind": "merge", "status": "done"}))
    (soup / "lineage.json").write_text(json.dumps({
        "name": "soup", "stage": "merge",
        "parents": [{"role": "merge-input", "path": str((cont / "final").resolve()), "label": "cont",
                     "weights_sha256": "c0ffee00" + "1" * 56, "weight": 0.5},
                    {"role": "merge-input", "path": str((lora / "final").resolve()), "label": "lora",
                     "weights_sha256": "beef0000" + "2" * 56, "weight": 0.5},
                    {"role": "base", "path": str((base / "final").resolve()), "label": "base",
                     "weights_sha256": "a1b2c3d4" + "e" * 56, "weight": None}],
        "method": {"name": "ties", "options": {"density": 0.5}},
        "tokenizer": {"source": str(cont / "final"), "fingerprint": TOKENIZER}}))
    (soup / "merge.json").write_text(json.dumps({
        "name": "soup", "method": {"name": "ties"}, "recipe": {"kind": "merge", "method": "ties", "models": ["cont", "lora"]},
        "eval": {"scores": {"cont": {"code": {"loss": 3.9, "bpb": 1.86}, "prose": {"loss": 4.6, "bpb": 2.19}},
                            "lora": {"code": {"loss": 4.5, "bpb": 2.14}, "prose": {"loss": 4.3, "bpb": 2.05}},
                            "merge": {"code": {"loss": 4.1, "bpb": 1.95}, "prose": {"loss": 4.35, "bpb": 2.07}}}}}))
    score = root / "score"
    score.mkdir()
    (score / "eval.json").write_text(json.dumps({"code": {"loss": 4.1, "ppl": 60.3, "bpb": 1.95, "split": "held-out"},
                                                 "prose": {"loss": 4.35, "ppl": 77.5, "bpb": 2.07, "split": "held-out"}}))
    return {"base": base, "cont": cont, "lora": lora, "soup": soup, "score": score / "eval.json"}


def make_many(root: Path) -> dict[str, Path]:
    """Fourteen runs under root, the size where the report's layout used to fail: a base, four continuations,
    a further one, two adapters, SFT, DPO (written by an older tunelab: `method: dpo`), SimPO (`objective:`),
    an MLM run, a merge and a pruned model (masks.safetensors beside its weights) scored by an eval stage whose
    eval.json names it. The learning rate (3e-3 and below) has tick labels like 0.0025."""
    domains = ("prose", "code", "math", "legal")
    runs: dict[str, Path] = {}

    def lineage(name: str, parent: Path | None, data: list[str], method: str = "full", stage: str = "pretrain") -> dict:
        parents = ([{"role": "init", "kind": "local", "path": str((parent / "final").resolve()), "run": str(parent.resolve()),
                     "weights_sha256": hashlib_hex(name)}] if parent else
                   [{"role": "init", "kind": "preset", "preset": "llama-tiny", "overrides": {}}])
        return {"name": name, "stage": stage, "parents": parents, "tokenizer": {"source": "trained", "fingerprint": TOKENIZER},
                "data": [_data(f"builtin:{d}", d, hashlib_hex(d)) for d in data], "method": {"name": method, "options": {}}}

    def run(name: str, parent: Path | None, target: str, config: str, method: str = "full", start: float = 8.0,
            end: float = 4.0, stage: str = "pretrain", lr: float = 3e-3) -> Path:
        evals = {d: ("target" if d == target else "reference", 6.0 + i * 0.3, 4.0 + i * 0.2) for i, d in enumerate(domains)}
        path = write_run(root / name, curve(100, 10, 25, evals, start=start, end=end, lr=lr, eval_at_start=parent is not None),
                         lineage(name, parent, [target], method, stage), config=config)
        _fake_weights(path / "final", {"embed": [4096, 128], "layers.0.w": [128, 512]})
        runs[name] = path
        return path

    base = run("base-prose-pretrain", None, "prose", "name: base\ntrain:\n  lr: 3.0e-3\n")
    conts = [run(f"continued-{d}-replay", base, d, "name: c\n") for d in ("code", "math", "legal")]
    run("continued-code-plain", base, "code", "name: p\n")
    run("continued-code-replay-long", conts[0], "code", "name: l\n")
    for cont in conts[:2]:
        run(f"{cont.name}-lora", cont, cont.name.split("-")[1], "name: a\nmethod:\n  name: lora\n", method="lora",
            stage="finetune")
    sft = run("sft-chat", base, "prose", "name: s\n", stage="finetune")
    run("dpo-old-shape", sft, "prose", "name: d\nmethod:\n  name: dpo\n  options:\n    tuning: {name: lora}\n"
        "train:\n  objective: clm\n", method="dpo", start=0.6931, end=0.52, stage="finetune")
    run("simpo-new-shape", sft, "prose", "name: n\nobjective:\n  name: simpo\nmethod:\n  name: full\n",
        start=1.4, end=0.9, stage="finetune")
    run("mlm-encoder", None, "prose", "name: m\ntrain:\n  objective: mlm\n", start=9.0, end=5.5)
    soup = root / "soup" / "final"
    _fake_weights(soup, {"embed": [4096, 128], "layers.0.w": [128, 512]})
    (soup / "lineage.json").write_text(json.dumps({
        "name": "soup", "stage": "merge", "method": {"name": "ties", "options": {}}, "tokenizer": {"fingerprint": TOKENIZER},
        "parents": [{"role": "merge-input", "path": str((c / "final").resolve()), "weights_sha256": hashlib_hex(c.name),
                     "weight": 1 / 3, "checkpoint_step": 100} for c in conts]}))  # labels wider than the gap
    (soup / "merge.json").write_text(json.dumps({"name": "soup", "recipe": {"kind": "merge", "method": "ties"}}))
    pruned = root / "pruned" / "final"
    _fake_weights(pruned, {"embed": [4096, 128], "layers.0.w": [128, 3136], "norm": [640]})  # 926,336 parameters
    _fake_weights(pruned, {"layers.0.w": [128, 3136]}, name="masks.safetensors")  # 401,408 mask entries
    (pruned / "lineage.json").write_text(json.dumps({
        "name": "pruned", "stage": "prune", "method": {"name": "wanda", "options": {}}, "tokenizer": {"fingerprint": TOKENIZER},
        "parents": [{"role": "pruned-from", "path": str(soup.resolve()), "weights_sha256": hashlib_hex("soup")}]}))
    (pruned / "prune.json").write_text(json.dumps({"name": "pruned", "recipe": {"kind": "prune", "method": "wanda"}}))
    runs.update(soup=soup, pruned=pruned)
    score = root / "score"
    score.mkdir()
    (score / "eval.json").write_text(json.dumps({
        "prose": {"loss": 4.4, "ppl": 81.5, "bpb": 2.1, "split": "held-out"},
        "model": {"path": str(pruned.resolve()), "weights_sha256": hashlib_hex("pruned")}}))
    return runs


def hashlib_hex(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
