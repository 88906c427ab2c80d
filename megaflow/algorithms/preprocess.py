"""The pipeline's `preprocess` stage: text, jsonl(.gz) or parquet through the tokenizer into megatron
indexed files (megaflow.data.preprocess; `megaflow preprocess` is the same as a command)."""

from __future__ import annotations

from pathlib import Path

from megaflow.algorithms.base import Stage
from megaflow.config.schema import PreprocessStageConfig


class PreprocessStage(Stage):
    name = "preprocess"
    schema = PreprocessStageConfig
    summary = "tokenize text into megatron indexed .bin/.idx files"

    def inputs(self, cfg: PreprocessStageConfig) -> dict[str, str]:
        return {f"input[{i}]": path for i, path in enumerate(cfg.input)} | {"tokenizer": cfg.tokenizer}

    def output(self, cfg) -> Path:
        return self.stage_dir(cfg) / "data"  # the prefix of data.bin and data.idx

    def is_complete(self, cfg) -> bool:
        prefix = self.output(cfg)
        return all(prefix.with_suffix(s).is_file() for s in (".bin", ".idx"))

    def run(self, cfg: PreprocessStageConfig) -> dict:
        from megaflow.data.preprocess import preprocess

        self.stage_dir(cfg).mkdir(parents=True, exist_ok=True)
        stats = preprocess(cfg.input, cfg.tokenizer, str(self.output(cfg)), workers=cfg.workers, field=cfg.field,
                           split_documents_on=cfg.split_documents_on, invalid_utf8=cfg.invalid_utf8,
                           max_invalid_utf8=cfg.max_invalid_utf8)
        print(stats.summary())
        return {"status": "done", "documents": stats.documents, "tokens": stats.tokens}


STAGE = PreprocessStage()
