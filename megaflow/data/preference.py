"""Preference data: records -> (prompt, chosen, rejected) pairs -> token ids with response masks -> batches
of chosen and rejected rows for one forward (reward model and the DPO family).

Accepted record shapes (field names configurable; `format: auto` picks per record):
- explicit (TRL `prompt`/`chosen`/`rejected`): `prompt` is a string (one user turn, optional `system`
  field) or a message list; `chosen` and `rejected` are strings (the assistant's answer) or message lists
  (TRL's conversational form, `[{"role": "assistant", "content": ...}]`). A list's last message is the
  response and must be the assistant's; messages before it are appended to the prompt;
- hh_rlhf (Anthropic HH-RLHF transcripts): `chosen` and `rejected` only, each a whole dialogue
  "\\n\\nHuman: ... \\n\\nAssistant: ...". Each transcript is split into turns and at its last Assistant
  turn into prompt (the turns before) and response (that turn's text); both must have the same prompt;
- conversation (implicit prompt, message lists): `chosen` and `rejected` are whole conversations; each is
  split at its last message, which must be the assistant's, and the two prompts must be equal.
An optional numeric `margin` field (TRL RewardTrainer's) rides along for the Bradley-Terry margin.

A bad record (missing field, wrong type, identical chosen and rejected, empty response, no Assistant turn,
different prompts) is a DataError naming FILE:LINE, unless `allow_skip` is set: then it is skipped and
counted in the summary by reason, with the first few places listed (as megaflow.data.sft does).

Tokenization: prompt + response is rendered through the chat template as
`[*prompt, {"role": "assistant", "content": response}]`; only the final assistant turn carries loss (its
tokens and its end-of-turn token; assistant turns inside the prompt carry none). A pair's two sequences
of L tokens each occupy L positions of a row (the whole sequence is input, so a reward model reads the
last token; the last position's label is padding). Over-long pairs follow `truncation`:
- truncate: keep the start of each sequence (the ends of over-long responses are cut);
- truncate_left: cut the same number of tokens from the start of both sequences (the prompts stay equal),
  as many as the longer one needs but never into a response (one prompt token is always kept), then cut
  what is still too long at the end;
- drop: skip the pair; error: stop with FILE:LINE.
A pair left without a chosen or rejected response token is skipped (counted as "no response tokens").

A batch of m pairs is one [2m, seq_length] micro-batch, chosen rows first: row i is pair i's chosen
sequence and row m + i its rejected one, so `split_chosen_rejected` of any per-row tensor gives the halves.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from megaflow.config.schema import DataConfig, PreferenceData
from megaflow.data.chat import ChatTemplate, _common_prefix
from megaflow.data.readers import _LONE_SURROGATE
from megaflow.data.records import (DataSummary, InvalidRecord, Prepared, RecordOptions, SkipRecord, files_key,
                                   load_valid, prepare_with)
from megaflow.data.sft import _messages
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import DataError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "last_index")


class PreferenceDataOptions(RecordOptions, PreferenceData):
    """`data.preference` (its schema: config.schema.PreferenceData), plus seq_length and invalid_utf8."""

    seq_length: int = DataConfig.model_fields["seq_length"].default  # tokens per sequence (row positions)
    invalid_utf8: Literal["replace", "error"] = "replace"  # lone surrogate escapes in JSON strings


@dataclass
class PreferencePair:
    where: str  # FILE:LINE or FILE: row N
    prompt: list[dict]  # the messages before the response
    chosen: str  # the preferred assistant response
    rejected: str
    margin: float | None = None


@dataclass
class PreferenceSample:
    where: str
    chosen_ids: np.ndarray  # int64: prompt + chosen, rendered
    chosen_mask: np.ndarray  # bool: the token belongs to the final assistant turn (end-of-turn included)
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    margin: float | None = None
    pair: PreferencePair | None = field(default=None, repr=False)


@dataclass
class PreferenceDataSummary(DataSummary):
    """`samples` counts pairs, `tokens` both sides' tokens."""

    pairs: int = 0
    chosen_response_tokens: int = 0
    rejected_response_tokens: int = 0

    unit = "pairs"

    def headline(self) -> str:
        return (f"preference data: {self.records} records, {self.samples} pairs, {self.tokens} tokens "
                f"({self.chosen_response_tokens} chosen / {self.rejected_response_tokens} rejected response "
                f"tokens), longest {self.longest}")


