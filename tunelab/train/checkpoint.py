"""Atomic checkpoints and exact resume.

`checkpoints/step-N/` holds everything needed to continue the very same run:
    model.safetensors   all model weights (+ config.json and the tokenizer: a plain HF model dir), or
    adapter.safetensors only the method's own tensors (an adapter: Method.weights_to_save), with
                        the base weights' sha256 in state.json, checked on resume
    method.safetensors  the method's tensor state (masks, index sets), when it has any
    optimizer.pt        optimizer state (tensors only: loads with weights_only=True); absent for
                        methods without an optimizer (zeroth-order)
    rng.pt              every process's torch (CPU + CUDA) RNG state; python/numpy ones in state.json
    state.json          step, tokens, data-loader state, method state, world size, aux-model hashes
    config.yaml         the resolved recipe
    manifest.json       size + sha256 of every file above, written last

A checkpoint is written into `.tmp-step-N-<pid>/` and renamed into place, so a crash at any
moment leaves either the old set of checkpoints or the new one, never a half-written `step-N`.
On resume, a checkpoint whose manifest is missing or does not match its files is skipped with
a message, never loaded. Only rank 0 writes and decides which checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import RunDirError
from tunelab.runs import file_sha256

REQUIRED = ("rng.pt", "state.json", "config.yaml")
WEIGHTS = ("model.safetensors", "adapter.safetensors")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict]:
    """(tensors for rng.pt, JSON-able python/numpy states for state.json)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, pos, has_gauss, g = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, g))


