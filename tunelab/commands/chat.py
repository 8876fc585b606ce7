"""`tunelab chat MODEL_DIR`: talk to a model through its chat template.

The conversation is rendered and tokenized exactly as training rendered chat examples
(tunelab.data.chat: the tokenizer's chat_template, else the built-in one; each segment tokenized on
its own, the tokenizer's own prefix first), ending with the template's generation prompt. The reply
stops at EOS or at the template's end-of-turn text. Interactive: one user message per line of stdin
until EOF, the conversation kept; scriptable: `--message TEXT` once.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator

import torch

from tunelab import models, tokenizers
from tunelab.errors import ModelError


class Conversation:
    """A loaded model and tokenizer, the history, and `reply(user_text) -> assistant text`."""

    def __init__(self, model_dir: str, system: str | None = None, base: str | None = None, max_new_tokens: int = 128,
                 greedy: bool = False, temperature: float = 0.8, top_k: int = 50, log: Callable = print):
        from tunelab.data.chat import ChatRenderer

        self.tokenizer = tokenizers.load_tokenizer(model_dir, "MODEL_DIR")
        self.model = models.load_model(model_dir, field="MODEL_DIR", base=base).eval()
        if models.is_encoder(self.model):
            raise ModelError(f"{model_dir}: an encoder (masked LM) cannot generate text; use `tunelab eval` instead")
        self.renderer = ChatRenderer(self.tokenizer, where=model_dir)
        self.eos = tokenizers.eos_id(self.tokenizer)
        self.history: list[tuple[str, str]] = [("system", system)] if system else []
        self.max_new_tokens, self.greedy, self.temperature, self.top_k = max_new_tokens, greedy, temperature, top_k
        self.log = log
        if self.renderer.builtin:
            log(f"{model_dir}: no chat template in its tokenizer: using the built-in one")
        self.stop_text = self.renderer.stop_text
        stop_ids = self.tokenizer.encode(self.stop_text, add_special_tokens=False) if self.stop_text else []
        # An end of turn that is one token (EOS, <|im_end|>) stops generation by id; a longer one by its text.
        self.stop_ids = sorted({self.eos, *(stop_ids if len(stop_ids) == 1 else [])})
        self.stop_strings = [self.stop_text] if len(stop_ids) > 1 else []

    def prompt_ids(self) -> list[int]:
        """The history with the generation prompt, as training tokenized it; the oldest exchanges are dropped
        (with a note) when it does not leave room for a reply within the model's positions."""
        from tunelab.data.chat import encode_segments

        limit = models.max_positions(self.model)
        while True:
            segments = self.renderer.segments(self.history, add_generation_prompt=True)
            ids, _ = encode_segments(self.tokenizer, segments, close=False, eos_id=self.eos)
            if limit is None or len(ids) < limit:
                return ids
            users = [i for i, (role, _) in enumerate(self.history) if role == "user"]
            if len(users) < 2:
                raise ModelError(f"the message is {len(ids)} tokens with its template, beyond the model's {limit} "
                                 "positions: send a shorter one")
            first = users[0]
            self.history = self.history[:first] + self.history[users[1]:]
            self.log("note: the conversation no longer fits the model's positions: dropped its oldest exchange")

    @torch.no_grad()
    def reply(self, text: str) -> str:
        self.history.append(("user", text))
        ids = self.prompt_ids()
        limit = models.max_positions(self.model)
        new = self.max_new_tokens if limit is None else max(1, min(self.max_new_tokens, limit - len(ids)))
        sampling = {} if self.greedy else {"temperature": self.temperature, "top_k": self.top_k or None}
        extra = {"stop_strings": self.stop_strings, "tokenizer": self.tokenizer} if self.stop_strings else {}
        inputs = torch.tensor([ids])
        out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                                  do_sample=not self.greedy, eos_token_id=self.stop_ids, pad_token_id=self.eos,
                                  **sampling, **extra)
        answer = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        if self.stop_text and self.stop_text in answer:
            answer = answer[:answer.index(self.stop_text)]
        answer = answer.strip()
        self.history.append(("assistant", answer))
        return answer


def chat(model_dir: str, messages: Iterable[str], seed: int = 0, **options) -> Iterator[str]:
    """The reply to every non-blank message, in one conversation."""
    torch.manual_seed(seed)
    conversation = Conversation(model_dir, **options)
    for message in messages:
        if message.strip():
            yield conversation.reply(message.rstrip("\n"))


def stdin_messages(prompt: bool) -> Iterator[str]:
    """Lines of stdin until EOF; with `prompt` (a terminal) a "> " before each, on stderr."""
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line
