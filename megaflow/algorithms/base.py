"""The stage contract: what `megaflow train STAGE` and `megaflow run` need to know about a stage.

A stage is one module in algorithms/ with a `Stage` subclass and one line in registry.py. The contract:

    name            the stage's name, also its directory under run.dir and its pipeline key
    schema          the pydantic model of its config (StageConfig for training stages)
    inputs(cfg)     the artifacts it reads, {config key: path}: checked to exist before anything is
                    written, hashed by the pipeline to tell when it must run again
    check(cfg)      its own rules, before anything is written or megatron imported
    run(cfg)        do the work; returns the stage's result (what eval.json holds)
    output(cfg)     the artifact a later stage reads (`${stages.NAME.output}`)
    is_complete(cfg) whether a finished run of this config is on disk

Training stages subclass runner.TrainingStage: the shared sequence around their loop lives there, and a
stage module supplies only its data, its task and its evaluations (its hooks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel

from megaflow.config.schema import StageConfig
from megaflow.errors import UserError


class Stage:
    name: ClassVar[str]
    schema: ClassVar[type[BaseModel]] = StageConfig
    summary: ClassVar[str] = ""  # one line for --help and the pipeline's plan

    def stage_dir(self, cfg) -> Path:
        return Path(cfg.run.dir) / self.name

    def inputs(self, cfg) -> dict[str, str]:
        """{config key: path} of every file or checkpoint the stage reads."""
        return {}

    def check(self, cfg) -> None:
        """Rules of this stage beyond the schema's, before anything is written (inputs excluded)."""

    def run(self, cfg) -> dict:
        raise NotImplementedError

    def output(self, cfg) -> Path:
        return self.stage_dir(cfg) / "final"

    def result(self, cfg) -> dict | None:
        """The result a finished run recorded (eval.json), or None."""
        path = self.stage_dir(cfg) / "eval.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self, cfg) -> bool:
        result = self.result(cfg)
        return bool(result) and result.get("status", "done") == "done" and self.output(cfg).exists()


def check_wandb(run) -> None:
    """`run.wandb` needs the wandb package, which megaflow does not install."""
    import importlib.util

    if run.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise UserError("run.wandb: W&B logging needs the wandb package (pip install wandb), or remove run.wandb")


def missing_inputs(stage: Stage, cfg, pending: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(config key, path) of every input that is not there, except those a pipeline stage upstream will
    make (`pending`). An `hf:DIR` input counts as its directory."""
    missing = []
    for key, path in stage.inputs(cfg).items():
        if path is None or str(path) in pending:
            continue
        local = str(path).removeprefix("hf:")
        if not Path(local).exists() and not _indexed_prefix(local):
            missing.append((key, str(path)))
    return missing


def check_inputs_exist(stage: Stage, cfg, pending: frozenset[str] = frozenset()) -> None:
    """Every input exists (see missing_inputs): the first one missing is an error naming its key."""
    for key, path in missing_inputs(stage, cfg, pending)[:1]:
        raise UserError(f"{key}: file not found: {path}")


def _indexed_prefix(path: str) -> bool:
    p = Path(str(path).removesuffix(".bin").removesuffix(".idx"))
    return p.with_name(p.name + ".bin").is_file() and p.with_name(p.name + ".idx").is_file()


@dataclass
class Work:
    """What a training stage's `prepare` hands the runner: everything its loop needs."""

    task: Any  # a megaflow.training.engine.Task
    vocab: int  # padded vocabulary size to build the model with
    tokenizer: Any  # the tokenizer saved with the final checkpoint
    train: Any  # the training dataset
    valid: Any = None  # the held-out dataset, or None
    iterators: Callable | None = None  # (dataset, n_chunks, consumed, shuffle) -> [iterator per model chunk]
    meta: dict = field(default_factory=dict)  # extra megaflow.json fields of the final checkpoint
    data_position: Callable | None = None  # consumed samples -> readable breakdown (pretraining blends)
    result: dict = field(default_factory=dict)  # extra fields of eval.json (data summary)
    extra: dict = field(default_factory=dict)  # whatever the stage's own hooks need later
    step: Callable | None = None  # (trainer, iterators) -> StepResult: one step of the loop (RL: an iteration)
    optimizer_steps: int | None = None  # optimizer steps of the whole run, for the LR schedule (default train.steps)


def pad_multiple(cfg: StageConfig) -> int:
    """What SFT and preference micro-batches are cut to, past their longest row (`data.padding: longest`):
    a multiple of 16 (FP8 GEMMs need it; tensor cores like it) and of the TP size (sequence parallelism
    splits the sequence). 0, full rows of seq_length, with `data.padding: max_length` or a pipeline
    (its stages exchange activations of one fixed shape)."""
    if cfg.data.padding == "max_length" or cfg.parallel.pp > 1:
        return 0
    return math.lcm(16, cfg.parallel.tp)
