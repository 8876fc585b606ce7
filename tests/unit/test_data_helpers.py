"""Shared by the data tests: small tokenizers trained in milliseconds, text, folders, decoding.

(No tests here; the name only follows the data tests' naming.)
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path

import numpy as np

WORDS = "alpha beta gamma delta token cache eval train split mixture packing window source domain".split()


def make_text(rng: random.Random, lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(lines))


def make_code(rng: random.Random, blocks: int) -> str:
    """Indentation, blank lines, CRLF: where a careless cut between chunks would change the tokens."""
    return "".join(make_text(rng, 3) + "\n    " + make_text(rng, 2) + rng.choice(["\n\n", "\r\n", "\n", "  \n"])
                   for _ in range(blocks))


@functools.lru_cache(maxsize=None)
def _trained_backend_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>", "[CLS]", "[SEP]"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(rng, 50) for _ in range(10)] + [make_code(rng, 20)], trainer=trainer)
    return tok.to_str()


def byte_level_tokenizer(post: str | None = None):
    """A byte-level BPE with a few hundred tokens and an <|endoftext|> EOS. post="bos": its post-processor
    puts <s> before every text (as a hub Llama's does); post="bert": [CLS] before and [SEP] after."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_backend_json())
    if post == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    if post == "bert":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def write_docs(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def age(root: Path, seconds: float = 60) -> None:
    """Date the files under `root` back: a file modified in the last seconds is not put in the stat index
    (it could change again within one timestamp tick), and tests want the index used at once."""
    then = time.time_ns() - int(seconds * 1e9)
    for path in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
        os.utime(path, ns=(then, then))


def decode_documents(tokenizer, tokens, eos_id: int | None = None) -> list[str]:
    """Tokens -> texts, cut at each EOS (every document ends with one)."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    ids = np.asarray(tokens).tolist()
    assert ids and ids[-1] == eos
    docs, current = [], []
    for i in ids:
        if i == eos:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    return docs
