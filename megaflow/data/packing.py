"""Packing several SFT samples into one fixed-length sequence, and the attention inputs that keep them apart.

A packed row holds whole samples one after another, then padding. `segment_ids` numbers them 1, 2, ...
within the row (0 = padding) and `position_ids` restart at 0 for each, so a model with learned absolute
positions (GPT-2) sees every sample at the positions it would see alone; RoPE is relative and needs no
restart. Attention must not cross samples:
- on CPU, megatron's local layer spec takes a boolean mask (True = masked out) and rejects PackedSeqParams,
  so the mask is block-diagonal and causal within each block (`block_diagonal_mask`);
- on GPU, Transformer Engine attends over the packed "thd" layout given cumulative sequence lengths
  (`packed_seq_params`); TE's thd kernels take one sequence of tokens, so a [b, s] micro-batch is
  flattened to [1, b*s] (`to_thd`), each row's samples and its padding becoming segments of that sequence.
  megatron then restarts RoPE per segment by itself. With pipeline parallelism the schedule must be
  told the flattened shape (seq_length b*s, micro-batch 1), or use micro_batch_size 1.

Example of a stage's get_batch:

    batch = next(data_iterator)
    if gpt.use_transformer_engine():
        batch = to_thd(batch)
        mask, psp = None, packed_seq_params(batch["segment_ids"])
    else:
        mask, psp = block_diagonal_mask(batch["segment_ids"]), None
    model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"], packed_seq_params=psp)
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch


ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")  # the [b, s] entries of a batch


def trim_padding(batch: dict[str, torch.Tensor], multiple: int, keys: Sequence[str] = ROW_KEYS) -> dict[str, torch.Tensor]:
    """A batch of right-padded rows cut after its longest row's last token, rounded up to `multiple` (and
    never longer than it was). The positions cut carry no loss, and causal attention never lets a kept
    position see them, so every kept position computes what it did in the full row: only the padding's
    compute is saved (TRL's and HF's `padding="longest"`). `keys` are the batch's [b, s] entries."""
    length = batch["segment_ids"].shape[1]
    used = int((batch["segment_ids"] > 0).sum(1).max())  # right-padded: each row's tokens are a prefix
    keep = min(length, -(-max(used, 1) // multiple) * multiple)
    if keep == length:
        return batch
    return batch | {k: batch[k][:, :keep] for k in keys if k in batch}


def pack(lengths: Sequence[int], capacity: int, packing: bool = True) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most `capacity`.

    Without packing, one sample per row in index order. With packing, best-fit decreasing: samples from
    the longest down, each into the fullest row it still fits (a new row if none): at most about 11/9 of
    the fewest rows possible, and a function of the lengths alone (the iterator shuffles the rows)."""
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every sample length must be in [1, {capacity}]")
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row) sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            remaining, row = capacity - n, len(rows) - 1
        else:
            remaining, row = free.pop(k)
            rows[row].append(i)
            remaining -= n
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


def build_row(samples: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row from (token ids, loss-target mask) samples: each sample of L tokens gives L-1 inputs
    (tokens[:-1]) predicting labels tokens[1:], whose loss_mask is mask[1:]; so no label crosses a sample
    boundary. Padding has label pad_id, loss_mask 0, segment 0, position 0."""
    out = {
        "tokens": np.full(seq_length, pad_id, dtype=np.int64),
        "labels": np.full(seq_length, pad_id, dtype=np.int64),
        "loss_mask": np.zeros(seq_length, dtype=np.float32),
        "position_ids": np.zeros(seq_length, dtype=np.int64),
        "segment_ids": np.zeros(seq_length, dtype=np.int64),
    }
    at = 0
    for k, (ids, mask) in enumerate(samples, start=1):
        n = len(ids) - 1
        if at + n > seq_length:
            raise ValueError(f"samples of {at + n} positions do not fit in {seq_length}")
        out["tokens"][at:at + n] = ids[:-1]
        out["labels"][at:at + n] = ids[1:]
        out["loss_mask"][at:at + n] = mask[1:]
        out["position_ids"][at:at + n] = np.arange(n)
        out["segment_ids"][at:at + n] = k
        at += n
    return out


# --- attention inputs ---------------------------------------------------------------------------


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask for megatron's local attention, True = masked out: query i may attend
    key j only if j <= i and both lie in the same segment (padding attends to padding, so no query row
    is fully masked)."""
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[:, None]


def cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths over the flattened [b*s] sequence (int32, starting at 0 and ending at
    b*s: every row's samples and its padding run are segments) and the longest segment."""
    b, s = segment_ids.shape
    row = torch.arange(b, device=segment_ids.device)[:, None].expand(b, s)
    key = (segment_ids + row * (int(segment_ids.max()) + 1)).reshape(-1)
    starts = torch.nonzero(key[1:] != key[:-1]).reshape(-1) + 1
    total = torch.tensor([b * s], device=segment_ids.device)
    bounds = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts, total])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def packed_seq_params(segment_ids: torch.Tensor):
    """megatron PackedSeqParams (qkv_format "thd") for TE attention over the flattened micro-batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens(segment_ids.reshape(1, -1) if segment_ids.dim() == 1 else segment_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def to_thd(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every [b, s] tensor of the batch as [1, b*s] (the one-sequence layout TE's thd attention takes).
    Segment ids are made unique per row first, so `packed_seq_params` of the result keeps rows apart."""
    out = {k: v.reshape(1, -1) for k, v in batch.items()}
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        row = torch.arange(seg.shape[0], device=seg.device)[:, None]
        out["segment_ids"] = (seg + row * (int(seg.max()) + 1)).reshape(1, -1)
    return out
