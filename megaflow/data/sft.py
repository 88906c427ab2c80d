"""SFT data: chat records -> validated conversations -> token ids with assistant loss masks -> packed rows
-> per-data-parallel-rank micro-batches.

Accepted record shapes (field names configurable, `format: auto` picks per record):
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, multi-turn;
  ShareGPT spelling (`{"from": "human"|"gpt", "value": ...}`) is read too;
- prompt/response: `{"prompt": str, "response": str, "system": str?}`;
- instruction (Alpaca): `{"instruction": str, "input": str?, "output": str}`, input appended to the
  instruction after a blank line.
A bad record is a DataError naming FILE:LINE, unless `allow_skip` is set: then it is skipped and counted
in the summary by reason, with the first few places listed. Messages after the last assistant turn carry
no loss and are dropped. Over-long samples follow `truncation` (truncate keeps the start, truncate_left
the end, drop skips them, error stops), reported in the summary too.

The loss covers the assistant's tokens (every assistant turn, its end-of-turn token included; see
megaflow.data.chat), or every token with `train_on_prompt`. Batches are dicts of [mbs, seq_length] tensors
tokens, labels, loss_mask, position_ids, segment_ids (see megaflow.data.packing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from megaflow.config.schema import DataConfig, SFTData
from megaflow.data.chat import ROLES, ChatTemplate
from megaflow.data.packing import build_row, pack
from megaflow.data.readers import _LONE_SURROGATE
from megaflow.data.records import (DataSummary, InvalidRecord, Prepared, RecordOptions, files_key, load_valid,
                                   prepare_with)
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import DataError

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}


class SFTDataOptions(RecordOptions, SFTData):
    """`data.sft` (its schema: config.schema.SFTData), plus seq_length and invalid_utf8 from `data`."""

    seq_length: int = DataConfig.model_fields["seq_length"].default  # tokens per sequence (row positions)
    invalid_utf8: Literal["replace", "error"] = "replace"  # lone surrogate escapes in JSON strings


@dataclass
class Conversation:
    where: str  # FILE:LINE or FILE: row N
    messages: list[dict]


@dataclass
class Sample:
    where: str
    ids: np.ndarray  # int64 token ids
    mask: np.ndarray  # bool: the token is a loss target
    messages: list[dict] = field(default_factory=list, repr=False)  # the conversation (for exact-match eval)


@dataclass
class SFTDataSummary(DataSummary):
    conversations: int = 0
    loss_tokens: int = 0
    rows: int = 0
    packing_efficiency: float = 0.0  # real positions / (rows * seq_length)

    def headline(self) -> str:
        return (f"SFT data: {self.records} records, {self.samples} samples, {self.tokens} tokens "
                f"({self.loss_tokens} with loss), longest {self.longest}")

    def lines(self) -> list[str]:
        out = super().lines()
        if self.rows:
            out.append(f"  {self.rows} sequences, packing efficiency {self.packing_efficiency:.1%}")
        return out


# --- records -> conversations ------------------------------------------------------------------


def record_to_messages(record: dict, opts: SFTDataOptions) -> list[dict]:
    """The conversation in a record, as [{"role", "content"}], validated; raises InvalidRecord."""
    fmt = opts.format
    if fmt == "auto":
        if opts.messages_field in record:
            fmt = "messages"
        elif opts.prompt_field in record and opts.response_field in record:
            fmt = "prompt_response"
        elif opts.instruction_field in record and opts.output_field in record:
            fmt = "instruction"
        else:
            raise InvalidRecord("unknown shape", f"no {opts.messages_field!r}, {opts.prompt_field!r}/"
                                f"{opts.response_field!r} or {opts.instruction_field!r}/{opts.output_field!r} "
                                f"fields (fields: {', '.join(map(str, record)) or 'none'})")
    if fmt == "messages":
        messages = _messages(_field(record, opts.messages_field, list), opts)
    elif fmt == "prompt_response":
        messages = [{"role": "user", "content": _field(record, opts.prompt_field, str)},
                    {"role": "assistant", "content": _field(record, opts.response_field, str)}]
        if record.get(opts.system_field) is not None:
            messages.insert(0, {"role": "system", "content": _field(record, opts.system_field, str)})
    else:
        prompt = _field(record, opts.instruction_field, str)
        extra = record.get(opts.input_field)
        if extra is not None:
            extra = _field(record, opts.input_field, str)
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                    {"role": "assistant", "content": _field(record, opts.output_field, str)}]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise InvalidRecord("no assistant text", "no assistant message with text: nothing to train on")
    while messages[-1]["role"] != "assistant":
        messages.pop()
    for m in messages:
        if _LONE_SURROGATE.search(m["content"]):
            if opts.invalid_utf8 == "error":
                raise InvalidRecord("invalid UTF-8", "invalid UTF-8 (lone surrogate escape)")
            m["content"] = _LONE_SURROGATE.sub("\ufffd", m["content"])
    return messages


def _field(record: dict, name: str, kind: type):
    if name not in record or record[name] is None:
        raise InvalidRecord("missing field", f"no field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise InvalidRecord("wrong type", f"field {name!r}: expected {_kind(kind)}, got {type(value).__name__}")
    return value


def _kind(kind: type) -> str:
    return {str: "a string", list: "a list", dict: "an object"}.get(kind, kind.__name__)


def _messages(items: list, opts: SFTDataOptions) -> list[dict]:
    if not items:
        raise InvalidRecord("empty conversation", f"field {opts.messages_field!r} is an empty list")
    out = []
    for i, item in enumerate(items):
        where = f"{opts.messages_field}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRecord("wrong type", f"{where}: expected an object, got {type(item).__name__}")
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if not isinstance(role, str):
            raise InvalidRecord("bad role", f"{where}: no 'role' string")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise InvalidRecord("bad role", f"{where}.role: {item.get('role', item.get('from'))!r} is not one of "
                                f"{', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise InvalidRecord("bad role", f"{where}: a system message is only allowed first")
        if not isinstance(content, str):
            raise InvalidRecord("wrong type", f"{where}.content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def load_conversations(paths: Sequence[str], opts: SFTDataOptions, summary: SFTDataSummary | None = None) -> list[Conversation]:
    """Every valid conversation of the files, in file and line order. Invalid records raise a DataError
    naming FILE:LINE, or, with `allow_skip`, are counted in `summary`."""
    summary = summary if summary is not None else SFTDataSummary()
    out = load_valid(paths, opts.invalid_utf8, opts.allow_skip, summary,
                     lambda record, where: Conversation(where, record_to_messages(record, opts)))
    summary.conversations = len(out)
    return out


# --- conversations -> samples -------------------------------------------------------------------


def tokenize(conversations: Iterable[Conversation], template: ChatTemplate, opts: SFTDataOptions,
             summary: SFTDataSummary | None = None, source: str = "SFT data") -> list[Sample]:
    """Token ids and loss-target masks, over-long samples handled by `opts.truncation`. A sample holds
    at most seq_length + 1 tokens: its inputs and labels are the seq_length-long shifts of them. None
    usable is a DataError naming `source` (the config key and its files)."""
    summary = summary if summary is not None else SFTDataSummary()
    limit, samples = opts.seq_length + 1, []
    for conv in conversations:
        try:
            encoded = template.encode(conv.messages)
        except DataError as e:
            if not opts.allow_skip:
                raise DataError(f"{conv.where}: {e}") from None
            summary.skip(conv.where, "template error", str(e))
            continue
        ids = np.asarray(encoded.ids, dtype=np.int64)
        mask = np.ones(len(ids), bool) if opts.train_on_prompt else np.asarray(encoded.assistant_mask, bool)
        summary.boundary_merges += encoded.boundary_merges
        if len(ids) > limit:
            if opts.truncation == "error":
                raise DataError(f"{conv.where}: {len(ids)} tokens, more than seq_length + 1 = {limit} "
                                "(set truncation to truncate, truncate_left or drop)")
            if opts.truncation == "drop":
                summary.dropped_too_long += 1
                continue
            keep = slice(0, limit) if opts.truncation == "truncate" else slice(len(ids) - limit, None)
            ids, mask = ids[keep], mask[keep]
            summary.truncated += 1
        if len(ids) < 2 or not mask[1:].any():
            summary.skip(conv.where, "no loss tokens", "no assistant tokens within seq_length")
            continue
        samples.append(Sample(conv.where, ids, mask, conv.messages))
        summary.samples += 1
        summary.tokens += len(ids)
        summary.loss_tokens += int(mask[1:].sum())
        summary.longest = max(summary.longest, len(ids))
    if not samples:
        raise DataError(f"{source}: no usable samples" + (f" ({'; '.join(summary.lines()[1:])})" if summary.skipped else ""))
    return samples


def split_holdout(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` of the samples held out, order kept within each; at
    least one held out when the fraction is positive, and at least one always left to train on."""
    n_out = int(round(len(samples) * fraction))
    if fraction > 0:
        n_out = min(max(n_out, 1), len(samples) - 1)
    out = set(np.random.default_rng(seed).permutation(len(samples))[:n_out].tolist())
    return [s for i, s in enumerate(samples) if i not in out], [s for i, s in enumerate(samples) if i in out]


