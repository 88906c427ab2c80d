"""Stream documents out of text, jsonl(.gz) and parquet files, one at a time.

Tokenizer training and preprocessing both read corpora far larger than memory, so every reader here
works line by line (or record batch by record batch) and never holds more than one document. Bad input
is reported as a one-line `DataError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from megaflow.errors import DataError, UserError

SPLIT_MODES = ("blank_line", "none")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")
INVALID_UTF8_MODES = ("replace", "error")


@dataclass
class ReadStats:
    """What reading one file found; filled in while the documents stream out."""

    documents: int = 0
    invalid_utf8_replaced: int = 0  # undecodable byte sequences replaced with U+FFFD
    nul_bytes: int = 0  # text has none; a binary file has many
    bytes_read: int = 0  # position in the file on disk, for progress bars


def input_format(path: str | os.PathLike) -> str:
    """'jsonl', 'parquet' or 'text', from the file name (a trailing .gz is looked through)."""
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(paths: list[str]) -> list[str]:
    """Files as given; a directory stands for its data files (jsonl[.gz], parquet, txt[.gz]), sorted, and
    the output of `megaflow curate` for the shards its summary.json lists (not its removed examples)."""
    out = []
    for p in map(str, paths):
        summary = Path(p) / "summary.json"
        if summary.is_file():
            try:
                shards = json.loads(summary.read_text())["shards"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{summary}: not a curate summary (no list of shards)") from None
            out += [str(Path(p) / Path(s).name) for s in shards]
        elif os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).iterdir() if f.is_file() and f.name.lower().endswith(DATA_SUFFIXES))
            if not found:
                raise DataError(f"{p}: a directory with no data files ({', '.join(DATA_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def iter_documents(
    path: str | os.PathLike,
    field: str = "text",
    split_documents_on: str = "blank_line",
    invalid_utf8: str = "replace",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield the non-blank documents of one file; pass `stats` to learn what was counted on the way.

    Plain text: a document is a block of lines between blank lines (or the whole file when
    `split_documents_on="none"`). jsonl: one JSON object a line, the document is `obj[field]`.
    parquet: the string column `field` (null values are skipped).
    """
    if split_documents_on not in SPLIT_MODES:
        raise UserError(f"split_documents_on: expected one of {SPLIT_MODES}, got {split_documents_on!r}")
    if invalid_utf8 not in INVALID_UTF8_MODES:
        raise UserError(f"invalid_utf8: expected one of {INVALID_UTF8_MODES}, got {invalid_utf8!r}")
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    stats = stats if stats is not None else ReadStats()
    fmt = input_format(path)
    if fmt == "parquet":
        documents = _parquet_documents(path, field, invalid_utf8, stats)
    else:
        lines = _decoded_lines(path, invalid_utf8, stats)
        documents = _jsonl_documents(path, lines, field, invalid_utf8, stats) if fmt == "jsonl" else \
            _text_documents(lines, split_documents_on)
    for doc in documents:
        if doc and not doc.isspace():
            stats.documents += 1
            yield doc


# --- plain text and jsonl: numbered, decoded lines ------------------------------------------------


