"""Prompt data of the online RL stages (PPO, GRPO): records -> prompt token ids, the reference answer and
the record's other fields (handed to a reward function).

Accepted record shapes (field names in `data.prompts`, config.schema.PromptData):
- `{"prompt": str, "answer": str?, "system": str?, ...}`: a single-turn prompt;
- `{"messages": [{"role", "content"}, ...], ...}`: a conversation; a final assistant turn is the answer;
- SFT records (`{"prompt", "response"}`): the response is the reference answer when there is no `answer`.
Files: jsonl, jsonl.gz, parquet or a Hugging Face datasets directory (megaflow.data.readers). A bad record is
a DataError naming FILE:LINE unless `allow_skip`. Prompts are rendered with the chat template and its
generation prompt, as SFT's exact-match evaluation does, so the policy answers as it was fine-tuned to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from megaflow.config.schema import DataConfig, PromptData
from megaflow.data.chat import ChatTemplate
from megaflow.data.records import DataSummary, InvalidRecord, RecordOptions, load_valid
from megaflow.data.sft import SFTDataOptions, _messages
from megaflow.errors import DataError


class PromptDataOptions(RecordOptions, PromptData):
    """`data.prompts` plus seq_length and invalid_utf8 from `data`."""

    seq_length: int = DataConfig.model_fields["seq_length"].default
    invalid_utf8: Literal["replace", "error"] = "replace"


@dataclass
class Prompt:
    where: str  # FILE:LINE
    messages: list[dict]  # the conversation up to the answer
    answer: str | None  # the reference answer, when the record has one
    fields: dict = field(default_factory=dict)  # the record's other fields (reward functions get them)
    ids: list[int] = field(default_factory=list)  # rendered with the generation prompt


def record_to_prompt(record: dict, opts: PromptDataOptions, where: str) -> Prompt:
    """A validated Prompt (ids not yet set); raises InvalidRecord."""
    used = {opts.prompt_field, opts.messages_field, opts.answer_field, opts.system_field, opts.response_field}
    answer = record.get(opts.answer_field)
    if opts.messages_field in record:
        messages = _messages(record[opts.messages_field], SFTDataOptions(messages_field=opts.messages_field))
        if messages[-1]["role"] == "assistant":
            last = messages.pop()["content"]
            answer = last if answer is None else answer
    elif opts.prompt_field in record:
        prompt = record[opts.prompt_field]
        if not isinstance(prompt, str):
            raise InvalidRecord("wrong type", f"field {opts.prompt_field!r}: expected a string, got "
                                f"{type(prompt).__name__}")
        messages = [{"role": "user", "content": prompt}]
        system = record.get(opts.system_field)
        if system is not None:
            if not isinstance(system, str):
                raise InvalidRecord("wrong type", f"field {opts.system_field!r}: expected a string")
            messages.insert(0, {"role": "system", "content": system})
        if answer is None:
            answer = record.get(opts.response_field)
    else:
        raise InvalidRecord("unknown shape", f"no {opts.prompt_field!r} or {opts.messages_field!r} field "
                            f"(fields: {', '.join(map(str, record)) or 'none'})")
    if not messages or not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise InvalidRecord("empty prompt", "no user message with text")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise InvalidRecord("wrong type", f"field {opts.answer_field!r}: expected a string or a number")
    extra = {k: v for k, v in record.items() if k not in used}
    return Prompt(where, messages, None if answer is None else str(answer), extra)


def load_prompts(paths: Sequence[str], template: ChatTemplate, opts: PromptDataOptions, max_new_tokens: int,
                 summary: DataSummary | None = None, source: str = "prompt data") -> list[Prompt]:
    """Every usable prompt of the files, rendered to ids. A prompt that leaves fewer than `max_new_tokens`
    positions of seq_length is dropped and counted (truncating a prompt changes the question): prompt and
    response together fit seq_length, so a reward model reads the whole sequence in one row."""
    summary = summary if summary is not None else DataSummary()
    prompts = load_valid(paths, opts.invalid_utf8, opts.allow_skip, summary,
                         lambda record, where: record_to_prompt(record, opts, where))
    out = []
    budget = opts.seq_length - max_new_tokens
    for p in prompts:
        try:
            p.ids = template.prompt_ids(p.messages)
        except DataError as e:
            raise DataError(f"{p.where}: {e}") from None
        if len(p.ids) > budget:
            summary.dropped_too_long += 1
            continue
        out.append(p)
        summary.samples += 1
        summary.tokens += len(p.ids)
        summary.longest = max(summary.longest, len(p.ids))
    if not out:
        raise DataError(f"{source}: no usable prompts (each needs at most data.seq_length - max_new_tokens "
                        f"= {budget} tokens; {summary.dropped_too_long} were longer)")
    return out