# --- HH-RLHF transcripts ------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict]:
    """The turns of an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as [{"role", "content"}]
    (Human -> user, Assistant -> assistant, contents stripped). The leading blank line may be missing;
    other text before the first turn is an error. Raises InvalidRecord."""
    body = "\n\n" + text if text.startswith(("Human:", "Assistant:")) else text
    parts = _HH_TURN.split(body)
    if len(parts) == 1:
        raise InvalidRecord("not a transcript", "no '\\n\\nHuman:' or '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise InvalidRecord("not a transcript", f"text before the first Human/Assistant turn: {parts[0][:40]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def split_hh_transcript(text: str, name: str = "transcript") -> tuple[list[dict], str]:
    """(prompt messages, response): the transcript split at its last Assistant turn, which must be its
    last turn. Raises InvalidRecord when there is no Assistant turn or a Human turn comes after it."""
    return _split_last(parse_hh_transcript(text), name, "Assistant")


def _split_last(messages: list[dict], name: str, assistant: str = "assistant") -> tuple[list[dict], str]:
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no assistant turn", f"{name}: no {assistant} turn to take the response from")
    if messages[-1]["role"] != "assistant":
        raise InvalidRecord("no assistant turn", f"{name}: ends with a {messages[-1]['role']} turn after the "
                            f"last {assistant} turn, not with the response")
    return messages[:-1], messages[-1]["content"]


# --- records -> pairs ---------------------------------------------------------------------------


def record_to_pair(record: dict, opts: PreferenceDataOptions, where: str = "") -> PreferencePair:
    """The validated (prompt, chosen, rejected) of one record; raises InvalidRecord (SkipRecord for a tie)."""
    if record.get("tie") is True:
        raise SkipRecord("tie", "a tie (megaflow label): neither response is preferred")
    fmt = opts.format
    c_name, r_name = opts.chosen_field, opts.rejected_field
    for name in (c_name, r_name):
        if name not in record or record[name] is None:
            raise InvalidRecord("missing field", f"no field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
    chosen, rejected = record[c_name], record[r_name]
    if fmt == "auto":
        if record.get(opts.prompt_field) is not None:
            fmt = "explicit"
        elif isinstance(chosen, str) and isinstance(rejected, str):
            fmt = "hh_rlhf"
        elif isinstance(chosen, list) and isinstance(rejected, list):
            fmt = "conversation"
        else:
            raise InvalidRecord("wrong type", f"no {opts.prompt_field!r} field, and {c_name!r} and {r_name!r} "
                                f"are not both transcripts (strings) or both message lists "
                                f"(got {type(chosen).__name__} and {type(rejected).__name__})")
    if fmt == "explicit":
        prompt = _prompt(record, opts)
        (c_prompt, c_text), (r_prompt, r_text) = (_explicit_side(record[n], prompt, n) for n in (c_name, r_name))
    elif fmt == "hh_rlhf":
        (c_prompt, c_text), (r_prompt, r_text) = (
            split_hh_transcript(_typed(record, n, str), n) for n in (c_name, r_name))
    else:
        (c_prompt, c_text), (r_prompt, r_text) = (
            _split_last(_messages(_typed(record, n, list), _named(n)), n) for n in (c_name, r_name))
    if c_prompt != r_prompt:
        raise InvalidRecord("different prompts", f"{c_name!r} and {r_name!r} have different prompts "
                            f"({_first_difference(c_prompt, r_prompt)})")
    if not c_prompt or not any(m["content"].strip() for m in c_prompt):
        raise InvalidRecord("empty prompt", "empty prompt: no message with text before the response")
    for name, text in ((c_name, c_text), (r_name, r_text)):
        if not text.strip():
            raise InvalidRecord("empty response", f"empty {name} response")
    if c_text.strip() == r_text.strip():
        raise InvalidRecord("identical responses", f"{c_name!r} and {r_name!r} responses are identical")
    margin = _margin(record, opts)
    pair = PreferencePair(where, c_prompt, c_text, r_text, margin)
    return _replace_surrogates(pair, opts)


def _named(name: str):
    """An options stand-in for sft._messages, whose error messages name the field."""
    return SimpleNamespace(messages_field=name)


def _typed(record: dict, name: str, kind: type):
    value = record[name]
    if not isinstance(value, kind):
        want = "a string" if kind is str else "a list"
        raise InvalidRecord("wrong type", f"field {name!r}: expected {want}, got {type(value).__name__}")
    if kind is list and not value:
        raise InvalidRecord("empty conversation", f"field {name!r} is an empty list")
    return value


def _prompt(record: dict, opts: PreferenceDataOptions) -> list[dict]:
    prompt = record[opts.prompt_field]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        system = record.get(opts.system_field)
        if system is not None:
            if not isinstance(system, str):
                raise InvalidRecord("wrong type", f"field {opts.system_field!r}: expected a string, "
                                    f"got {type(system).__name__}")
            messages.insert(0, {"role": "system", "content": system})
        return messages
    if isinstance(prompt, list):
        return _messages(prompt, _named(opts.prompt_field)) if prompt else []
    raise InvalidRecord("wrong type", f"field {opts.prompt_field!r}: expected a string or a message list, "
                        f"got {type(prompt).__name__}")


def _explicit_side(value, prompt: list[dict], name: str) -> tuple[list[dict], str]:
    if isinstance(value, str):
        return prompt, value
    if isinstance(value, list):
        if not value:
            raise InvalidRecord("empty response", f"field {name!r} is an empty list")
        messages = _messages(value, _named(name))
        if any(m["role"] == "system" for m in messages):
            raise InvalidRecord("bad role", f"{name}: a system message belongs in the prompt")
        head, text = _split_last(messages, name)
        return prompt + head, text
    raise InvalidRecord("wrong type", f"field {name!r}: expected a string or a message list, "
                        f"got {type(value).__name__}")


def _margin(record: dict, opts: PreferenceDataOptions) -> float | None:
    value = record.get(opts.margin_field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRecord("bad margin", f"field {opts.margin_field!r}: expected a finite number, got {value!r}")
    return float(value)


def _first_difference(a: list[dict], b: list[dict]) -> str:
    if len(a) != len(b):
        return f"{len(a)} and {len(b)} turns"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"turn {i + 1} differs"
    return "equal"


def _replace_surrogates(pair: PreferencePair, opts: PreferenceDataOptions) -> PreferencePair:
    texts = [m["content"] for m in pair.prompt] + [pair.chosen, pair.rejected]
    if not any(_LONE_SURROGATE.search(t) for t in texts):
        return pair
    if opts.invalid_utf8 == "error":
        raise InvalidRecord("invalid UTF-8", "invalid UTF-8 (lone surrogate escape)")
    fix = lambda t: _LONE_SURROGATE.sub("\ufffd", t)  # noqa: E731
    return dataclasses.replace(pair, prompt=[m | {"content": fix(m["content"])} for m in pair.prompt],
                               chosen=fix(pair.chosen), rejected=fix(pair.rejected))


def load_pairs(paths: Sequence[str], opts: PreferenceDataOptions,
               summary: PreferenceDataSummary | None = None) -> list[PreferencePair]:
    """Every valid pair of the files (jsonl, jsonl.gz, parquet, datasets directories), in file and line
    order. Invalid records raise a DataError naming FILE:LINE, or, with `allow_skip`, are counted."""
    summary = summary if summary is not None else PreferenceDataSummary()
    out = load_valid(paths, opts.invalid_utf8, opts.allow_skip, summary,
                     lambda record, where: record_to_pair(record, opts, where))
    summary.pairs = len(out)
    return out


# --- pairs -> token ids with response masks -----------------------------------------------------


def encode_response(template: ChatTemplate, prompt: list[dict], response: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, response mask, boundary merges) of `[*prompt, {"role": "assistant", "content": response}]`.

    The mask is the chat template's assistant mask (megaflow.data.chat) restricted to the final turn: the
    tokens from where the prompt's render with the generation prompt stops matching the whole render on.
    So the prompt, assistant turns inside it and the final turn's header carry no loss; the response's
    tokens and its end-of-turn token do."""
    encoded = template.encode([*prompt, {"role": "assistant", "content": response}])
    ids = np.asarray(encoded.ids, dtype=np.int64)
    mask = np.asarray(encoded.assistant_mask, dtype=bool)
    mask[:_common_prefix(template.prompt_ids(prompt), encoded.ids)] = False
    return ids, mask, encoded.boundary_merges


def tokenize_pairs(pairs: Iterable[PreferencePair], template: ChatTemplate, opts: PreferenceDataOptions,
                   summary: PreferenceDataSummary | None = None, source: str = "preference data") -> list[PreferenceSample]:
    """Token ids and response masks of both sides of every pair, at most `opts.seq_length` tokens each,
    over-long pairs handled by `opts.truncation` (see the module docstring). None usable is a DataError
    naming `source` (the config key and its files)."""
    summary = summary if summary is not None else PreferenceDataSummary()
    limit, samples = opts.seq_length, []
    for pair in pairs:
        try:
            c_ids, c_mask, c_merges = encode_response(template, pair.prompt, pair.chosen)
            r_ids, r_mask, r_merges = encode_response(template, pair.prompt, pair.rejected)
        except DataError as e:
            if not opts.allow_skip:
                raise DataError(f"{pair.where}: {e}") from None
            summary.skip(pair.where, "template error", str(e))
            continue
        summary.boundary_merges += c_merges + r_merges
        longest = max(len(c_ids), len(r_ids))
        if longest > limit:
            if opts.truncation == "error":
                raise DataError(f"{pair.where}: {longest} tokens, more than seq_length = {limit} "
                                "(set truncation to truncate, truncate_left or drop)")
            if opts.truncation == "drop":
                summary.dropped_too_long += 1
                continue
            if opts.truncation == "truncate":
                c_ids, c_mask, r_ids, r_mask = c_ids[:limit], c_mask[:limit], r_ids[:limit], r_mask[:limit]
            else:  # the same cut from the start of both (the prompts stay equal), never into a response
                cut = min(longest - limit, _response_start(c_mask, r_mask) - 1)
                keep = slice(max(cut, 0), max(cut, 0) + limit)
                c_ids, c_mask, r_ids, r_mask = c_ids[keep], c_mask[keep], r_ids[keep], r_mask[keep]
            summary.truncated += 1
        if not c_mask[1:].any() or not r_mask[1:].any():
            summary.skip(pair.where, "no response tokens", "no chosen or rejected response tokens within seq_length")
            continue
        samples.append(PreferenceSample(pair.where, c_ids, c_mask, r_ids, r_mask, pair.margin, pair))
        summary.samples += 1
        summary.tokens += len(c_ids) + len(r_ids)
        summary.chosen_response_tokens += int(c_mask[1:].sum())
        summary.rejected_response_tokens += int(r_mask[1:].sum())
        summary.longest = max(summary.longest, len(c_ids), len(r_ids))
    if not samples:
        raise DataError(f"{source}: no usable pairs" +
                        (f" ({'; '.join(summary.lines()[1:])})" if summary.skipped else ""))
    return samples


def _response_start(*masks: np.ndarray) -> int:
    """The first response position of any of the masks (where the shared prompt ends)."""
    return min(int(np.argmax(m)) if m.any() else len(m) for m in masks)


PreparedPreference = Prepared[PreferenceSample]


def prepare(paths: Sequence[str], tokenizer: Tokenizer, opts: PreferenceDataOptions) -> PreparedPreference:
    """Read, validate and tokenize preference files: chat template chosen by `opts.chat_template`."""
    return prepare_with(tokenizer, opts.chat_template, PreferenceDataSummary(), lambda template, summary: (
        tokenize_pairs(load_pairs(paths, opts, summary), template, opts, summary, files_key("data.train", paths))))


# --- samples -> rows -> batches -----------------------------------------------------------------


def build_sequence_row(ids: np.ndarray, mask: np.ndarray, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One right-padded row holding a whole sequence of L <= seq_length tokens as input:

        tokens[j] = ids[j],  labels[j] = ids[j+1],  loss_mask[j] = mask[j+1]   (j < L-1)

    position L-1 (the last token) has label pad_id and no loss; padding has label pad_id, loss_mask 0,
    segment 0, position 0. `last_index` = L-1 is where a reward model reads its score."""
    n = len(ids)
    if not 1 <= n <= seq_length:
        raise ValueError(f"a sequence of {n} tokens does not fit in {seq_length}")
    out = {
        "tokens": np.full(seq_length, pad_id, dtype=np.int64),
        "labels": np.full(seq_length, pad_id, dtype=np.int64),
        "loss_mask": np.zeros(seq_length, dtype=np.float32),
        "position_ids": np.zeros(seq_length, dtype=np.int64),
        "segment_ids": np.zeros(seq_length, dtype=np.int64),
    }
    out["tokens"][:n] = ids
    out["labels"][:n - 1] = ids[1:]
    out["loss_mask"][:n - 1] = mask[1:]
    out["position_ids"][:n] = np.arange(n)
    out["segment_ids"][:n] = 1
    out["last_index"] = np.int64(n - 1)
    return out


class PreferenceDataset:
    """Pair i is a dict of [2, seq_length] tensors (row 0 chosen, row 1 rejected; `last_index` [2]),
    `margin`, a 0-d float (0.0 where the record had none), and `index` (i). Given `reference` ([n, 2]
    summed response log-probs of a reference model, chosen then rejected), also `ref_logps` [2]."""

    def __init__(self, samples: list[PreferenceSample], seq_length: int, pad_id: int,
                 reference: np.ndarray | None = None):
        if reference is not None and reference.shape != (len(samples), 2):
            raise ValueError(f"reference log-probs: expected shape ({len(samples)}, 2), got {reference.shape}")
        self.samples, self.seq_length, self.pad_id, self.reference = samples, seq_length, pad_id, reference

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        rows = [build_sequence_row(ids, mask, self.seq_length, self.pad_id)
                for ids, mask in ((s.chosen_ids, s.chosen_mask), (s.rejected_ids, s.rejected_mask))]
        out = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
        out["margin"] = torch.tensor(0.0 if s.margin is None else s.margin, dtype=torch.float32)
        out["index"] = torch.tensor(i, dtype=torch.int64)
        if self.reference is not None:
            out["ref_logps"] = torch.from_numpy(self.reference[i])
        return out


PER_PAIR_KEYS = ("margin", "index")


def collate_pairs(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """m dataset items -> one micro-batch for a single forward: every per-row key [2m, ...], chosen rows
    0..m-1 then the rejected rows m..2m-1 in the same pair order; `margin` and `index` [m]."""
    out = {k: torch.cat([torch.stack([it[k][0] for it in items]), torch.stack([it[k][1] for it in items])])
           for k in items[0] if k not in PER_PAIR_KEYS}
    out |= {k: torch.stack([it[k] for it in items]) for k in PER_PAIR_KEYS}
    return out


def split_chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves along dim 0 of a per-row tensor of a [2m, ...] batch (e.g. per-sequence
    log-prob sums from megaflow.algorithms.losses.sequence_logps, or rewards)."""
    if x.shape[0] % 2:
        raise ValueError(f"expected an even number of rows (chosen then rejected), got {x.shape[0]}")
    m = x.shape[0] // 2
    return x[:m], x[m:]
