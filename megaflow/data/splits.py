"""The train/valid/test split of pretraining sources: by documents as megatron does, or by tokens when a
source has too few documents for that.

megatron's builder gives split s of a source the sequences [round(b_s * n), round(e_s * n)) of its n
sequences (one per document in what megaflow preprocesses). A book, a code file or any text without
blank lines is one document, so a split with a weight can receive no document at all, and megatron's
GPTDataset then loops forever looking for tokens that are not there. When any split of any source would
hold fewer tokens than one sample (seq_length + 1), every source is instead cut by tokens at the same
fractions, [round(b_s * T), round(e_s * T)) of its T tokens, into one indexed dataset per split (a
document crossing a cut is split in two), and the datasets are built from those per-split blends.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaflow.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def split_matrix(split: list[float]) -> list[tuple[float, float] | None]:
    """The fractions (begin, end) of each split, None for a split without weight (megatron's own reading of
    `data.split`, so both ways of splitting cut at the same places)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(",".join(str(s) for s in split)))


def bounds(n: int, matrix: list[tuple[float, float] | None]) -> list[tuple[int, int] | None]:
    """[round(b * n), round(e * n)) for each split, as megatron's builder computes it."""
    return [None if m is None else (int(round(m[0] * n)), int(round(m[1] * n))) for m in matrix]


def tokens_by_documents(sequence_lengths: np.ndarray, matrix) -> list[int | None]:
    """Tokens each split receives when the split is by sequences (documents)."""
    ends = np.concatenate([[0], np.cumsum(sequence_lengths, dtype=np.int64)])
    return [None if b is None else int(ends[b[1]] - ends[b[0]]) for b in bounds(len(sequence_lengths), matrix)]


def tokens_by_tokens(total_tokens: int, matrix) -> list[int | None]:
    return [None if b is None else b[1] - b[0] for b in bounds(total_tokens, matrix)]


@dataclass
class SplitPlan:
    """How the datasets are built: `per_split` is None for megatron's document split of `prefixes`, else
    the prefixes of each split's token-cut datasets (None for a split without weight)."""

    prefixes: list[str]
    per_split: list[list[str] | None] | None = None


def sequence_lengths(prefix: str) -> np.ndarray:
    """The tokens of each sequence of the indexed dataset PREFIX.bin/.idx, after checking that the index
    reads and that the .bin holds exactly the tokens it lists (a DataError naming the file if not)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)  # its views die with it: copy before letting go
        lengths, itemsize = index.sequence_lengths.astype(np.int64), np.dtype(index.dtype).itemsize
        del index
    except (AssertionError, ValueError, OSError, struct.error, KeyError) as e:
        raise DataError(f"{prefix}.idx: not a readable megatron index ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    expected, actual = int(lengths.sum()) * itemsize, os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"{prefix}.bin: {actual:,} bytes, but its index lists {expected:,} (truncated or from another "
                        "dataset); preprocess it again")
    return lengths


def plan_splits(prefixes: list[str], split: list[float], seq_length: int, cache_dir: Path, write: bool,
                names: list[str] | None = None, log=print) -> SplitPlan:
    """Check that every split with a weight gets at least one sample of every source, by documents if it
    can, else by tokens (writing the per-split datasets when `write`, i.e. on rank 0); a source too small
    even for that is a DataError naming it, its split and what to change."""
    matrix = split_matrix(split)
    need = seq_length + 1
    names = names or prefixes
    lengths = [sequence_lengths(p) for p in prefixes]
    by_documents = [tokens_by_documents(ls, matrix) for ls in lengths]
    short = [(i, s) for i, per in enumerate(by_documents) for s, t in enumerate(per) if t is not None and t < need]
    if not short:
        return SplitPlan(prefixes)
    i, s = short[0]
    for j, ls in enumerate(lengths):
        per = tokens_by_tokens(int(ls.sum()), matrix)
        for k, t in enumerate(per):
            if t is not None and t < need:
                raise DataError(
                    f"{names[j]}: its {SPLIT_NAMES[k]} split (data.split {split}) would hold {t} of its "
                    f"{int(ls.sum())} tokens, fewer than one sample (data.seq_length + 1 = {need}): give it more "
                    f"text, a shorter data.seq_length, or a larger weight to that split (0 switches it off)")
    log(f"data: {names[i]} has {len(lengths[i])} document(s), too few to split by documents "
        f"(its {SPLIT_NAMES[s]} split would hold {by_documents[i][s]} tokens); every source is split by tokens instead")
    per_split: list[list[str] | None] = [None if m is None else [] for m in matrix]
    for prefix, ls in zip(prefixes, lengths):
        for k, out in enumerate(token_split(prefix, ls, matrix, cache_dir, write)):
            if out is not None:
                per_split[k].append(out)
    return SplitPlan(prefixes, per_split)


def token_split(prefix: str, sequence_lengths: np.ndarray, matrix, cache_dir: Path, write: bool) -> list[str | None]:
    """The per-split prefixes of `prefix` cut by tokens, cached in `cache_dir` under a key of the source's
    files and the split; written (when `write`) under temporary names, the .idx renamed last."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    st = [os.stat(prefix + s) for s in (".bin", ".idx")]
    key = hashlib.sha256(json.dumps([os.path.abspath(prefix), [(x.st_size, x.st_mtime_ns) for x in st],
                                     [list(m) if m else None for m in matrix]]).encode()).hexdigest()[:12]
    base = str(Path(cache_dir) / f"{Path(prefix).name}-tokensplit-{key}")
    outs = [None if m is None else f"{base}-{SPLIT_NAMES[k]}" for k, m in enumerate(matrix)]
    if not write or all(o is None or os.path.isfile(o + ".idx") for o in outs):
        return outs
    index = _IndexReader(prefix + ".idx", multimodal=False)
    dtype = index.dtype
    del index
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(sequence_lengths, dtype=np.int64)])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for out, b in zip(outs, bounds(int(starts[-1]), matrix)):
        if out is None:
            continue
        tmp = f"{out}.tmp-{os.getpid()}"
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        first = int(np.searchsorted(starts, b[0], side="right")) - 1
        for d in range(first, len(sequence_lengths)):
            lo, hi = max(starts[d], b[0]), min(starts[d + 1], b[1])
            if lo >= b[1]:
                break
            if hi > lo:
                builder.add_document(np.asarray(tokens[lo:hi]), [int(hi - lo)])
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", out + ".bin")
        os.replace(tmp + ".idx", out + ".idx")
    return outs
