"""Conversations: a `ChatSession` keeps the messages and renders them with the tokenizer's chat template;
`repl` is `megaflow chat` (reads lines from stdin, streams the answers to stdout).

The template is the tokenizer's own (Jinja, as transformers renders it), else megaflow's built-in one when
the vocabulary has its role tokens (every tokenizer megaflow trains does). A turn ends at the tokenizer's
end-of-turn or end-of-document token. When a conversation outgrows the model's context, its oldest
exchanges are dropped (the system message stays).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable, TextIO

import torch

from megaflow.errors import UserError
from megaflow.inference.generate import Completion, SamplingParams, generate
from megaflow.inference.model import InferenceModel

HELP = "commands: /reset starts a new conversation, /exit (or end of input) quits"


def chat_template(tokenizer):
    """megaflow.data.chat.ChatTemplate for `tokenizer`: its own template, else the built-in one."""
    from megaflow.data.chat import ChatTemplate
    from megaflow.data.tokenizer import CHAT_TEMPLATE

    if tokenizer is None:
        raise UserError("the checkpoint has no tokenizer: chat needs one")
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer, tokenizer.chat_template)
    if all(name in tokenizer.special_tokens for name in ("user", "assistant", "end_of_turn")):
        return ChatTemplate(tokenizer, CHAT_TEMPLATE)
    raise UserError(f"{tokenizer.path}: the tokenizer has no chat template and no megaflow chat tokens "
                    "(chat needs a model fine-tuned with one)")


class ChatSession:
    """One conversation with a model. `send(text)` adds a user message, generates the answer (streamed
    through `on_text(delta)` if given), adds it to the conversation and returns the Completion."""

    def __init__(self, model: InferenceModel, params: SamplingParams | None = None, system: str | None = None):
        self.model, self.params, self.system = model, params or SamplingParams(), system
        self.template = chat_template(model.tokenizer)
        self.turns = 0
        self.dropped = 0  # messages dropped to fit the context, over the whole session
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The conversation so far plus the generation prompt, oldest exchanges dropped until an answer of
        max_new_tokens fits the context (at least one token of room is always required)."""
        room = self.model.max_sequence_length
        keep = 1 if self.system else 0
        while True:
            ids = self.template.prompt_ids(self.messages)
            if len(ids) + self.params.max_new_tokens <= room or len(self.messages) <= keep + 1:
                break
            drop = 2 if len(self.messages) > keep + 2 else 1  # a user message and its answer
            del self.messages[keep : keep + drop]
            self.dropped += drop
        if len(ids) >= room:
            raise UserError(f"the message is too long: {len(ids)} tokens, the model's context is {room}")
        return ids

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        self.messages.append({"role": "user", "content": text})
        params = self.params
        if params.seed is not None:  # reproducible conversations, but not the same draw every turn
            params = replace(params, seed=params.seed + self.turns)
        try:
            ids = self.prompt_ids()
            stream = (lambda i, delta: on_text(delta)) if on_text is not None else None
            completion = generate(self.model, [ids], params, on_text=stream)[0]
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": completion.text})
        self.turns += 1
        return completion


def _read_line(stream: TextIO) -> str | None:
    """Rank 0 reads a line; every rank gets it (None at end of input)."""
    line = [None]
    from megaflow.runtime import distributed as dist

    if dist.is_rank0():
        text = stream.readline()
        line[0] = text if text else None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(line, src=0)
    return line[0]


def repl(model: InferenceModel, params: SamplingParams, system: str | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """`megaflow chat`: the answers go to stdout as they are generated, prompts and notices to stderr."""
    from megaflow.runtime import distributed as dist

    session = ChatSession(model, params, system)
    writer = dist.is_rank0()

    def say(text: str, stream: TextIO = stderr, end: str = "\n") -> None:
        if writer:
            print(text, end=end, file=stream, flush=True)

    say(HELP)
    while True:
        say("user> ", end="")
        line = _read_line(stdin)
        if line is None:
            say("")
            break
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            say("(new conversation)")
            continue
        if not command:
            continue
        say("assistant> ", end="")
        dropped = session.dropped
        try:
            session.send(text, on_text=lambda delta: say(delta, stdout, end=""))
        except UserError as e:  # this message cannot be answered; the conversation goes on
            say(f"\nmegaflow: error: {e}")
            continue
        say("", stdout)
        if session.dropped > dropped:
            say(f"(the conversation outgrew the context: {session.dropped - dropped} oldest messages dropped)")
    return 0
