"""Checkpoint averaging (LAWA): the math and the checks of the `average` stage (stages/average.py).

The uniform mean of the weights of a run's last K intact checkpoints (or of named steps) often
scores better than any one of them late in training. The checkpoints are read tensor by tensor
(safetensors.safe_open, memory-mapped): each tensor is summed in float32 over the inputs, divided
by K and cast back to its saved dtype, so peak memory is about one output model plus one tensor.
The key set is the inputs' own (a tied embedding/LM head is stored once, as save_model wrote it).

The output holds model.safetensors, config.json and the tokenizer (copied from the newest averaged
checkpoint, else from the run's final/) and lineage.json naming every checkpoint with its step,
the sha256 its manifest recorded and its weight.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError, ModelError, RunDirError

# Files of a checkpoint that are training state, not part of a model directory.
TRAINING_STATE = {"model.safetensors", "adapter.safetensors", "method.safetensors", "optimizer.pt", "rng.pt",
                  "state.json", "config.yaml", "manifest.json"}
MODEL_CONFIG = ("config.json", "generation_config.json")
DEFAULT_LAST = 3


def parse_steps(text: str) -> list[int]:
    """"200,300,400" -> [200, 300, 400] (sorted, unique)."""
    try:
        steps = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        raise ConfigError(f"--steps: {text!r} is not a comma-separated list of step numbers, e.g. 200,300,400") from None
    if not steps:
        raise ConfigError("--steps: give at least one step, e.g. --steps 200,300,400")
    return steps


def select_checkpoints(run: str | Path, last: int | None = None, steps: list[int] | None = None,
                       log=print) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints to average, oldest first: the newest `last` intact ones
    (corrupt or partial ones are reported and skipped), or exactly `steps`. One-line errors otherwise."""
    from tunelab.train.checkpoint import list_checkpoints, verify

    run = Path(run).expanduser()
    if not run.is_dir():
        raise RunDirError(f"RUN: {run} does not exist; give a run directory (runs/NAME) with checkpoints/")
    found = list_checkpoints(run / "checkpoints")
    if not found:
        raise RunDirError(f"RUN: {run} has no checkpoints/step-N directories; train it with train.checkpoint_every "
                          "set (and train.keep_checkpoints >= the number to average)")
    adapters = [p for _, p in found if (p / "adapter.safetensors").is_file()]
    if adapters:
        raise ModelError(f"RUN: {run} is an adapter run ({adapters[0].name} holds adapter.safetensors): averaging "
                         "adapters is not supported yet; export/merge them first (tunelab export --merge) and "
                         "average full models")
    by_step = dict(found)
    if steps is not None:
        chosen = []
        for step in steps:
            if step not in by_step:
                raise RunDirError(f"--steps: {run} has no checkpoint at step {step} (it has steps "
                                  f"{', '.join(str(s) for s, _ in reversed(found))})")
            problem = verify(by_step[step])
            if problem is not None:
                raise RunDirError(f"--steps: checkpoint {by_step[step]} is not intact ({problem}); leave step {step} out")
            chosen.append((step, by_step[step]))
        return chosen
    k = last or DEFAULT_LAST
    chosen = []
    for step, path in found:  # newest first
        problem = verify(path)
        if problem is not None:
            log(f"skipping checkpoint {path}: {problem}")
            continue
        chosen.append((step, path))
        if len(chosen) == k:
            return sorted(chosen)
    have = f"{len(chosen)} intact checkpoint{'s' * (len(chosen) != 1)}"
    if len(chosen) != len(found):
        have += f" ({len(found) - len(chosen)} more not intact)"
    raise RunDirError(f"--last {k}: {run} has only {have}; the run must keep them: train with "
                      f"train.keep_checkpoints >= {k} (and train.checkpoint_every set), or pass --last {len(chosen)}"
                      if chosen else f"--last {k}: {run} has no intact checkpoint ({len(found)} not intact)")


