"""The pipeline's `tokenizer` stage: a byte-level BPE with megaflow's special tokens, trained on local
files (megaflow.data.tokenizer.train_tokenizer; `megaflow tokenizer train` is the same as a command)."""

from __future__ import annotations

from pathlib import Path

from megaflow.algorithms.base import Stage
from megaflow.config.schema import TokenizerStageConfig


class TokenizerStage(Stage):
    name = "tokenizer"
    schema = TokenizerStageConfig
    summary = "train a byte-level BPE tokenizer on local files"

    def inputs(self, cfg: TokenizerStageConfig) -> dict[str, str]:
        return {f"input[{i}]": path for i, path in enumerate(cfg.input)}

    def output(self, cfg) -> Path:
        return self.stage_dir(cfg)  # run.dir/tokenizer: tokenizer.json, tokenizer_config.json

    def is_complete(self, cfg) -> bool:
        return (self.output(cfg) / "tokenizer.json").is_file()

    def run(self, cfg: TokenizerStageConfig) -> dict:
        from megaflow.data.tokenizer import train_tokenizer

        tok = train_tokenizer(cfg.input, cfg.vocab_size, str(self.output(cfg)), field=cfg.field)
        return {"status": "done", "vocab_size": tok.vocab_size}


STAGE = TokenizerStage()
