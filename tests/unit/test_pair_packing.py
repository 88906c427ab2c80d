"""Packed preference pairs (megaflow.data.pair_packing): the row layout with a shared prompt, the mask
that keeps each branch away from the other, and the per-sequence sums."""

from __future__ import annotations

import numpy as np
import torch

from megaflow.data import pair_packing as pp
from megaflow.data.preference import PreferenceSample


def sample(prompt, chosen, rejected, i=0):
    c, r = np.array(prompt + chosen), np.array(prompt + rejected)
    cm, rm = np.arange(len(c)) >= len(prompt), np.arange(len(r)) >= len(prompt)
    return PreferenceSample(f"pair {i}", c, cm, r, rm, margin=0.5 * i)


def test_shared_prompt_layout_positions_labels_and_masks():
    s = sample([10, 11, 12], [20, 21], [30])  # K = 3: shares x0, x1; x2 is copied into both branches
    assert pp.shared_tokens(s) == 2 and pp.pair_length(s, True) == 5 + 4 - 2
    row = pp.build_pair_row([s], 12, pad_id=0, share=True)
    assert row["tokens"][:7].tolist() == [10, 11, 12, 20, 21, 12, 30]
    assert row["position_ids"][:7].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert row["branch_ids"][:7].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert row["labels"][:7].tolist() == [11, 12, 20, 21, 0, 30, 0]
    assert row["loss_mask"][:7].tolist() == [0, 0, 1, 1, 0, 1, 0]  # x2 -> 20, 20 -> 21; x2 -> 30
    assert row["seq_index"][:7].tolist() == [-1, -1, 0, 0, 0, 1, 1]
    assert row["segment_ids"][7:].tolist() == [0] * 5 and row["seq_index"][7:].tolist() == [-1] * 5
    masked = pp.pair_mask(torch.from_numpy(row["segment_ids"])[None], torch.from_numpy(row["branch_ids"])[None])[0, 0]
    sees = ~masked
    assert sees[5, :7].tolist() == [True, True, False, False, False, True, False]  # rejected x2: prompt + itself
    assert sees[6, :7].tolist() == [True, True, False, False, False, True, True]
    assert sees[4, :7].tolist() == [True, True, True, True, True, False, False]
    assert all(sees[i].any() for i in range(12))  # padding attends to padding


def test_without_sharing_each_sequence_is_whole_and_the_sums_land_per_pair():
    pairs = [sample([1, 2], [3], [4, 5], 0), sample([6], [7, 8], [9], 1)]
    row = pp.build_pair_row(pairs, 16, pad_id=0, share=False)
    assert row["tokens"][:12].tolist() == [1, 2, 3, 1, 2, 4, 5, 6, 7, 8, 6, 9]
    assert row["position_ids"][:12].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]
    segments = pp.thd_segments(torch.from_numpy(row["segment_ids"]), torch.from_numpy(row["branch_ids"]))
    assert len(set(segments[:12].tolist())) == 4  # one attention segment per sequence
    values = torch.from_numpy(row["loss_mask"])[None] * torch.arange(16.0)[None]
    sums = pp.sequence_sums(values, torch.from_numpy(row["seq_index"])[None], slots=2).reshape(2, 2)
    assert sums.tolist() == [[1.0, 4.0 + 5.0], [7.0 + 8.0, 10.0]]  # the positions that predict a response token


def test_dataset_packs_every_pair_once_with_its_slot_data():
    pairs = [sample([1, 2, 3], [4] * (i % 4 + 1), [5] * (i % 3 + 1), i) for i in range(9)]
    ds = pp.PackedPreferenceDataset(pairs, seq_length=8, pad_id=0, share=True, reference=np.arange(18.0).reshape(9, 2))
    seen = []
    for i in range(len(ds)):
        item = ds[i]
        members = [int(j) for j in item["pair_index"] if j >= 0]
        seen += members
        assert item["ref_logps"][:len(members)].tolist() == [[2.0 * j, 2.0 * j + 1] for j in members]
        assert item["margin"][:len(members)].tolist() == [0.5 * j for j in members]
        assert int(item["seq_index"].max()) == 2 * len(members) - 1
    assert sorted(seen) == list(range(9)) and 0 < ds.efficiency() <= 1
