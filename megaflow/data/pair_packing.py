"""Packed preference pairs: several pairs per row, padding gone, and (with megatron's local attention)
one copy of each pair's prompt for both of its responses.

Unpacked, a pair is two right-padded rows (megaflow.data.preference). Packed, it is one stretch of a row
of 2 * seq_length positions (a pair always fits), pairs placed by best-fit decreasing. With prompt
sharing, for a chosen sequence x_0..x_{Lc-1} and a rejected one sharing their first K tokens (K at most
the first response token):

    [ x_0 .. x_{K-2} | x_{K-1} c_K .. c_{Lc-1} | x_{K-1} r_K .. r_{Lr-1} ]
      shared (branch 0)  chosen (branch 1)         rejected (branch 2)

Positions run 0..K-2 over the shared part and from K-1 on within each branch, as in the sequence's own
row. A token attends causally, within its pair, to the shared part and to its own branch, never to the
other branch (`pair_mask`), so every position computes what it computes in its own row: the summed
response log-probs are those of the unpacked layout. The last shared token x_{K-1} is copied into both
branches because its logits predict each branch's first response token. A pair then costs
Lc + Lr - (K - 1) positions instead of 2 * seq_length.

Without sharing (Transformer Engine's packed attention takes segments, not arbitrary masks), a pair's two
sequences are two segments of the row and the branches start at position 0.

Per position: `seq_index` = 2k + side (side 0 chosen, 1 rejected) for the k-th pair of the row, so the
per-sequence sums are a scatter-add; per row: `pair_index` (dataset index of each pair slot, -1 when
empty), `margin` and, with cached reference log-probs, `ref_logps` [slots, 2].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megaflow.data.packing import pack
from megaflow.data.preference import PreferenceSample, _response_start

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "branch_ids", "seq_index")


def shared_tokens(s: PreferenceSample) -> int:
    """How many leading tokens the pair's two sequences share in the packed layout: K - 1, with K their
    common prefix capped at the first response token."""
    c, r = s.chosen_ids, s.rejected_ids
    n = min(len(c), len(r))
    differ = np.nonzero(c[:n] != r[:n])[0]
    common = int(differ[0]) if len(differ) else n
    return max(min(common, _response_start(s.chosen_mask, s.rejected_mask)) - 1, 0)


def pair_length(s: PreferenceSample, share: bool) -> int:
    return len(s.chosen_ids) + len(s.rejected_ids) - (shared_tokens(s) if share else 0)


def build_pair_row(samples: Sequence[PreferenceSample], row_length: int, pad_id: int, share: bool) -> dict:
    """One packed row (numpy arrays of `row_length`, see the module docstring) of the given pairs."""
    out = {k: np.zeros(row_length, dtype=np.int64) for k in ROW_KEYS}
    out["tokens"][:] = pad_id
    out["labels"][:] = pad_id
    out["loss_mask"] = np.zeros(row_length, dtype=np.float32)
    out["seq_index"][:] = -1
    at = 0
    for k, s in enumerate(samples):
        n_shared = shared_tokens(s) if share else 0
        if n_shared:
            span = slice(at, at + n_shared)
            out["tokens"][span] = s.chosen_ids[:n_shared]
            out["labels"][span] = s.chosen_ids[1:n_shared + 1]  # the shared tokens' next tokens are common
            out["position_ids"][span] = np.arange(n_shared)
            out["segment_ids"][span] = k + 1
            at += n_shared
        for side, (ids, mask) in enumerate(((s.chosen_ids, s.chosen_mask), (s.rejected_ids, s.rejected_mask))):
            n = len(ids) - n_shared
            span = slice(at, at + n)
            out["tokens"][span] = ids[n_shared:]
            out["labels"][at:at + n - 1] = ids[n_shared + 1:]
            out["loss_mask"][at:at + n - 1] = mask[n_shared + 1:]
            out["position_ids"][span] = np.arange(n_shared, len(ids))
            out["segment_ids"][span] = k + 1
            out["branch_ids"][span] = side + 1
            out["seq_index"][span] = 2 * k + side
            at += n
    if at > row_length:
        raise ValueError(f"{len(samples)} pairs take {at} positions, more than the row's {row_length}")
    return out


def pair_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask for megatron's local attention, True = masked out: query i may attend key
    j only if j <= i, both belong to the same pair (segment) and j is in the shared part or in i's branch.
    Padding attends to padding, so no query row is fully masked."""
    s = segment_ids.shape[-1]
    same_pair = segment_ids[:, :, None] == segment_ids[:, None, :]
    visible_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same_pair & visible_branch & causal)[:, None]


def thd_segments(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Segment ids for TE's packed attention without sharing: each sequence (pair, side) its own segment."""
    return segment_ids * 3 + branch_ids


class PackedPreferenceDataset:
    """Rows of packed pairs. Row i is a dict of [row_length] tensors (ROW_KEYS) and per-slot `pair_index`,
    `margin` ([slots]) and, given `reference` ([n, 2] log-probs), `ref_logps` ([slots, 2]); `slots` is the
    most pairs any row holds, the same for every row so micro-batches stack."""

    def __init__(self, samples: list[PreferenceSample], seq_length: int, pad_id: int, share: bool,
                 reference: np.ndarray | None = None):
        self.samples, self.row_length, self.pad_id, self.share = samples, 2 * seq_length, pad_id, share
        self.reference = reference
        self.rows = pack([pair_length(s, share) for s in samples], self.row_length)
        self.slots = max(len(r) for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def efficiency(self) -> float:
        """Share of the rows' positions holding tokens."""
        return sum(pair_length(s, self.share) for s in self.samples) / (len(self.rows) * self.row_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        members = self.rows[i]
        row = build_pair_row([self.samples[j] for j in members], self.row_length, self.pad_id, self.share)
        out = {k: torch.from_numpy(v) for k, v in row.items()}
        index = np.full(self.slots, -1, dtype=np.int64)
        index[:len(members)] = members
        out["pair_index"] = torch.from_numpy(index)
        out["margin"] = torch.tensor([self.samples[j].margin or 0.0 for j in members] + [0.0] * (self.slots - len(members)))
        if self.reference is not None:
            ref = np.zeros((self.slots, 2))
            ref[:len(members)] = self.reference[members]
            out["ref_logps"] = torch.from_numpy(ref)
        return out


def sequence_sums(values: torch.Tensor, seq_index: torch.Tensor, slots: int) -> torch.Tensor:
    """Per-sequence sums [b * slots * 2] of per-position `values` [b, s] (already masked): sequence
    2k + side of row r lands at r * 2 * slots + 2k + side; positions with seq_index -1 are dropped."""
    b = values.shape[0]
    index = seq_index + (torch.arange(b, device=seq_index.device)[:, None] * 2 * slots)
    keep = seq_index >= 0
    out = torch.zeros(b * 2 * slots, dtype=torch.float32, device=values.device)
    return out.index_add(0, index[keep], values[keep].float())
