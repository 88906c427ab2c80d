"""Log-prob scoring of given continuations: the training forward, read as log-probs.

    log p(x_t | x_<t) = -CE_t

where CE_t is megatron's vocab-parallel cross entropy of the model's (vocab-parallel, padded) logits,
computed by the very function the training loss calls (`GPTModel.compute_language_model_loss`), on a
right-padded batch laid out as in training (`tokens = seq[:-1]`, `labels = seq[1:]`, causal mask). So
scores equal the training forward's per-token log-probs (DPO's and PPO's log-ratios start at 0), and
under TP no rank ever holds the full vocabulary. The greedy flag of lm-eval-harness (would greedy
decoding have produced the continuation?) takes a per-shard argmax over the true vocabulary, reduced
over TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megaflow.errors import UserError
from megaflow.inference.model import InferenceModel


@dataclass
class Score:
    """Scores of one continuation: per-token log-probs, their sum, and whether every continuation token
    is the model's argmax (lm-eval-harness's `is_greedy`)."""

    tokens: list[int]
    logprobs: list[float]
    is_greedy: bool

    @property
    def sum(self) -> float:
        return float(sum(self.logprobs))


def _ids(model: InferenceModel, x) -> list[int]:
    if isinstance(x, str):
        return model.encode(x) if x else []
    return [int(t) for t in x]


def _tp_argmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Argmax over the true vocabulary of vocab-parallel logits [b, s, V/tp] (ties: the lowest id)."""
    from megatron.core import parallel_state as ps

    shard = logits.shape[-1]
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    start = ps.get_tensor_model_parallel_rank() * shard if tp > 1 else 0
    ids = torch.arange(start, start + shard, device=logits.device)
    masked = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    best, where = masked.max(dim=-1)
    where = where + start
    if tp == 1:
        return where
    group = ps.get_tensor_model_parallel_group()
    bests = [torch.empty_like(best) for _ in range(tp)]
    wheres = [torch.empty_like(where) for _ in range(tp)]
    torch.distributed.all_gather(bests, best, group=group)
    torch.distributed.all_gather(wheres, where, group=group)
    bests, wheres = torch.stack(bests), torch.stack(wheres)
    winner = bests.argmax(dim=0, keepdim=True)  # first shard with the maximum: the lowest id
    return wheres.gather(0, winner).squeeze(0)


def _batch_logprobs(model: InferenceModel, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs [b, L-1] of seq[1:] given seq[:-1] and argmax ids [b, L-1], on every rank
    (computed on the last pipeline stage and broadcast). Rows are right-padded to the longest, L."""
    from megaflow.models.gpt import unwrap

    width = max(len(s) for s in seqs)
    pad = model.tokenizer.pad_id if model.tokenizer is not None else 0
    full = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        full[i, : len(s)] = torch.tensor(s)
    tokens, labels = full[:, :-1], full[:, 1:].to(model.device)
    packed = torch.zeros(2, len(seqs), width - 1, dtype=torch.float64, device=model.device)
    logits = model.forward(tokens, gather=False)
    if logits is not None:
        ce = unwrap(model.chunks[0]).compute_language_model_loss(labels, logits.transpose(0, 1).contiguous())
        packed[0] = -ce.to(torch.float64)
        packed[1] = _tp_argmax(logits, model.vocab_size).to(torch.float64)
    packed = model.broadcast_from_last_stage(packed).cpu()
    return packed[0], packed[1].long()


def logprobs_of(model: InferenceModel, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """Log-probs (float64, [len(seq) - 1]) of every token of every sequence after its first, from the
    training forward; e.g. PPO's old-policy and reference log-probs of generated rollouts. Batches hold up
    to `batch_size` sequences of similar length (sorted by length, returned in the given order)."""
    seqs = [[int(t) for t in s] for s in sequences]
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise UserError(f"sequence {i} has {len(s)} token(s): scoring needs at least two")
        if len(s) - 1 > model.max_sequence_length:
            raise UserError(f"sequence {i} has {len(s)} tokens: the model's context is {model.max_sequence_length}")
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with model.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lp, _ = _batch_logprobs(model, [seqs[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = lp[row, : len(seqs[i]) - 1].clone()
    return out


def score(model: InferenceModel, prompts: Sequence[str | Sequence[int]], continuations: Sequence[str | Sequence[int]],
          batch_size: int = 8) -> list[Score]:
    """Log-probs of each continuation given its prompt (text or ids), one Score per pair.

    An empty prompt is replaced by the end-of-document token (the first continuation token needs
    something to be predicted from, as in lm-eval-harness). A pair longer than the model's context loses
    prompt tokens from the left; a continuation that alone does not fit is an error."""
    if len(prompts) != len(continuations):
        raise UserError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    limit = model.max_sequence_length + 1  # the last token is only a label
    pairs = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        p_ids, c_ids = _ids(model, p), _ids(model, c)
        if not c_ids:
            raise UserError(f"continuation {i} is empty")
        if not p_ids:
            if model.tokenizer is None:
                raise UserError(f"prompt {i} is empty and there is no tokenizer to take an end-of-document token from")
            p_ids = [model.tokenizer.eod_id]
        if len(c_ids) >= limit:
            raise UserError(f"continuation {i} has {len(c_ids)} tokens: the model's context is {model.max_sequence_length}")
        p_ids = p_ids[-(limit - len(c_ids)):]
        pairs.append((p_ids, c_ids))
    results: list[Score | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    with model.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lp, best = _batch_logprobs(model, [pairs[i][0] + pairs[i][1] for i in idx])
            for row, i in enumerate(idx):
                p_ids, c_ids = pairs[i]
                span = slice(len(p_ids) - 1, len(p_ids) - 1 + len(c_ids))  # label positions of the continuation
                greedy = bool((best[row, span] == torch.tensor(c_ids)).all())
                results[i] = Score(c_ids, lp[row, span].tolist(), greedy)
    return results
