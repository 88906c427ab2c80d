"""Chat templates: conversation -> token ids plus a mask of the assistant tokens that carry the SFT loss.

The template is the tokenizer's own Jinja template when it has one (rendered the way transformers'
`apply_chat_template` renders it), else megaflow's built-in template, whose role tokens are added to the
tokenizer when missing (`chat_tokenizer`); the model's embedding then grows (`grow_embedding`).

Which tokens are the assistant's? A template marks them with `{% generation %}` blocks when it can; most
do not, so the general method renders prefixes of the conversation: the text of messages[:i] with the
generation prompt ends where assistant turn i begins, and the text of messages[:i+1] (trailing whitespace
removed) ends after its end-of-turn token. Both must be prefixes of the whole render, or the template is
not one we can split (an error that says so). The character spans become token spans by tokenizing the
pieces between span boundaries; when the concatenation differs from the whole render's tokens (a token
merging across a boundary, or SentencePiece's leading space), each boundary is placed by tokenizing the
text before it instead, and a merged token is counted as the assistant's: the whole render's tokens are
always the ones trained on.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime

from megaflow.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from megaflow.errors import DataError, UserError

ROLES = ("system", "user", "assistant")
CHAT_TOKEN_NAMES = ("system", "user", "assistant", "end_of_turn")


@dataclass
class EncodedChat:
    ids: list[int]
    assistant_mask: list[bool]  # True for the assistant's tokens, end-of-turn token included
    boundary_merges: int = 0  # span boundaries inside a token (see the module docstring)


def chat_tokenizer(tokenizer: Tokenizer, choice: str = "auto") -> tuple[Tokenizer, str, list[str]]:
    """(tokenizer, template source, tokens added) for `choice`:

    - "auto": the tokenizer's own template when it has one, else the built-in one;
    - "builtin": megaflow's template (`tokenizer.CHAT_TEMPLATE`) whatever the tokenizer has;
    - a path to a .jinja file, or a Jinja template string (contains "{%" or "{{").
    The built-in template needs <|system|>, <|user|>, <|assistant|>, <|end_of_turn|> as single tokens; those
    the vocabulary lacks are added (new ids after the old ones) and listed in the third element.
    """
    if choice == "auto":
        choice = "tokenizer" if tokenizer.chat_template else "builtin"
    if choice == "tokenizer":
        if not tokenizer.chat_template:
            raise UserError(f"{tokenizer.path}: the tokenizer has no chat template (use chat_template: builtin)")
        return tokenizer, tokenizer.chat_template, []
    if choice == "builtin":
        wanted = {name: SPECIAL_TOKENS[name] for name in CHAT_TOKEN_NAMES}
        before = tokenizer.vocab_size
        grown = tokenizer.with_special_tokens(wanted, CHAT_TEMPLATE)
        added = [t for t in wanted.values() if grown.encode(t) and grown.encode(t)[0] >= before]
        return grown, CHAT_TEMPLATE, added
    if "{%" in choice or "{{" in choice:
        return tokenizer, choice, []
    if not os.path.isfile(choice):
        raise UserError(f"chat_template: not 'auto', 'builtin', a Jinja string or an existing file: {choice}")
    with open(choice, encoding="utf-8") as f:
        return tokenizer, f.read(), []


def grow_embedding(weight, num_rows: int, generator=None):
    """`weight` [V, h] grown to [num_rows, h]; new rows are the mean of the old ones plus noise of a tenth
    of their spread, so new tokens start as an average token rather than as outliers that dominate the
    first logits (the initialisation transformers' resize_token_embeddings uses)."""
    import torch

    old = weight.shape[0]
    if num_rows <= old:
        return weight
    mean, std = weight.float().mean(0), weight.float().std(0)
    noise = torch.randn(num_rows - old, weight.shape[1], generator=generator)
    extra = (mean + 0.1 * std * noise).to(weight.dtype)
    return torch.cat([weight, extra])


# --- rendering ----------------------------------------------------------------------------------


@functools.cache
def _environment():
    """The Jinja sandbox transformers renders chat templates in: same options, filters and globals."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` around assistant text; records the span rendered."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return f"\x00GEN\x01{caller()}\x00END\x01"

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_GENERATION = re.compile("\x00GEN\x01|\x00END\x01")


class ChatTemplate:
    """A compiled chat template bound to a tokenizer: `render`, `encode` (ids + assistant mask), `prompt_ids`."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        import jinja2

        self.tokenizer, self.source = tokenizer, source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"chat template: not valid Jinja ({e})") from None
        names = {"eod": "eos_token", "bos": "bos_token", "pad": "pad_token"}
        self._variables = {key: tokenizer.special_tokens[n] for n, key in names.items() if n in tokenizer.special_tokens}
        self._has_generation_marks = "{% generation" in source or "{%- generation" in source
        self._generation_prompt: bool | None = None
        self._special_ids = {t: [tokenizer.token_id(n)] for n, t in tokenizer.special_tokens.items()}
        specials = sorted(self._special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return _GENERATION.sub("", self._render(messages, add_generation_prompt))

    def _render(self, messages, add_generation_prompt):
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._variables)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template: {e}") from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of `messages` followed by the generation prompt: what a model answers from."""
        return self.encode_text(self.render(messages, add_generation_prompt=True))

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered text, special token strings always becoming their single ids (a SentencePiece
        backend would otherwise spell "<s>" out letter by letter)."""
        return [i for ids in self._encode_pieces(text) for i in ids]

    def _encode_pieces(self, text: str) -> list[list[int]]:
        pieces = self._split.split(text) if self._split else [text]
        plain = [p for p in pieces if p and p not in self._special_ids]
        encoded = iter(self.tokenizer.encode_batch(plain)) if plain else iter(())
        return [self._special_ids[p] if p in self._special_ids else next(encoded) for p in pieces if p]

    # --- assistant spans ---------------------------------------------------------------------------

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole render and the [start, end) character spans of the assistant turns in it."""
        if self._has_generation_marks:
            return self._marked_spans(messages)
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            for prefix, what in ((head, f"messages[:{i}] with the generation prompt"), (upto, f"messages[:{i + 1}]")):
                if not full.startswith(prefix):
                    raise DataError(f"chat template: the render of {what} is not a prefix of the whole "
                                    "conversation's render, so its assistant tokens cannot be found "
                                    "(use data.chat_template: builtin)")
            start, end = len(head), max(len(head), len(upto.rstrip()))
            if not self._renders_generation_prompt(messages[:i]):  # then skip the assistant header by hand
                found = full.find(message["content"].strip(), start, end) if message["content"].strip() else -1
                start = found if found >= 0 else start
            spans.append((start, end))
        return full, spans

    def _renders_generation_prompt(self, messages: list[dict]) -> bool:
        """Whether add_generation_prompt adds anything (asked once per template)."""
        if self._generation_prompt is None:
            self._generation_prompt = self.render(messages, True) != self.render(messages, False)
        return self._generation_prompt

    def _marked_spans(self, messages):
        raw, spans, full = self._render(messages, False), [], []
        length, start = 0, None
        for part in re.split("(\x00GEN\x01|\x00END\x01)", raw):
            if part == "\x00GEN\x01":
                start = length
            elif part == "\x00END\x01":
                spans.append((start, length))
            else:
                full.append(part)
                length += len(part)
        return "".join(full), spans

    def encode(self, messages: list[dict]) -> EncodedChat:
        """Ids of the whole conversation and the mask of its assistant tokens (see the module docstring)."""
        full, spans = self.assistant_spans(messages)
        ids = self.encode_text(full)
        cuts = sorted({0, len(full), *(c for span in spans for c in span)})
        pieces = [self.encode_text(full[a:b]) for a, b in zip(cuts, cuts[1:])]
        merges = 0
        if [i for p in pieces for i in p] == ids:  # every boundary falls between tokens
            starts = ends = dict(zip(cuts, itertools.accumulate((len(p) for p in pieces), initial=0)))
        else:  # place each boundary by tokenizing the text before it; a straddling token is the assistant's
            starts, ends = {0: 0, len(full): len(ids)}, {0: 0, len(full): len(ids)}
            for c in cuts[1:-1]:
                before = self.encode_text(full[:c])
                k = _common_prefix(before, ids)
                straddle = k < len(before)
                merges += straddle
                starts[c], ends[c] = k, min(k + straddle, len(ids))
        mask = [False] * len(ids)
        for start, end in spans:
            mask[starts[start]:ends[end]] = [True] * max(0, ends[end] - starts[start])
        return EncodedChat(ids, mask, merges)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
