"""A forward-only pass that gathers per-sample outputs (log-probs, values, rewards) over micro-batches,
pipeline stages and data-parallel replicas: what the RL stages run their actor, reference, critic and
reward model with between updates.

The dataset's items carry their `index`; each replica takes its share of ceil(N / (mbs * dp)) micro-batches
through megatron's forward-only schedule (any TP/PP layout), the last pipeline stage's TP rank 0 records
`(index, output)` per row, and the records are gathered on every rank. A micro-batch that wraps around the
dataset computes an item twice, with equal results.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from megaflow.data.sampler import MicroBatches
from megaflow.training.engine import Task, data_parallel_rank_and_size, forward_backward


class _Recording(Task):
    loss_names = ("collected",)

    def __init__(self, compute: Callable, prepare: Callable):
        self.compute, self.prepare = compute, prepare
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward_step(self, data_iterator, model):
        batch = self.prepare(next(data_iterator))
        return self.compute(model, batch), functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, output: torch.Tensor):
        self.recorded.append((batch["index"].cpu(), output.detach().float().cpu()))
        zero = output.detach().float().sum() * 0.0
        return zero, torch.tensor(1, dtype=torch.int, device=output.device), {"collected": torch.stack([zero, zero + 1])}


@torch.no_grad()
def collect(model_chunks, dataset, compute: Callable, prepare: Callable, micro_batch_size: int, seq_length: int,
            collate: Callable) -> torch.Tensor:
    """[N, ...] outputs of `compute(model, batch)` (per row of a micro-batch; [b, ...] on the last stage,
    hidden states before it) for every item of `dataset`, on every rank. `prepare` moves a collated batch
    to the device; rows have `seq_length` positions when the model is pipelined."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = data_parallel_rank_and_size()
    n_micro = -(-len(dataset) // (micro_batch_size * dp_size))
    task = _Recording(compute, prepare)
    iterators = [MicroBatches(dataset, micro_batch_size, dp_rank, dp_size, collate=collate) for _ in model_chunks]
    was_training = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()
    try:
        forward_backward(model_chunks, task, iterators, n_micro, seq_length, micro_batch_size, forward_only=True)
    finally:
        for c, training in zip(model_chunks, was_training):
            c.train(training)
    holder = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    mine = task.recorded if holder else []
    everyone = [mine]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
    out = None
    for records in everyone:
        for index, output in records:
            if output.dim() >= 2 and output.shape[1] < seq_length:  # rows cut after their longest (padding)
                output = torch.nn.functional.pad(output, (0, 0) * (output.dim() - 2) + (0, seq_length - output.shape[1]))
            if out is None:
                out = torch.full((len(dataset), *output.shape[1:]), float("nan"))
            out[index] = output
    if out is None or torch.isnan(out.reshape(len(dataset), -1)[:, 0]).any():
        raise RuntimeError("collect: some items were not computed")
    return out
