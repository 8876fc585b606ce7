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
