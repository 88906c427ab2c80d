"""The pipeline's `curate` stage: quality filters, exact and MinHash near-deduplication of raw text before
the tokenizer and preprocess stages (megaflow.data.curate; `megaflow curate` is the same as a command)."""

from __future__ import annotations

from pathlib import Path

from megaflow.algorithms.base import Stage
from megaflow.config.schema import CurateStageConfig


class CurateStage(Stage):
    name = "curate"
    schema = CurateStageConfig
    summary = "filter and deduplicate raw text into jsonl.gz shards"

    def inputs(self, cfg: CurateStageConfig) -> dict[str, str]:
        return {f"input[{i}]": path for i, path in enumerate(cfg.input)} | ({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {})

    def output(self, cfg) -> Path:
        return self.stage_dir(cfg) / "data"  # run.dir alone decides it (the pipeline resolves references so)

    def check(self, cfg: CurateStageConfig) -> None:
        from megaflow.errors import UserError

        if cfg.executor != "local":
            raise UserError("executor: a pipeline's curate stage runs locally; submit SLURM jobs with "
                            "`megaflow curate ... executor=slurm` (docs/curation.md)")
        if cfg.output is not None:
            raise UserError("output: a pipeline's curate stage writes run.dir/curate/data; `output` is for "
                            "`megaflow curate`")

    def result(self, cfg: CurateStageConfig) -> dict | None:
        import json

        try:
            return {"status": "done"} | metrics(json.loads((self.output(cfg) / "summary.json").read_text()))
        except (OSError, ValueError):
            return None

    def run(self, cfg: CurateStageConfig) -> dict:
        from megaflow.data.curate import curate

        self.stage_dir(cfg).mkdir(parents=True, exist_ok=True)
        summary = curate(cfg, self.output(cfg))
        print(summary.line())
        return {"status": "done"} | metrics(summary.__dict__)


def metrics(summary: dict) -> dict:
    """The numbers of a curation summary that pipeline.json and the report keep."""
    out = {k: summary[k] for k in ("documents_in", "documents_out", "words_in", "words_out", "tokens_in", "tokens_out",
                                    "exact_duplicates", "near_duplicates") if k in summary}
    return out | {f"removed_{k}": v for k, v in summary["removed"].items() if k not in ("exact_duplicate", "near_duplicate")}


STAGE = CurateStage()
