"""Tokenizers: train (byte-level BPE, cached), load, fingerprint, the special tokens the tokenizer puts
around a document (BOS/EOS), the chat template a run renders with, and vocabulary expansion that keeps
every existing id.

Named as DESIGN.md's library layer names it. Import it as `from tunelab import tokenizers`; inside this
file `from tokenizers import ...` is the PyPI package (imports are absolute). Keep the PyPI package's
uses here (eval/perplexity.py's byte alphabet is the one other), so the two never meet in one namespace.
A library leaf: it imports nothing of tunelab but errors and paths (data/, models.py, eval/ build on it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from tunelab.errors import ModelError
from tunelab.paths import adapter_base, check_exists, is_adapter_dir, resolve_model_path

SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}

# The template for a tokenizer without one (data/chat.py describes the rendering). Role markers are plain
# text, so no token is added; the only special token it needs is EOS.
BUILTIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- else %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


# ---------------------------------------------------------------- train and load


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style): any text round-trips, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def cached_tokenizer(where: Path, texts: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int,
                     log: Callable = print, on: str = ""):
    """The tokenizer saved at `where` (a cache entry named by the caller's key), trained on `texts()` and
    saved there first if it is not. Saved to a temporary folder and renamed: of two processes (DDP ranks)
    the loser uses the winner's. `on`: what it is trained on, for the log line."""
    if not (where / "tokenizer.json").is_file():
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}){on}")
        tok = train_tokenizer(texts(), vocab_size, min_frequency)
        tmp = where.with_name(f".tmp-{where.name}-{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            tmp.rename(where)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(str(where))


def load_tokenizer(path: str, field: str = "tokenizer.path"):
    """The tokenizer of a model directory, `package:NAME` model or hub id; a bare PEFT adapter's is its base's."""
    from transformers import AutoTokenizer

    check_exists(path, field)
    path = resolve_model_path(path, field)
    has_tokenizer = any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if is_adapter_dir(path) and not has_tokenizer:
        path = adapter_base(path, field)  # a bare PEFT adapter (not saved by us): its base's tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, **({"local_files_only": True} if Path(path).is_dir() else {}))
    except (OSError, ValueError) as err:
        raise ModelError(f"{field}: cannot load a tokenizer from {path} ({str(err).splitlines()[0]}); "
                         "give a directory with tokenizer.json") from None
    return tok


def _raw_backend(tokenizer):
    """The Rust tokenizer with truncation and padding off (copied if the caller left them on)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenizer_fingerprint(tokenizer) -> str:
    """The identity of a tokenizer: what it maps text to (the token cache and lineage key on it)."""
    import hashlib

    if getattr(tokenizer, "is_fast", False):
        blob = _raw_backend(tokenizer).to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- special tokens around a document


def encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> ids, without special tokens."""
    if getattr(tokenizer, "is_fast", False):
        backend = _raw_backend(tokenizer)
        # encode_batch_fast skips the character offsets we never use; same ids.
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return lambda texts: [e.ids for e in encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def eos_id(tokenizer) -> int:
    """The id written between packed documents (SEP for BERT-style tokenizers)."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ModelError("the tokenizer has no eos or sep token: add one (tokenizer.add_special_tokens) "
                     "so documents can be separated when packing")


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer itself adds before and after a text (a Llama BOS before,
    BERT's [CLS] before and [SEP] after; nothing for our byte-level BPE)."""
    if getattr(tokenizer, "is_fast", False):
        backend = _raw_backend(tokenizer)  # no padding or truncation to blur the comparison
        plain = backend.encode("x", add_special_tokens=False).ids
        full = backend.encode("x", add_special_tokens=True).ids
    else:
        plain = tokenizer(["x"], add_special_tokens=False)["input_ids"][0]
        full = tokenizer(["x"], add_special_tokens=True)["input_ids"][0]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []  # the text's own ids are not in there: nothing we could tell apart safely


def closing_tokens(suffix: list[int], eos_id: int) -> list[int]:
    """What ends every packed document: the suffix, ending with eos_id (packing finds document ends by it)."""
    if not suffix:
        return [int(eos_id)]
    return suffix if suffix[-1] == eos_id else suffix + [int(eos_id)]


# ---------------------------------------------------------------- chat template


def adopt_chat_template(tokenizer) -> tuple[str, bool]:
    """(template, adopted): the template this tokenizer renders chats with, its `chat_template` (the
    default of several named ones), else BUILTIN_TEMPLATE, which is then set on it (adopted=True).
    Whatever saves the tokenizer afterwards (any method's final/, an adapter, a checkpoint) so saves the
    template the data was rendered with, and plain apply_chat_template renders as training did."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return template, False
    tokenizer.chat_template = BUILTIN_TEMPLATE
    return BUILTIN_TEMPLATE, True


# ---------------------------------------------------------------- vocabulary expansion


def add_tokens(tokenizer, tokens: list[str]):
    """(a new tokenizer, {token: id}) with `tokens` (texts, e.g. " def") added to a BPE tokenizer as merges of
    lowest priority: every existing id stays, and a text whose new encoding uses no new token encodes exactly
    as before (new merges only apply after all old ones). A token the old tokenizer splits into n pieces comes
    with its n - 2 left-to-right prefixes as tokens too (ids in order of creation). One-line errors: a token
    that is already one, a non-BPE tokenizer, a token the pre-tokenizer splits (it could never be produced)."""
    from transformers import AutoTokenizer

    encode = encoder(tokenizer)
    with tempfile.TemporaryDirectory(prefix="tunelab-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        state = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model = state["model"]
        if model.get("type") != "BPE":
            raise ModelError(f"adding tokens needs a BPE tokenizer; this one's model is {model.get('type')}")
        vocab, merges = model["vocab"], model["merges"]
        pairs = not merges or isinstance(merges[0], list)  # tokenizers >= 0.20 writes [a, b], older "a b"
        next_id = max([*vocab.values(), *(t["id"] for t in state.get("added_tokens", []))]) + 1
        spelled, old, added = {}, set(vocab), set()
        for token, pieces in zip(tokens, encode(list(tokens))):
            if len(pieces) < 2:
                raise ModelError(f"new token {token!r} is {'already a token' if pieces else 'empty'}: "
                                 "list only texts the tokenizer splits")
            parts = tokenizer.convert_ids_to_tokens(pieces)
            merged = parts[0]
            for part in parts[1:]:  # a left-to-right chain of merges ending in the whole token
                if merged + part in old:  # a new merge making an old token would change old encodings
                    raise ModelError(f"new token {token!r}: {merged + part!r} is already a token that this text does "
                                     "not encode to; add a longer or shorter token")
                if (merged, part) not in added:
                    added.add((merged, part))
                    merges.append([merged, part] if pairs else f"{merged} {part}")
                merged += part
                if merged not in vocab:
                    vocab[merged], next_id = next_id, next_id + 1
            spelled[token] = merged
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        grown = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    ids = {token: vocab[merged] for token, merged in spelled.items()}
    new_encode = encoder(grown)
    for token, got in zip(tokens, new_encode(list(tokens))):
        if got != [ids[token]]:
            raise ModelError(f"new token {token!r} cannot be one token: the tokenizer's pre-tokenizer splits it "
                             f"({len(got)} pieces); add the parts separately")
    return grown, ids