def exact_match_examples(samples: Iterable[Sample]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) per sample: the conversation before its last assistant turn,
    and that turn's text, for exact-match evaluation by generation."""
    return [(s.messages[:-1], s.messages[-1]["content"]) for s in samples]


PreparedSFT = Prepared[Sample]


def prepare(paths: Sequence[str], tokenizer: Tokenizer, opts: SFTDataOptions) -> PreparedSFT:
    """Read, validate and tokenize SFT files: chat template chosen by `opts.chat_template`."""
    return prepare_with(tokenizer, opts.chat_template, SFTDataSummary(), lambda template, summary: tokenize(
        load_conversations(paths, opts, summary), template, opts, summary, source=files_key("data.train", paths)))


# --- samples -> rows -> batches -----------------------------------------------------------------


class SFTDataset:
    """Fixed-length rows of one or (with packing) several samples; row i is a dict of [seq_length] tensors."""

    def __init__(self, samples: list[Sample], seq_length: int, pad_id: int, packing: bool = True):
        self.samples, self.seq_length, self.pad_id = samples, seq_length, pad_id
        self.rows = pack([len(s.ids) - 1 for s in samples], seq_length, packing)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = build_row([(self.samples[j].ids, self.samples[j].mask) for j in self.rows[i]], self.seq_length, self.pad_id)
        return {k: torch.from_numpy(v) for k, v in row.items()}

    def row_samples(self, i: int) -> list[int]:
        """Indices (into `samples`) of row i's samples, in row order (segment 1, 2, ...)."""
        return list(self.rows[i])

    @property
    def packing_efficiency(self) -> float:
        """Fraction of positions holding a real token rather than padding."""
        used = sum(len(s.ids) - 1 for s in self.samples)
        return used / max(1, len(self.rows) * self.seq_length)

    def record_in(self, summary: SFTDataSummary) -> None:
        summary.rows, summary.packing_efficiency = len(self), self.packing_efficiency
