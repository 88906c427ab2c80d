"""The datatrove pipeline steps megaflow adds for curation (megaflow.data.curate assembles them with
datatrove's own): a reader over megaflow's input formats, a rank-aligned shard reader, the length and
language filters, and a writer that keeps only the first few examples of each removal reason.

They are module-level classes so datatrove can pickle them into its worker processes and SLURM jobs.
"""

from __future__ import annotations

from typing import Iterator

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter


def normalized(text: str) -> str:
    """What exact dedup compares: lowercase, whitespace collapsed, ends stripped."""
    return " ".join(text.lower().split())


def normalized_text(doc: Document) -> str:
    """What exact dedup hashes (datatrove's content_getter)."""
    return normalized(doc.text)


class MegaflowReader(PipelineStep):
    """Documents of megaflow's inputs (text, jsonl[.gz], parquet; megaflow.data.readers). With at least as
    many files as tasks, task r reads files r, r + n, ...; otherwise every task reads every file and keeps
    documents r, r + n, ... Counts the words it reads (`words`)."""

    name = "megaflow reader"
    type = "📖 - READER"

    def __init__(self, paths: list[str], field: str = "text", split_documents_on: str = "blank_line"):
        super().__init__()
        self.paths, self.field, self.split_documents_on = list(paths), field, split_documents_on

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        from megaflow.data.readers import iter_documents

        by_file = len(self.paths) >= world_size
        index = 0
        for f, path in enumerate(self.paths):
            if by_file and f % world_size != rank:
                continue
            for i, text in enumerate(iter_documents(path, field=self.field, split_documents_on=self.split_documents_on)):
                index += 1
                if not by_file and (index - 1) % world_size != rank:
                    continue
                self.stat_update("documents")
                self.stat_update("words", value=len(text.split()))
                yield Document(text=text, id=f"{path}#{i}", metadata={})


class RankReader(PipelineStep):
    """The shard task r of the previous stage wrote (`{r:05d}.jsonl.gz`), in its order: the document
    indices the dedup steps recorded then are this stream's."""

    name = "megaflow shard reader"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        import gzip
        import json
        import os

        path = os.path.join(self.folder, f"{rank:05d}.jsonl.gz")
        if not os.path.exists(path):
            return
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                yield Document(text=rec["text"], id=rec["id"], metadata=rec.get("metadata") or {})


class LengthFilter(BaseFilter):
    """Drops documents with fewer than `min_words` or more than `max_words` whitespace-separated words."""

    name = "📏 megaflow length"

    def __init__(self, min_words: int | None = 5, max_words: int | None = 100_000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_words, self.max_words = min_words, max_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.split())
        if self.min_words is not None and n < self.min_words:
            return False, "too_short"
        if self.max_words is not None and n > self.max_words:
            return False, "too_long"
        return True


class LanguageFilter(BaseFilter):
    """Keeps documents whose most likely language (py3langid, model shipped with the package, probabilities
    normalised) is one of `languages` (ISO 639-1 codes) with probability at least `min_score`."""

    name = "🌍 megaflow language (py3langid)"

    def __init__(self, languages: list[str] | None = ("en",), min_score: float = 0.65, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages = set(languages) if languages else None
        self.min_score = min_score
        self._identifier = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 4)
        if self.languages is not None and lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.min_score:
            return False, "language_unsure"
        return True


class SampleWriter(JsonlWriter):
    """An exclusion writer that keeps the first `limit` documents of each removal reason (per task)."""

    def __init__(self, folder: str, limit: int):
        super().__init__(folder, output_filename="${rank}.jsonl.gz", compression="gzip")
        self.limit = limit
        self._seen: dict[str, int] = {}

    def write(self, document: Document, rank: int = 0, **kwargs):
        reason = str(document.metadata.get("filter_reason", ""))
        n = self._seen.get(reason, 0)
        if n < self.limit:
            self._seen[reason] = n + 1
            super().write(document, rank, **kwargs)


# name in megaflow's config (schema.CurateFilters, whose field order is the order they run in) -> the filter
FILTER_CLASSES = {"length": LengthFilter, "language": LanguageFilter, "gopher_repetition": GopherRepetitionFilter,
                  "gopher_quality": GopherQualityFilter, "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
