"""Tokenize text corpora into megatron indexed datasets: PREFIX.bin, PREFIX.idx (and PREFIX.json).

Documents stream from the readers in fixed-size chunks, worker processes tokenize the chunks, and the
main process writes them back in input order, so the output is byte-identical for any worker count and
memory stays flat for any corpus size. Files are written under temporary names and renamed into place
at the end: a failed run leaves nothing behind, and PREFIX.json (written last) marks a complete dataset.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megaflow.data.readers import ReadStats, expand_inputs, iter_documents
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import DataError, UserError

# A chunk is the unit of work sent to a worker: big enough to amortise the pickling, small enough
# that (2 x workers) chunks in flight stay a few tens of MB.
CHUNK_CHARS = 1 << 20
CHUNK_DOCUMENTS = 1024


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0  # tokens written to PREFIX.bin, one eod per document included
    files: int = 0
    invalid_utf8_replaced: int = 0
    nul_bytes: int = 0
    seconds: float = 0.0
    output_prefix: str = ""

    def summary(self) -> str:
        return (f"preprocessed {self.files} file(s): {self.documents:,} documents, {self.tokens:,} tokens, "
                f"{self.invalid_utf8_replaced:,} invalid UTF-8 sequences replaced"
                + (f", {self.nul_bytes:,} NUL bytes" if self.nul_bytes else "") + " -> "
                f"{self.output_prefix}.bin/.idx in {self.seconds:.1f}s")


def preprocess(
    inputs: Iterable[str],
    tokenizer_dir: str,
    output_prefix: str,
    workers: int = 1,
    field: str = "text",
    split_documents_on: str = "blank_line",
    invalid_utf8: str = "replace",
    progress: bool | None = None,
    max_invalid_utf8: float = 0.01,
) -> PreprocessStats:
    """Write every document of `inputs`, tokenized and followed by eod, as one item of PREFIX.bin/.idx.

    A file whose invalid UTF-8 sequences and NUL bytes pass `max_invalid_utf8` of its bytes is not text
    (a binary file, another encoding) and is refused; below that, replacements are warned about.
    `progress=None` shows a progress bar on stderr only when it is a terminal.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # ~5 s; not in workers

    inputs = expand_inputs([str(p) for p in inputs])  # a directory: its data files (a curate stage's shards)
    _check_inputs(inputs)
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    read_options = dict(field=field, split_documents_on=split_documents_on, invalid_utf8=invalid_utf8)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    prefix = str(output_prefix)
    if prefix.endswith(("/", os.sep)) or not Path(prefix).name:
        raise UserError(f"--output {prefix}: a directory; give a file prefix such as {Path(prefix) / 'corpus'}")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{prefix}.tmp-{os.getpid()}"
    stats, started = PreprocessStats(output_prefix=prefix), time.perf_counter()
    builder = IndexedDatasetBuilder(f"{temporary}.bin", dtype=dtype)
    try:
        bar = tqdm(total=sum(os.path.getsize(p) for p in inputs), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="preprocess", file=sys.stderr, disable=None if progress is None else not progress)
        chunks = _chunks(inputs, read_options, stats, max_invalid_utf8)
        with bar, contextlib.closing(_encode_chunks(chunks, tokenizer, workers)) as encoded:
            for tokens, lengths, bytes_read in encoded:
                start = 0
                for length in lengths.tolist():
                    builder.add_document(tokens[start : start + length], [length])
                    start += length
                stats.tokens += start
                bar.update(bytes_read - bar.n)
        builder.finalize(f"{temporary}.idx")
        stats.seconds = time.perf_counter() - started
        with contextlib.suppress(FileNotFoundError):  # a stale PREFIX.json must never vouch for new files
            os.remove(f"{prefix}.json")
        os.replace(f"{temporary}.bin", f"{prefix}.bin")
        os.replace(f"{temporary}.idx", f"{prefix}.idx")
        metadata = _metadata(inputs, tokenizer_dir, read_options) | {"dtype": np.dtype(dtype).name, "stats": asdict(stats)}
        _write_json_atomically(f"{prefix}.json", metadata)
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary + suffix)
        raise
    return stats


def count_tokens(inputs: Iterable[str], tokenizer: Tokenizer | str, field: str = "text",
                 split_documents_on: str = "blank_line", invalid_utf8: str = "replace") -> int:
    """Tokens `preprocess` would write for `inputs` (one eod per document included), in this process."""
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    return sum(len(tokenizer.encode(doc)) + 1 for path in inputs
               for doc in iter_documents(path, field, split_documents_on, invalid_utf8))


def cached_stats(inputs: Iterable[str], tokenizer_dir: str, output_prefix: str, field: str = "text",
                 split_documents_on: str = "blank_line", invalid_utf8: str = "replace") -> PreprocessStats | None:
    """The stats of an existing PREFIX.bin/.idx made from these very files and tokenizer, else None."""
    prefix = str(output_prefix)
    if not all(os.path.isfile(prefix + s) for s in (".bin", ".idx", ".json")):
        return None
    try:
        with open(f"{prefix}.json", encoding="utf-8") as f:
            saved = json.load(f)
        current = _metadata([str(p) for p in inputs], tokenizer_dir,
                            dict(field=field, split_documents_on=split_documents_on, invalid_utf8=invalid_utf8))
    except (OSError, ValueError):
        return None
    if any(saved.get(key) != value for key, value in current.items()):
        return None
    return PreprocessStats(**saved["stats"])


