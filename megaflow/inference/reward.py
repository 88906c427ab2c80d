"""Rewards of a reward model (a checkpoint with `"head": "scalar"`, from `megaflow train rm`):

    r(x) = w . h_L(x)

the scalar head's value at the last token of the rendered sequence x (prompt, response and its end of
turn), as in training (megaflow.algorithms.rm). Sequences are right-padded in a batch; causal attention
keeps padding out of every real position.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megaflow.errors import UserError
from megaflow.inference.model import InferenceModel


def is_reward_model(model: InferenceModel) -> bool:
    return (model.meta or {}).get("head") == "scalar"


def rewards(model: InferenceModel, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
    """One reward per token sequence, on every rank."""
    if not is_reward_model(model):
        raise UserError('not a reward model (its megaflow.json has no "head": "scalar"; train one with '
                        "`megaflow train rm`)")
    seqs = [[int(t) for t in s] for s in sequences]
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= model.max_sequence_length:
            raise UserError(f"sequence {i} has {len(s)} tokens: a reward needs 1 to {model.max_sequence_length}")
    out = [0.0] * len(seqs)
    pad = model.tokenizer.pad_id if model.tokenizer is not None else 0
    with model.inference_mode():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start:start + batch_size]
            width = max(len(s) for s in batch)
            tokens = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, s in enumerate(batch):
                tokens[row, :len(s)] = torch.tensor(s)
            last = torch.tensor([len(s) - 1 for s in batch], device=model.device)
            values = model.forward(tokens)
            got = torch.zeros(len(batch), dtype=torch.float64, device=model.device)
            if values is not None:
                got = values[torch.arange(len(batch), device=model.device), last, 0].double()
            got = model.broadcast_from_last_stage(got).cpu()
            out[start:start + len(batch)] = got.tolist()
    return out
