"""`tunelab export`: a standalone HF model directory from a run, a model directory or a peft adapter.

An adapter is exported merged (`--merge`): the base is loaded (and checked against the hash the
adapter was trained on), peft folds the update (LoRA's B @ A, IA3's scales, ...) into the base
weights, and the result is an ordinary model that `AutoModelForCausalLM.from_pretrained` loads
without peft. Prompt-learning adapters (virtual tokens) and others peft cannot merge get a one-line
error saying so. It runs in the operation scaffold (ops/operation.py); lineage.json records both parents.
"""

from __future__ import annotations

from pathlib import Path

from tunelab import models
from tunelab.errors import ModelError
from tunelab.ops import operation
from tunelab.runs import weight_files_sha256

FIELD = "RUN_OR_ADAPTER"


def export_model(source: str | Path, out: str | Path, merge: bool = False, base: str | None = None,
                 log=print) -> Path:
    out, _ = operation.output_dir(out, "export", "export", False, log)  # checked before anything is loaded
    (item,) = operation.resolve_inputs([(str(source), "model", FIELD)])
    if item.adapter:
        from tunelab.adapters import PEFT_LABELS, PROMPT_LEARNING

        peft_type = models.adapter_info(item.path).get("peft_type")
        if not merge and peft_type not in PROMPT_LEARNING:  # those are refused by load_adapter, saying why
            raise ModelError(f"{FIELD}: {item.path} is a {PEFT_LABELS.get(peft_type, peft_type)} adapter; pass --merge "
                             "to fold it into its base model (the adapter directory itself is already a portable "
                             "PEFT adapter)")
    elif merge:
        log(f"{item.path} is a full model, not an adapter: nothing to merge, copying it")
    with operation.staged_output(out) as (staged, work):
        operation.materialize(item, work, log, copy=True, base=base)
        for file in item.model_dir.iterdir():
            file.rename(staged / file.name)
        parents = [operation.parent_entry(item)]
        if item.adapter:  # the base it was merged onto, and the adapter
            base_dir = Path(item.info["adapter_base"]["path"])
            parents = [{"role": "base", **item.info["adapter_base"],
                        "weights_sha256": weight_files_sha256(base_dir) if base_dir.is_dir() else None},
                       {**{k: v for k, v in parents[0].items() if k != "adapter_base"}, "role": "adapter"}]
        operation.write_records(staged, "export", out.name, parents, merged=item.adapter)
    log(f"exported {item.path} -> {out}" + (" (adapter merged into its base)" if item.adapter else ""))
    return out