def _decoded_lines(path, invalid_utf8: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """Yield (line number, line without its line ending), decoding UTF-8 as the policy says."""
    with open(path, "rb") as raw:
        stream: BinaryIO = gzip.GzipFile(fileobj=raw) if str(path).lower().endswith(".gz") else raw
        lineno = 0
        try:
            for lineno, data in enumerate(stream, start=1):
                stats.bytes_read = raw.tell()
                yield lineno, _decode(data, f"{path}:{lineno}", invalid_utf8, stats).rstrip("\r\n")
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise DataError(f"{path}:{lineno + 1}: cannot read compressed data ({e})") from None


def _decode(data: bytes, where: str, invalid_utf8: str, stats: ReadStats) -> str:
    stats.nul_bytes += data.count(0)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid_utf8 == "error":
            raise DataError(f"{where}: invalid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1} of the line)") from None
    # Replace like errors="replace" does, counting as we go.
    _replacements.count = 0
    text = data.decode("utf-8", _COUNT_AND_REPLACE)
    stats.invalid_utf8_replaced += _replacements.count
    return text


# Python's "replace" handler, plus a count of how many sequences it replaced (per thread).
_COUNT_AND_REPLACE = "megaflow.count_and_replace"
_replacements = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replacements.count += 1
    return "\ufffd", err.end


codecs.register_error(_COUNT_AND_REPLACE, _count_and_replace)


def _text_documents(lines: Iterator[tuple[int, str]], split_documents_on: str) -> Iterator[str]:
    block: list[str] = []
    for _, line in lines:
        if split_documents_on == "blank_line" and not line.strip():
            if block:
                yield "\n".join(block)
                block = []
        else:
            block.append(line)
    if block:
        yield "\n".join(block)


# A JSON "\udXXX" escape can smuggle in a lone surrogate, which no UTF-8 tokenizer accepts.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_objects(path, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str, dict]]:
    """(line number, line, object) of every non-blank line; anything but a JSON object names its line."""
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, line, record


def _jsonl_documents(path, lines, field: str, invalid_utf8: str, stats: ReadStats) -> Iterator[str]:
    for lineno, line, record in _json_objects(path, lines):
        if field not in record:
            raise DataError(f"{path}:{lineno}: no field {field!r}")
        doc = record[field]
        if not isinstance(doc, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is not a string (got {type(doc).__name__})")
        if "\\u" in line and _LONE_SURROGATE.search(doc):
            if invalid_utf8 == "error":
                raise DataError(f"{path}:{lineno}: invalid UTF-8 (lone surrogate escape in field {field!r})")
            doc, n = _LONE_SURROGATE.subn("\ufffd", doc)
            stats.invalid_utf8_replaced += n
        yield doc


# --- parquet --------------------------------------------------------------------------------------


def _parquet_documents(path, field: str, invalid_utf8: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(columns)})")
    file_size, rows_total, row = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                value = _decode(value, f"{path}: row {row}", invalid_utf8, stats)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column {field!r} is not a string (got {type(value).__name__})")
            yield value
        stats.bytes_read = file_size * row // rows_total


# --- whole records (SFT, preference and prompt data) ----------------------------------------------


def iter_records(path: str | os.PathLike, invalid_utf8: str = "replace") -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for every record of a jsonl(.gz) or parquet file, or of a local Hugging Face
    `datasets` directory; `where` is "FILE:LINE" (jsonl) or "FILE: row N" for error messages.

    A `datasets` directory is what `Dataset.save_to_disk` writes (state.json + Arrow stream files; for a
    DatasetDict, its `train` split is read) or a snapshot of a dataset repository (its jsonl/parquet files
    in name order). Blank jsonl lines are skipped; a line that is not a JSON object is a DataError.
    """
    if os.path.isdir(path):
        yield from _directory_records(Path(path), invalid_utf8)
        return
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    fmt = input_format(path)
    if fmt == "parquet":
        yield from _parquet_records(path)
    elif fmt == "jsonl":
        for lineno, _, record in _json_objects(path, _decoded_lines(path, invalid_utf8, ReadStats())):
            yield f"{path}:{lineno}", record
    else:
        raise DataError(f"{path}: expected a .jsonl, .jsonl.gz or .parquet file or a datasets directory")


def _parquet_records(path) -> Iterator[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def _directory_records(directory: Path, invalid_utf8: str) -> Iterator[tuple[str, dict]]:
    import pyarrow

    if (directory / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one directory per split
        if not (directory / "train" / "state.json").is_file():
            raise DataError(f"{directory}: a datasets DatasetDict without a 'train' split; name a split directory")
        directory = directory / "train"
    if (directory / "state.json").is_file():  # Dataset.save_to_disk
        try:
            files = [f["filename"] for f in json.loads((directory / "state.json").read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{directory / 'state.json'}: not a datasets state file ({e})") from None
        row = 0
        for name in files:
            try:
                with pyarrow.memory_map(str(directory / name)) as source:
                    for batch in pyarrow.ipc.open_stream(source):
                        for record in batch.to_pylist():
                            row += 1
                            yield f"{directory / name}: row {row}", record
            except (pyarrow.ArrowException, OSError) as e:
                raise DataError(f"{directory / name}: not a readable Arrow file ({e})") from None
        return
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and input_format(p) in ("jsonl", "parquet") and not p.name.endswith(".json"))
    if not files:
        raise DataError(f"{directory}: no .jsonl, .jsonl.gz or .parquet files and no datasets state.json")
    for file in files:
        yield from iter_records(file, invalid_utf8)
