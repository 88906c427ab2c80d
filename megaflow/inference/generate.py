"""Batched generation with megatron's static KV cache: greedy, temperature, top-k, top-p, seeds, stop
tokens and stop strings per sequence, the log-prob of every generated token, streaming.

How a batch of prompts of different lengths runs (megatron's own static engine does the same):

    positions   0 1 2 3 4 5 6 7
    prompt A    a a a a a . . .      the batch is right-padded to the longest prompt plus max_new_tokens;
    prompt B    b b b . . . . .      every row sits at its true positions (as in training: RoPE and
                ^^^^^ prefill        learned positions alike, no padding inside the attended keys)

1. prefill: one forward over positions [0, shortest prompt) writes every layer's keys and values into
   the `StaticInferenceContext` (megatron allocates [max_len, batch, groups, dim] per layer on first use
   and copies each step's keys/values to `sequence_len_offset`);
2. decode: one token per row per step at position p, reading the cached keys of [0, p). A row still in
   its prompt at p takes its prompt token (what the model predicted there is dropped); a row past its
   prompt takes the sampled token. Decode steps attend only to real, earlier tokens, so they need no mask;
   the prefill is causal by the attention's type.

Uncached mode (`use_cache=False`) recomputes the whole prefix every step with the training forward; the
two must agree token for token (tests/e2e/test_generate.py).

Logits come from the last pipeline stage, all-gathered over TP (`runtime_gather_output`); the padded
vocabulary rows are never sampled. The sampled tokens and their log-probs are broadcast from the last
stage (its TP source rank) to every rank of the replica, so each rank returns the same completions.

Log-probs are `log_softmax` over all (padded) logits at temperature 1: the same normalisation as the
training loss (-CE), whatever temperature / top-k / top-p shaped the sampling; with `scaled_logprobs`,
of the temperature-scaled logits (the distribution sampled from before top-k/top-p truncation): the
behaviour log-probs of the RL stages, which compare them with their training forward's
(megaflow.algorithms.rl). `row_seeds` gives every row its own generator, so a row's tokens do not depend
on which other rows share its batch (a data-parallel split samples what one process does).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from megaflow.errors import UserError
from megaflow.inference.model import InferenceModel


@dataclass
class SamplingParams:
    """How to pick tokens. Greedy when `greedy` or `temperature == 0`; else softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and the smallest set whose probability reaches
    `top_p` (1.0: all). `seed` makes sampling reproducible for the same batch (None: a fresh seed).

    A sequence stops after `max_new_tokens`, at the model's context length, at a token of
    `stop_token_ids` (None: the tokenizer's end-of-document and end-of-turn tokens; [] never), or when
    its text contains one of `stop_strings`."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    scaled_logprobs: bool = False  # log-probs of logits / temperature (RL's behaviour policy), not of the logits

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise UserError("stop strings must not be empty")
        self.stop_strings = list(self.stop_strings)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class Completion:
    """One generated sequence. `token_ids` are the generated ids, a final stop token included (it was
    sampled, and PPO trains on it); `logprobs[i]` is the log-prob of `token_ids[i]`; `text` is their text
    without the stop token or stop string. `finish_reason` is "stop" (then `stop` says which token id or
    string) or "length" (max_new_tokens or the model's context)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop: int | str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def default_stop_ids(tokenizer) -> list[int]:
    """End of document, and end of turn when the tokenizer has one (chat models end their turns with it)."""
    if tokenizer is None:
        return []
    ids = [tokenizer.eod_id]
    try:
        ids.append(tokenizer.token_id("end_of_turn"))
    except KeyError:
        pass
    return sorted(set(ids))


def sample_next(logits: torch.Tensor, vocab_size: int, params: SamplingParams,
                generator: torch.Generator | list[torch.Generator] | None,
                active: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [b] and their log-probs [b] from last-position logits [b, padded_vocab] (fp32).

    Log-probs are normalised over all logits (the training loss's normalisation), divided by the
    temperature first with `params.scaled_logprobs`; the choice is made among the first `vocab_size` ids
    only (the rest are megatron's padding rows). A list of generators samples row i with generator i, and
    only the rows `active` says take a token now (a row still in its prompt or finished draws nothing, so its
    samples do not depend on the other rows of the batch); the others get their argmax."""
    logits = logits.float()
    scaled = params.scaled_logprobs and not params.is_greedy
    logprobs = torch.log_softmax(logits / params.temperature if scaled else logits, dim=-1)
    scores = logits[:, :vocab_size]
    if params.is_greedy:
        tokens = scores.argmax(dim=-1)
    else:
        scores = scores / params.temperature
        if params.top_k and params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            drop = mass_before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
            drop[:, 0] = False
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        # inverse-CDF sampling: one uniform number per row against the cumulative probabilities (torch's
        # multinomial draws a random number per vocabulary entry: a quarter of a CPU decode step at vocab 4096)
        if isinstance(generator, list):
            u = torch.zeros(probs.shape[0], 1, device=probs.device)
            for i, g in enumerate(generator):
                if active is None or active[i]:
                    u[i] = torch.rand(1, generator=g, device=probs.device)
        else:
            u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
        # a token of probability 0 (cut by top-k/top-p) is never drawn: its cdf step is empty
        if isinstance(generator, list) and active is not None:  # rows that take no token now: their argmax
            idle = torch.tensor([not a for a in active], device=probs.device)
            tokens = torch.where(idle, probs.argmax(dim=-1), tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


class _Sequence:
    """Book-keeping of one row: generated ids, their log-probs, text, stop, streaming position."""

    def __init__(self, prompt: list[int], max_new: int):
        self.prompt, self.max_new = prompt, max_new
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done = False
        self.finish_reason = "length"
        self.stop: int | str | None = None
        self.text = ""
        self.emitted = 0  # characters handed to the stream callback

    def visible_ids(self) -> list[int]:
        return self.tokens[:-1] if isinstance(self.stop, int) else self.tokens


def _ids(model: InferenceModel, prompt) -> list[int]:
    if isinstance(prompt, str):
        return model.encode(prompt)
    return [int(t) for t in prompt]


def _holdback(text: str, stop_strings: list[str]) -> int:
    """How many trailing characters may still change: an incomplete UTF-8 character (decoded as U+FFFD)
    or the beginning of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def generate(model: InferenceModel, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
             *, use_cache: bool = True, on_text: Callable[[int, str], None] | None = None,
             row_seeds: Sequence[int] | None = None) -> list[Completion]:
    """Complete every prompt (text, or token ids) in one batch; returns one Completion per prompt.

    Every rank of a model replica (its TP and PP ranks) must call this with the same prompts and params.
    `on_text(i, delta)` is called as text of row i becomes final (streaming; a stop string or a
    half-decoded character is held back until it is resolved)."""
    params = params or SamplingParams()
    tokenizer = model.tokenizer
    if not prompts:
        return []
    if (params.stop_strings or on_text is not None) and tokenizer is None:
        raise UserError("stop strings and streaming need a tokenizer")
    need_text = bool(params.stop_strings) or on_text is not None
    stop_ids = set(default_stop_ids(tokenizer) if params.stop_token_ids is None else params.stop_token_ids)
    limit = model.max_sequence_length
    rows = [_Sequence(_ids(model, p), params.max_new_tokens) for p in prompts]
    for i, row in enumerate(rows):
        if not row.prompt:
            raise UserError(f"prompt {i} is empty (give at least one token, e.g. the bos or eod token)")
        if len(row.prompt) >= limit:
            raise UserError(f"prompt {i} has {len(row.prompt)} tokens: the model's context is {limit} "
                            "and leaves no room to generate")
    lengths = [len(r.prompt) for r in rows]
    total = min(max(n + params.max_new_tokens for n in lengths), limit)
    batch = len(rows)
    pad = tokenizer.pad_id if tokenizer is not None else 0
    tokens = torch.full((batch, total), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row.prompt)] = torch.tensor(row.prompt)

    device = model.device
    generator = None
    if not params.is_greedy and row_seeds is not None:
        if len(row_seeds) != batch:
            raise ValueError(f"{len(row_seeds)} row seeds for {batch} prompts")
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]
    elif not params.is_greedy:
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
    context = _static_context(batch, total) if use_cache else None
    cur, prev = min(lengths), 0
    with model.inference_mode(), _megatron_inference_mode(use_cache):
        while cur < total and not all(r.done for r in rows):
            logits = _step_logits(model, tokens, prev, cur, context)
            packed = torch.zeros(2, batch, dtype=torch.float64, device=device)
            if logits is not None:
                active = [not r.done and lengths[i] <= cur for i, r in enumerate(rows)]
                next_tokens, logprobs = sample_next(logits, model.vocab_size, params, generator, active)
                packed[0], packed[1] = next_tokens.to(torch.float64), logprobs.to(torch.float64)
            packed = model.broadcast_from_last_stage(packed).cpu()
            for i, row in enumerate(rows):
                if row.done or lengths[i] > cur:  # finished, or position `cur` is still its prompt's
                    continue
                token = int(packed[0, i])
                tokens[i, cur] = token
                _append(row, token, float(packed[1, i]), stop_ids, params.stop_strings, tokenizer, need_text)
                if cur + 1 >= total:
                    row.done = True  # the model's context (or the batch's length) is full
                if on_text is not None:
                    _stream(row, i, on_text, params.stop_strings)
            prev, cur = cur, cur + 1
    completions = []
    for row in rows:
        text = row.text if need_text else (tokenizer.decode(row.visible_ids()) if tokenizer is not None else "")
        completions.append(Completion(row.prompt, row.tokens, row.logprobs, text, row.finish_reason, row.stop))
    return completions


def _append(row: _Sequence, token: int, logprob: float, stop_ids: set[int], stop_strings: list[str], tokenizer,
            need_text: bool) -> None:
    """Record a generated token and decide whether the row stops (stop token, stop string, max_new_tokens)."""
    row.tokens.append(token)
    row.logprobs.append(logprob)
    if token in stop_ids:
        row.done, row.finish_reason, row.stop = True, "stop", token
    if need_text:
        row.text = tokenizer.decode(row.visible_ids())
        hits = [(row.text.find(s), s) for s in stop_strings if s in row.text] if not row.done else []
        if hits:
            at, s = min(hits)
            row.text = row.text[:at]
            row.done, row.finish_reason, row.stop = True, "stop", s
    if len(row.tokens) >= row.max_new:
        row.done = True


def _stream(row: _Sequence, i: int, on_text, stop_strings: list[str]) -> None:
    safe = len(row.text) if row.done else len(row.text) - _holdback(row.text, stop_strings)
    if safe > row.emitted:
        on_text(i, row.text[row.emitted:safe])
        row.emitted = safe


def _static_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)


def _megatron_inference_mode(active: bool):
    """megatron's InferenceMode flag: with a static context it makes GPTModel materialise only the last
    position's logits (and asks for TP-gathered logits, which `InferenceModel.forward` passes anyway)."""
    if not active:
        return contextlib.nullcontext()
    from megatron.core.inference.utils import InferenceMode

    return InferenceMode.active()


def _step_logits(model: InferenceModel, tokens: torch.Tensor, prev: int, cur: int, context) -> torch.Tensor | None:
    """Logits [b, padded_vocab] predicting position `cur`: from the tokens of [prev, cur) and the KV cache
    of [0, prev), or (no context) from the whole prefix [0, cur) recomputed."""
    if context is None:
        logits = model.forward(tokens[:, :cur])
    else:
        if prev == 0:
            context.reset()
        else:
            context.enable_decode_mode()
        context.sequence_len_offset = prev
        logits = model.forward(tokens[:, prev:cur], inference_context=context, position_offset=prev)
    return None if logits is None else logits[:, -1, :]