def check_compatible(files: list) -> list[str]:
    """The inputs' common tensor names (sorted); a one-line error naming the first that differs."""
    names = [Path(f[0]).parent.name for f in files]
    first_keys = set(files[0][1].keys())
    for (path, handle), name in zip(files[1:], names[1:]):
        keys = set(handle.keys())
        if keys != first_keys:
            extra = sorted(keys - first_keys)
            key = extra[0] if extra else sorted(first_keys - keys)[0]
            holder, lacker = (name, names[0]) if extra else (names[0], name)
            raise ModelError(f"checkpoints differ: {holder} has tensor {key} that {lacker} lacks; "
                             "average checkpoints of the same model only")
    keys = sorted(first_keys)
    for key in keys:
        ref = files[0][1].get_slice(key)
        ref_sig = (ref.get_shape(), ref.get_dtype())
        for (path, handle), name in zip(files[1:], names[1:]):
            sl = handle.get_slice(key)
            if (sl.get_shape(), sl.get_dtype()) != ref_sig:
                raise ModelError(f"checkpoints differ: tensor {key} is {sl.get_dtype()}{list(sl.get_shape())} in {name} "
                                 f"but {ref_sig[1]}{list(ref_sig[0])} in {names[0]}; average checkpoints of the same "
                                 "model only")
    return keys


def check_weight_files(weight_files: list[Path]) -> list[str]:
    """The common tensor names of safetensors files; a one-line error naming the first tensor that differs."""
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        return check_compatible([(str(p), stack.enter_context(safe_open(str(p), framework="pt")))
                                 for p in weight_files])


def average_files(weight_files: list[Path], out_file: Path) -> list[str]:
    """Uniform mean of safetensors files, streamed tensor by tensor; returns the tensor names.

    Floating tensors: float32 sum / K, cast back to the saved dtype. Other tensors (integer
    buffers) must be equal in every input and are copied.
    """
    from contextlib import ExitStack

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with ExitStack() as stack:
        files = [(str(p), stack.enter_context(safe_open(str(p), framework="pt"))) for p in weight_files]
        keys = check_compatible(files)
        k = len(files)
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            first = files[0][1].get_tensor(key)
            if not first.is_floating_point():
                for path, handle in files[1:]:
                    if not torch.equal(handle.get_tensor(key), first):
                        raise ModelError(f"checkpoints differ in non-float tensor {key} ({Path(path).parent.name}); "
                                         "it cannot be averaged")
                out[key] = first
                continue
            dtype, acc = first.dtype, first.to(torch.float32, copy=True)
            del first
            for _, handle in files[1:]:
                acc.add_(handle.get_tensor(key).to(torch.float32))
            out[key] = acc.div_(k).to(dtype)
            del acc
        metadata = dict(files[0][1].metadata() or {})
    metadata["format"] = "pt"  # transformers requires it
    save_file(out, str(out_file), metadata=metadata)
    return keys


def model_files(checkpoints: list[Path], final: Path) -> tuple[list[Path], Path | None, Path | None]:
    """Files to copy next to the weights: config.json (+ generation_config.json) and the tokenizer,
    from the newest averaged checkpoint, else from the run's final/, else from an older averaged checkpoint
    (checkpoints written before they carried config.json and the tokenizer)."""
    def config_from(d: Path) -> bool:
        return (d / "config.json").is_file()

    def tokenizer_from(d: Path) -> bool:
        return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()

    candidates = [checkpoints[-1], final, *reversed(checkpoints[:-1])]
    config_dir = next((d for d in candidates if config_from(d)), None)
    tok_dir = next((d for d in candidates if tokenizer_from(d)), None)
    files = []
    if config_dir is not None:
        files += [config_dir / n for n in MODEL_CONFIG if (config_dir / n).is_file()]
    if tok_dir is not None:
        files += [p for p in sorted(tok_dir.iterdir()) if p.is_file() and p.name not in TRAINING_STATE
                  and p.name not in MODEL_CONFIG and not p.name.endswith(".safetensors") and p.name != "lineage.json"
                  and not p.name.startswith(".")]
    return files, config_dir, tok_dir
