"""What the record-based data stages (SFT, preference) share: their options' base class, the error a bad
record raises, the summary of what reading and tokenizing found, the read-validate loop and `prepare`.

Each stage supplies only what is its own: how one record becomes a validated item (a conversation, a
pair) and how items become token ids with loss masks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from megaflow.data.chat import ChatTemplate, chat_tokenizer
from megaflow.data.readers import iter_records
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import DataError, UserError

EXAMPLES_KEPT = 5  # how many "FILE:LINE: reason" examples a summary lists per run
Item = TypeVar("Item")
Sample = TypeVar("Sample")


class RecordOptions:
    """Mixed into the record-reading options (SFT, preference): a config section of the schema
    (config/schema.py, so defaults and choices have one home) plus the two data.* keys reading needs,
    `seq_length` and `invalid_utf8`. An invalid value is a UserError naming the key."""

    def __init__(self, **values):
        from pydantic import ValidationError

        from megaflow.config.loader import format_validation_error

        try:
            super().__init__(**values)
        except ValidationError as e:
            raise UserError(format_validation_error(e)) from None

    @classmethod
    def from_config(cls, config, **overrides):
        """From a schema section or a dict with (some of) these keys; other keys are ignored."""
        raw = config if isinstance(config, dict) else config.model_dump()
        return cls(**{k: v for k, v in raw.items() if k in cls.model_fields and v is not None} | overrides)


class InvalidRecord(ValueError):
    """A record that cannot be used: `reason` is the summary's category, `detail` the message for the user."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class SkipRecord(InvalidRecord):
    """A valid record that holds nothing to train on (a tie of `megaflow label`): always skipped and counted."""


@dataclass
class DataSummary:
    """What reading and preparing the data found; `lines()` is what a stage logs, `as_dict()` what it stores.
    A stage's subclass adds its own counts and its first line (`headline`)."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few "FILE:LINE: reason"
    truncated: int = 0  # samples (pairs) with a sequence cut to the length budget
    dropped_too_long: int = 0
    boundary_merges: int = 0
    samples: int = 0
    tokens: int = 0
    longest: int = 0

    unit = "samples"  # what `truncated` and `dropped_too_long` count, for the report

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"{where}: {detail}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"skipped": dict(self.skipped)}

    def headline(self) -> str:
        return f"data: {self.records} records, {self.samples} samples, {self.tokens} tokens, longest {self.longest}"

    def lines(self) -> list[str]:
        out = [self.headline()]
        if self.skipped:
            out.append(f"  skipped {sum(self.skipped.values())}: " +
                       ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()))
            out += [f"    {e}" for e in self.examples]
        if self.truncated or self.dropped_too_long:
            out.append(f"  over-long {self.unit}: {self.truncated} truncated, {self.dropped_too_long} dropped")
        if self.boundary_merges:
            out.append(f"  {self.boundary_merges} turn boundaries fell inside a token (counted as assistant)")
        return out


def files_key(key: str, paths: Sequence[str]) -> str:
    """How an error names a config key and the files it gave: `data.sft.valid (a.jsonl, b.jsonl)`."""
    return f"{key} ({', '.join(map(str, paths))})"


def load_valid(paths: Sequence[str], invalid_utf8: str, allow_skip: bool, summary: DataSummary,
               to_item: Callable[[dict, str], Item]) -> list[Item]:
    """`to_item(record, where)` of every record of the files (jsonl, jsonl.gz, parquet, datasets
    directories), in file and line order. A record it rejects (InvalidRecord) is a DataError naming
    FILE:LINE, or, with `allow_skip`, counted in `summary`."""
    out = []
    for path in paths:
        for where, record in iter_records(path, invalid_utf8):
            summary.records += 1
            try:
                out.append(to_item(record, where))
            except SkipRecord as e:
                summary.skip(where, e.reason, e.detail)
            except InvalidRecord as e:
                if not allow_skip:
                    raise DataError(f"{where}: {e.detail} (set allow_skip to skip bad records)") from None
                summary.skip(where, e.reason, e.detail)
    return out


@dataclass
class Prepared(Generic[Sample]):
    """Tokenized data with the tokenizer and chat template that made it."""

    tokenizer: Tokenizer  # with the built-in template's tokens added if they were missing (save it!)
    template: ChatTemplate
    added_tokens: list[str]  # tokens new to the vocabulary: the embedding must grow to tokenizer.vocab_size
    samples: list[Sample]
    summary: DataSummary


def prepare_with(tokenizer: Tokenizer, chat_template: str, summary: DataSummary,
                 read_and_tokenize: Callable[[ChatTemplate, DataSummary], list[Sample]]) -> Prepared[Sample]:
    """The chat template chosen by `chat_template` (megaflow.data.chat.chat_tokenizer), then the stage's
    own reading and tokenizing with it."""
    tokenizer, source, added = chat_tokenizer(tokenizer, chat_template)
    template = ChatTemplate(tokenizer, source)
    return Prepared(tokenizer, template, added, read_and_tokenize(template, summary), summary)
