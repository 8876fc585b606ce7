"""Instruction data: chat examples, and their rendering into (text, loss) segments with a chat template.

A source with `format: chat` holds one example per row, in any of these forms:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}                 (or "completion"; optional "system")
    {"instruction": "...", "input": "...", "output": "..."}   ("input" optional; optional "system")

Each becomes a `Chat` (roles and contents, nothing rendered yet): the source's content hash and its
held-out split depend on the examples only, never on the template, so one example is held out for
every model. The token cache renders it with the tokenizer's template (`ChatRenderer`) into
segments: everything is context (loss false) except the assistant turns (all of them, or the last
only), each of which is its content plus the template's end-of-turn text, so the model learns to
stop. The segments are tokenized one by one (data/encode.py), so a mask is exact to the token: a
BPE merge never crosses a boundary between what is trained on and what is not.

The template is the tokenizer's own `chat_template` when it has one, else tunelab.tokenizers.BUILTIN_TEMPLATE:

    <|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n{answer}<|endoftext|><|user|>\\n...

where <|endoftext|> is the tokenizer's EOS token. The role markers are plain text: a tokenizer that
lacks them as tokens spells them in a few ordinary tokens, so no token is added and no embedding
row is resized (a new row would start untrained, and stay frozen under LoRA). The only special token
the template needs is EOS, which every tunelab tokenizer has. Rendering makes the template the
tokenizer's own (tokenizers.adopt_chat_template), so every run that renders chats, whatever its method or
objective, saves the template it used with the tokenizer (chat_template.jinja): `tunelab chat`, and
transformers' `apply_chat_template`, render conversations exactly as training did.

Segments are cut where the template's own output says an assistant turn starts and ends: for turn
i, the rendering of messages[:i] with the generation prompt ends where the reply starts, and the
rendering of messages[:i+1] ends where it ends; both must be prefixes of the whole rendering (true of
the common templates; a template that rewrites earlier turns is refused). Inference (`tunelab chat`)
renders the history plus the generation prompt with the same cuts, so a prompt is tokenized exactly
as the same conversation was in training.

A source with `format: preference` holds one `PreferencePair` per row (the prompt and two replies,
`pair_from_row` lists the forms). The token cache renders each pair as two documents, the prompt with
the chosen reply and the prompt with the rejected one, each with `assistant_turns="last"`: the loss
mask covers exactly the reply whose log-probability the preference methods compare.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from tunelab.errors import DataError
from tunelab.tokenizers import adopt_chat_template, closing_tokens, encoder, special_tokens

ROLES = ("system", "user", "assistant")
# Bump when rendering changes (segment cuts, stripping), so token caches made by older code are not reused.
CHAT_VERSION = 1

# Row fields a chat reader looks at (parquet and HF datasets read only these columns).
CHAT_FIELDS = ("messages", "system", "prompt", "response", "completion", "instruction", "input", "output")

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Chat:
    """One instruction example: its messages, unrendered."""

    messages: tuple[Message, ...]

    def text(self) -> str:
        """A plain rendering, independent of any tokenizer: what the held-out rule hashes and a tokenizer
        trained on this source sees."""
        return "".join(f"<|{role}|>\n{content}\n" for role, content in self.messages)


def _text_field(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field {key!r} holds a {type(value).__name__}, not text")


def _messages(raw, where: str, key: str = "messages") -> list[Message]:
    if not isinstance(raw, list):
        raise DataError(f"{where}: {key!r} must be a list of {{\"role\", \"content\"}} objects")
    messages = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            what = f"message {i}" if key == "messages" else f"{key} message {i}"
            raise DataError(f"{where}: {what} is not {{\"role\": system|user|assistant, \"content\": "
                            f"\"text\"}} (got {json.dumps(m)[:80]})")
        messages.append((role, content))
    return messages


def chat_from_row(row, where: str) -> Chat:
    """A row (a dict) as a Chat; a one-line DataError naming `where` (file:line) when it is not one."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a chat example must be a JSON object, not a {type(row).__name__}")
    if row.get("messages") is not None:
        messages = _messages(row["messages"], where)
    else:
        system = _text_field(row, "system", where)
        prompt, response = _text_field(row, "prompt", where), _text_field(row, "response", where)
        response = response if response is not None else _text_field(row, "completion", where)
        instruction, output = _text_field(row, "instruction", where), _text_field(row, "output", where)
        if prompt is not None and response is not None:
            user, reply = prompt, response
        elif instruction is not None and output is not None:
            extra = _text_field(row, "input", where)
            user, reply = (f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction), output
        else:
            has = ", ".join(map(str, row)) or "nothing"
            raise DataError(f"{where}: not a chat example (has: {has}); a row needs 'messages', 'prompt' + "
                            "'response', or 'instruction' + 'output'")
        messages = ([("system", system)] if system else []) + [("user", user), ("assistant", reply)]
    if not any(role == "assistant" for role, _ in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to train on; add the reply or remove the example")
    return Chat(tuple(messages))


# ---------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class PreferencePair:
    """A preference example: the conversation so far and two replies to it, the preferred one first."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def text(self) -> str:
        """What the held-out rule hashes: the prompt and the chosen reply, as Chat.text() writes that chat, so a
        pair is held out exactly when the instruction example of its prompt and chosen reply is (SFT on those,
        then preference tuning, never scores on a reply either stage trained on)."""
        return Chat(self.prompt + (("assistant", self.chosen),)).text()

    def conversations(self) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """The prompt followed by the chosen reply, and by the rejected one."""
        return self.prompt + (("assistant", self.chosen),), self.prompt + (("assistant", self.rejected),)


# Row fields a preference reader looks at (parquet and HF datasets read only these columns).
PREFERENCE_FIELDS = ("prompt", "messages", "system", "chosen", "rejected")


def _reply(row: dict, key: str, where: str) -> str | list[Message]:
    value = row.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, key)
    raise DataError(f"{where}: {key!r} must be the reply's text or a list of messages"
                    + ("" if key in row else f" (missing; the row has: {', '.join(map(str, row)) or 'nothing'})"))


def pair_from_row(row, where: str) -> PreferencePair:
    """A row as a PreferencePair; a one-line DataError naming `where` (file:line) when it is not one.

    Forms: {"prompt": str, "chosen": str, "rejected": str} (optional "system"); {"messages": [...], "chosen",
    "rejected"} or {"prompt": [...messages], ...}, the replies as text or as one assistant message (TRL's
    conversational form); or {"chosen": [...], "rejected": [...]}: two whole conversations that differ only
    in their last (assistant) message, whose common start is the prompt."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a preference pair must be a JSON object, not a {type(row).__name__}")
    chosen, rejected = _reply(row, "chosen", where), _reply(row, "rejected", where)
    prompt_value = row.get("messages") if row.get("messages") is not None else row.get("prompt")
    if isinstance(prompt_value, str):
        system = _text_field(row, "system", where)
        prompt = ([("system", system)] if system else []) + [("user", prompt_value)]
    elif prompt_value is not None:
        prompt = _messages(prompt_value, where, "messages" if row.get("messages") is not None else "prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):  # two whole conversations
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        raise DataError(f"{where}: no prompt; a preference pair needs 'prompt' (or 'messages') with 'chosen' and "
                        "'rejected', or 'chosen' and 'rejected' as whole conversations")
    replies = []
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(reply, list):
            if len(reply) != 1 or reply[0][0] != "assistant":
                raise DataError(f"{where}: {key!r} must be one assistant reply after the prompt (got "
                                f"{len(reply)} message(s) starting with {reply[0][0] if reply else 'none'!r})")
            reply = reply[0][1]
        if not reply.strip():
            raise DataError(f"{where}: {key!r} is empty; a pair needs two replies to compare")
        replies.append(reply)
    if not prompt or prompt[-1][0] == "assistant":
        raise DataError(f"{where}: the prompt must end with a user (or system) turn that the replies answer")
    return PreferencePair(tuple(prompt), replies[0], replies[1])


# ---------------------------------------------------------------- rendering


def _as_messages(messages: Sequence) -> tuple[Message, ...]:
    """(role, content) pairs from pairs or {"role", "content"} dicts."""
    return tuple((m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages)


class ChatRenderer:
    """Render conversations with a tokenizer's chat template (or the built-in one) into segments."""

    def __init__(self, tokenizer, where: str = "chat"):
        self.tokenizer = tokenizer
        self.where = where
        self.template, self.builtin = adopt_chat_template(tokenizer)  # builtin: it had none, now has ours
        prefix, suffix = special_tokens(tokenizer)
        bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
        bos_id = getattr(tokenizer, "bos_token_id", None)
        # The tokenizer already puts its BOS before every document (encode.py): a template that writes it
        # as text too would double it.
        self.lead = bos if bos and bos_id is not None and prefix == [bos_id] else None
        # Every document ends with EOS (encode.py), a target when the last segment is: a last reply that
        # ends with EOS text drops it, and gets the same token back from there.
        self.trail = eos if eos and not suffix else None

    @property
    def identity(self) -> str:
        """What the rendering depends on besides the tokenizer's vocabulary (part of the token cache key)."""
        return hashlib.sha256(json.dumps([CHAT_VERSION, self.template]).encode()).hexdigest()

    def render(self, messages: Sequence, add_generation_prompt: bool = False) -> str:
        msgs = [{"role": r, "content": c} for r, c in _as_messages(messages)]
        try:
            return self.tokenizer.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja raises its own types (and templates call raise_exception)
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise DataError(f"{self.where}: the chat template failed on an example ({reason})") from None

    def segments(self, messages: Sequence, assistant_turns: str = "all",
                 add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, loss) segments of a conversation: assistant turns are targets (all, or only the last),
        everything else context. With add_generation_prompt (inference) the text ends with the prompt
        that opens the next reply, cut exactly as training cut the same conversation."""
        messages = _as_messages(messages)
        full = self.render(messages, add_generation_prompt)
        turns = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
        out: list[tuple[str, bool]] = []
        pos = 0
        for i in turns:
            opened = self.render(messages[:i], add_generation_prompt=True)  # ends where reply i starts
            closed = self.render(messages[:i + 1])  # ends where it ends (its end-of-turn text included)
            if not (pos <= len(opened) <= len(closed) and full.startswith(opened) and full.startswith(closed)):
                raise DataError(f"{self.where}: the chat template does not render a conversation as a prefix of "
                                "its continuation, so replies cannot be told apart from prompts; use a template "
                                "that renders turns in order (the tokenizer's chat_template)")
            target = assistant_turns == "all" or i == turns[-1]
            out += [(full[pos:len(opened)], False), (full[len(opened):len(closed)], target)]
            pos = len(closed)
        out.append((full[pos:], False))
        out = [(text, loss) for text, loss in out if text]
        if self.lead and out and out[0][0].startswith(self.lead):
            out[0] = (out[0][0][len(self.lead):], out[0][1])
        if self.trail and out and out[-1][0].endswith(self.trail) and len(out[-1][0]) > len(self.trail):
            out[-1] = (out[-1][0][:-len(self.trail)], out[-1][1])
        return [(text, loss) for text, loss in out if text]

    @property
    def stop_text(self) -> str:
        """What the template writes after a reply (its end of turn), stripped: generation stops there."""
        probe = (("user", "?"), ("assistant", "\x00"))
        span = self.render(probe)[len(self.render(probe[:1], add_generation_prompt=True)):]
        return span.split("\x00", 1)[-1].strip()


def encode_segments(tokenizer, segments: list[tuple[str, bool]], close: bool = True,
                    eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of one document of segments, exactly as the token cache writes it: the tokenizer's own
    prefix, each segment tokenized on its own, and (close=True) the closing tokens with the last segment's
    loss. close=False: a prompt to generate from."""
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    prefix, suffix = special_tokens(tokenizer)
    encode = encoder(tokenizer)
    ids, mask = list(prefix), [0] * len(prefix)
    for seg_ids, (_, loss) in zip(encode([text for text, _ in segments]), segments):
        ids += seg_ids
        mask += [int(loss)] * len(seg_ids)
    if close:
        closing = closing_tokens(suffix, eos_id)
        ids += closing
        mask += [int(segments[-1][1]) if segments else 0] * len(closing)
    return ids, mask