def save_checkpoint(ckpt_root: Path, step: int, *, model, optimizer, method, state: dict, config_yaml: str,
                    rng: list, keep: int, base_sha256: str | None = None, tokenizer=None) -> Path:
    """Write step-N atomically. `rng` holds every process's rng_state() (rank order).

    A full-weights checkpoint also gets the model's config.json (and the tokenizer, when given), so
    it is a plain HF model directory: `tunelab eval`, `init_from`, averaging and transformers load it.
    """
    from safetensors.torch import save_file, save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        adapter = method.weights_to_save(model)
        if adapter is None:
            # save_model handles tied weights (embeddings shared with the LM head) that save_file rejects.
            save_model(model, str(tmp / "model.safetensors"))
            model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
            state = {**state, "base_weights_sha256": base_sha256}
        tensors = method.tensor_state()
        if tensors:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "method.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save([tensors_ for tensors_, _ in rng], tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": [plain for _, plain in rng]}))
        (tmp / "config.yaml").write_text(config_yaml)
        manifest = {}
        for path in sorted(tmp.iterdir()):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            manifest[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
    except BaseException:  # a failed save leaves no debris; older checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step after a resume: replace it, still never leaving a gap
        old = ckpt_root / f".old-step-{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(ckpt_root)
    _prune(ckpt_root, keep)
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory, newest first."""
    found = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                found.append((int(p.name[5:]), p))
    return sorted(found, reverse=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    for _, path in list_checkpoints(ckpt_root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    # Temp dirs of writers killed mid-save are garbage (ours was renamed already; only rank 0 writes).
    for p in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else why not."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (partially written)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest.json is corrupt"
    missing = [n for n in REQUIRED if n not in manifest]
    if missing or not any(n in manifest for n in WEIGHTS):
        return f"{(missing or ['the weights'])[0]} is not in the manifest"
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has the wrong size"
        if file_sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact(ckpt_root: Path, log=print) -> Path | None:
    # A kill between the two renames of a re-save leaves the intact old copy under .old-step-N-*.
    for old in sorted(ckpt_root.glob(".old-step-*")) if ckpt_root.is_dir() else []:
        step = old.name.split("-")[2]
        if not (ckpt_root / f"step-{step}").exists():
            old.rename(ckpt_root / f"step-{step}")
    for step, path in list_checkpoints(ckpt_root):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


@dataclass
class Restored:
    step: int
    state: dict


def load_checkpoint(path: Path, model, method, *, rank: int = 0, world: int = 1, base_sha256: str | None = None,
                    aux_hashes: dict | None = None, log=print) -> Restored:
    """Weights, method state and this process's RNG from `path` (the optimizer: load_optimizer)."""
    from safetensors.torch import load_file, load_model

    state = json.loads((path / "state.json").read_text())
    adapter = (path / "adapter.safetensors").is_file()
    if adapter and state.get("base_weights_sha256") != base_sha256:
        raise RunDirError(f"{path} holds an adapter trained on other base weights (sha256 "
                          f"{str(state.get('base_weights_sha256'))[:12]}..., this recipe's base {str(base_sha256)[:12]}...): "
                          "resume with the run's own model.path")
    for name, saved in state.get("aux", {}).items():
        now = (aux_hashes or {}).get(name)
        if now != saved["sha256"]:
            raise RunDirError(f"{path}: the method's {name} model ({saved['reference']}) changed since the "
                              "checkpoint (its sha256 differs): resume with the same one")
    try:
        if adapter:
            method.load_weights(model, load_file(str(path / "adapter.safetensors")))
        else:
            load_model(model, str(path / "model.safetensors"))
        if (path / "method.safetensors").is_file():
            method.load_tensor_state(load_file(str(path / "method.safetensors")))
        method.load_state_dict(state.get("method", {}))
    except (RuntimeError, ValueError, KeyError, NotImplementedError) as err:
        raise RunDirError(f"{path} does not fit the model/method built from the recipe "
                          f"({str(err).splitlines()[0][:160]}): resume with the run's own config.yaml, "
                          "or start a new run with --out DIR") from None
    rng_tensors, rng_plain = torch.load(path / "rng.pt", weights_only=True), state.pop("rng")
    if rank < len(rng_tensors):
        set_rng_state(rng_tensors[rank], rng_plain[rank])
    if len(rng_tensors) != world:
        log(f"warning: {path} was saved by {len(rng_tensors)} process(es), this run has {world}: data order and "
            "weights continue exactly, random draws (dropout) do not")
    return Restored(step=state["step"], state=state)


def load_optimizer(path: Path, optimizer, what: str = "resume") -> None:
    if optimizer is None:
        return
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        for group in optimizer.param_groups:  # load_state_dict checks group sizes, not the tensors' shapes
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"its {name} has shape {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as err:
        fix = ("resume with the run's own config.yaml" if what == "resume" else
               "use the same method and model as that run, or set init_optimizer: false")
        raise RunDirError(f"{path}: the optimizer state does not fit this run ({str(err).splitlines()[0][:160]}): "
                          f"{fix}") from None


def carry_optimizer_moments(path: Path, optimizer, mmap: bool = False) -> dict:
    """init_optimizer: the moments another run kept for a parameter of the same name go to that parameter;
    the rest of this run's trainable parameters start fresh (the other run froze them: full fine-tuning
    after LISA, HFT or sparse fine-tuning). This run's own hyperparameters (lr, betas, weight decay) stay.
    Returns {"carried": n, "fresh": m} (tensors). `mmap`: the file is mapped, not read, for a check that
    looks only at names and shapes (the moments of a throwaway optimizer)."""
    where = f"init_optimizer: {path / 'optimizer.pt'}"
    try:
        saved = torch.load(path / "optimizer.pt", weights_only=True, mmap=mmap)
    except (RuntimeError, OSError, EOFError) as err:
        raise RunDirError(f"{where} cannot be read ({str(err).splitlines()[0][:120]}): point init_from at an "
                          "intact checkpoint, or set init_optimizer: false") from None
    if any("param_names" not in g for g in saved["param_groups"]):  # written before names were kept
        load_optimizer(path, optimizer, what="init_optimizer")
        return {"carried": sum(len(g["params"]) for g in optimizer.param_groups), "fresh": 0}
    hyper = lambda g: sorted(set(g) - {"params", "param_names"})  # noqa: E731  (the optimizer's own settings)
    now = optimizer.state_dict()
    if hyper(saved["param_groups"][0]) != hyper(now["param_groups"][0]):
        raise RunDirError(f"{where} belongs to another optimizer than this run's train.optimizer "
                          f"({type(optimizer).__name__}): use that run's optimizer, or set init_optimizer: false")
    by_name = {name: saved["state"][i] for g in saved["param_groups"]
               for name, i in zip(g["param_names"], g["params"]) if i in saved["state"]}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    carried = 0
    for g in now["param_groups"]:
        for name, i in zip(g["param_names"], g["params"]):
            state = by_name.get(name)
            if state is None:
                continue
            moment = next((v for v in state.values() if torch.is_tensor(v) and v.dim() > 0), None)
            if moment is not None and moment.shape != params[i].shape:
                raise RunDirError(f"{where}: its moments of {name} have shape {tuple(moment.shape)}, this run's "
                                  f"parameter {tuple(params[i].shape)}: use the same model, or set init_optimizer: "
                                  "false")
            now["state"][i] = state
            carried += 1
    if carried == 0:
        theirs, ours = next(iter(by_name), "nothing"), now["param_groups"][0]["param_names"][0]
        raise RunDirError(f"{where} holds moments for none of this run's trainable parameters (it trained e.g. "
                          f"{theirs}; this run trains e.g. {ours}): use the same method as that run, or set "
                          "init_optimizer: false")
    optimizer.load_state_dict(now)  # torch puts each moment on its parameter's device and dtype
    return {"carried": carried, "fresh": len(params) - carried}


def load_data_state(path: Path, batches) -> None:
    """Continue another run's data stream (an anneal branch): its data must be this run's data."""
    state = json.loads((path / "state.json").read_text())
    try:
        batches.load_state_dict(state["data"])
    except (RunDirError, KeyError, ValueError, IndexError) as err:
        raise RunDirError(f"init_data_state: {path}'s data position does not fit this recipe's data ({err}); use "
                          "the same data.train/replay as that run, or set init_data_state: false") from None
    # The position and the weights reached carry over (source_tokens counts the whole stream, the parent's draws
    # included); the mixture phases are this run's own.
    if hasattr(batches, "phase"):
        batches.phase = 0
