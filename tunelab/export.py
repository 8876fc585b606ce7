"""`tunelab export`: a standalone HF model directory from a run, a model directory or a peft adapter.

An adapter is exported merged (`--merge`): the base is loaded (and checked against the hash the
adapter was trained on), peft folds the update (LoRA's B @ A, IA3's scales, ...) into the base
weights, and the result is an ordinary model that `AutoModelForCausalLM.from_pretrained` loads
without peft. Prompt-learning adapters (virtual tokens) and others peft cannot merge get a one-line
error saying so.
lineage.json records both parents by path and hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab import models
from tunelab.errors import ModelError, RunDirError
from tunelab.runs import file_sha256, staged_dir
from tunelab.tokenizers import load_tokenizer

FIELD = "RUN_OR_ADAPTER"


def resolve_source(source: str | Path) -> Path:
    """A run directory stands for its final/ model; anything else is used as given."""
    path = Path(source).expanduser()
    if (path / "final").is_dir() and not (path / "config.json").exists() and not models.is_adapter_dir(path):
        return path / "final"
    return path


def _absolute(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def export_model(source: str | Path, out: str | Path, merge: bool = False, base: str | None = None,
                 log=print) -> Path:
    src, out = resolve_source(source), Path(out).expanduser()
    models.check_exists(str(src), FIELD)
    # Checked before anything is loaded or written: an export never touches an existing directory.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out: {out} already exists and is not empty; choose a new directory")
    if models.is_adapter_dir(src):
        from tunelab.methods.peft_base import PEFT_LABELS, PROMPT_LEARNING

        peft_type = models.adapter_info(src).get("peft_type")
        if not merge and peft_type not in PROMPT_LEARNING:  # those are refused by load_adapter, saying why
            raise ModelError(f"{FIELD}: {src} is a {PEFT_LABELS.get(peft_type, peft_type)} adapter; pass --merge to "
                             "fold it into its base model (the adapter directory itself is already a portable "
                             "PEFT adapter)")
        model, base_path, base_hash = models.load_adapter(str(src), field=FIELD, merge=True, base=base)
        parents = [{"role": "base", "path": _absolute(base_path), "weights_sha256": base_hash},
                   {"role": "adapter", "path": _absolute(str(src)),
                    "sha256": file_sha256(src / "adapter_model.safetensors")}]
        merged = True
    else:
        if merge:
            log(f"{src} is a full model, not an adapter: nothing to merge, copying it")
        model = models.load_model(str(src), field=FIELD)
        parents = [{"role": "model", "path": _absolute(str(src)), "weights_sha256": models.weights_sha256(model)}]
        merged = False
    tokenizer = load_tokenizer(str(src), FIELD)

    # Written next to the target and renamed, so an interrupted export leaves no half directory at --out.
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        lineage = {"kind": "export", "parents": parents, "merged": merged}
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    log(f"exported {src} -> {out}" + (" (adapter merged into its base)" if merged else ""))
    return out