# --- the pipeline: documents -> chunks -> (workers) -> token arrays ----------------------------------


def _check_inputs(inputs: list[str]) -> None:
    if not inputs:
        raise DataError("preprocess needs at least one input file")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")


def _check_text(path: str, read: ReadStats, max_fraction: float, final: bool) -> None:
    """Refuse a file once its invalid UTF-8 sequences and NUL bytes pass `max_fraction` of its size;
    at its end, warn about any that stayed below."""
    bad, size = read.invalid_utf8_replaced + read.nul_bytes, max(os.path.getsize(path), 1)
    if bad > max_fraction * size:
        raise DataError(f"{path}: not UTF-8 text (a binary file, or another encoding?): {read.invalid_utf8_replaced:,} invalid UTF-8 sequences and "
                        f"{read.nul_bytes:,} NUL bytes{'' if final else ' so far'} in {size:,} bytes, over "
                        f"the limit of {max_fraction:.2%} (data.max_invalid_utf8, --max-invalid-utf8)")
    if final and bad:
        print(f"megaflow: warning: {path}: {read.invalid_utf8_replaced:,} invalid UTF-8 sequences replaced with "
              f"U+FFFD, {read.nul_bytes:,} NUL bytes kept", file=sys.stderr)


def _chunks(inputs: list[str], read_options: dict, stats: PreprocessStats,
            max_invalid_utf8: float = 1.0) -> Iterator[tuple[list[str], int]]:
    """Yield (documents, input bytes read so far) in input order; count files, documents and replacements."""
    bytes_before = 0
    for path in inputs:
        read = ReadStats()
        chunk, chars = [], 0
        for document in iter_documents(path, stats=read, **read_options):
            chunk.append(document)
            chars += len(document)
            if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
                _check_text(path, read, max_invalid_utf8, final=False)
                yield chunk, bytes_before + read.bytes_read
                chunk, chars = [], 0
        _check_text(path, read, max_invalid_utf8, final=True)
        if read.documents == 0:
            raise DataError(f"{path}: no documents (empty corpus)")
        bytes_before += os.path.getsize(path)
        if chunk:
            yield chunk, bytes_before
        stats.files += 1
        stats.documents += read.documents
        stats.invalid_utf8_replaced += read.invalid_utf8_replaced
        stats.nul_bytes += read.nul_bytes


def _encode(tokenizer: Tokenizer, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids, each followed by eod, in one array; and each document's length."""
    ids = tokenizer.encode_batch(documents)
    for doc_ids in ids:
        doc_ids.append(tokenizer.eod_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.concatenate([np.asarray(doc_ids, dtype=np.int32) for doc_ids in ids]), lengths


def _encode_chunks(chunks, tokenizer: Tokenizer, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (tokens, lengths, bytes read) per chunk, in order; at most 2 x workers chunks in flight."""
    if workers == 1:
        for documents, bytes_read in chunks:
            yield *_encode(tokenizer, documents), bytes_read
        return
    # Not Pool.imap: its feeder thread would read the whole corpus ahead into memory.
    with _start_pool(tokenizer.path, workers) as pool:
        in_flight = deque()
        for documents, bytes_read in chunks:
            in_flight.append((pool.apply_async(_encode_in_worker, (documents,)), bytes_read))
            if len(in_flight) >= 2 * workers:
                result, done = in_flight.popleft()
                yield *result.get(), done
        while in_flight:
            result, done = in_flight.popleft()
            yield *result.get(), done


_worker_tokenizer: Tokenizer | None = None  # each worker process loads its own, once


def _load_worker_tokenizer(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(path)


def _encode_in_worker(documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, documents)


def _start_pool(tokenizer_path: str, workers: int):
    """The processes are the parallelism: HF tokenizers stays single-threaded (and quiet) in each worker."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers as they start
    try:
        return multiprocessing.Pool(workers, _load_worker_tokenizer, (tokenizer_path,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


# --- PREFIX.json: what the dataset was made from --------------------------------------------------


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def _metadata(inputs: list[str], tokenizer_dir: str, read_options: dict) -> dict:
    """Everything the output depends on, compared by `cached_stats` to decide whether to rebuild."""
    tokenizer = Path(tokenizer_dir)
    tokenizer_files = [tokenizer] if tokenizer.is_file() else sorted(
        p for p in tokenizer.glob("tokenizer*") if p.is_file() and p.suffix in (".json", ".model"))
    return {
        "inputs": [_file_identity(p) for p in inputs],
        "tokenizer": {"path": os.path.abspath(tokenizer), "files": [_file_identity(str(p)) for p in tokenizer_files]},
        "options": read_options,
    }


def _write_json_atomically(path: str, obj: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)
