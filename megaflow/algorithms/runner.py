"""The one sequence every training stage runs (Megatron-LM's `pretrain()` in spirit):

    check -> init_from -> processes -> tokenizer -> stage data and task (prepare) -> resolved config ->
    trainer -> resume or initial weights -> [before_train] -> loop -> final evaluation -> final checkpoint

A stage subclasses TrainingStage and supplies only its hooks; this module holds the order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from pydantic import ValidationError

from megaflow.algorithms.base import Stage, Work, check_inputs_exist, check_wandb
from megaflow.config import StageConfig
from megaflow.config.loader import format_validation_error
from megaflow.config.schema import ModelConfig
from megaflow.errors import UserError
from megaflow.models import weights
from megaflow.runtime import distributed as dist
from megaflow.training import init_from, stage


class TrainingStage(Stage):
    """A stage that trains a model with the engine: `run` is run_training below; a subclass supplies
    `prepare` and, where it needs them, the other hooks."""

    needs_init: ClassVar[bool] = True  # starts from a trained checkpoint (init_from)
    language_model_init: ClassVar[bool] = True  # init_from must be a language model, not a reward model

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        out = {f"data.train[{i}].path": src.path for i, src in enumerate(cfg.data.train)}
        if cfg.init_from:
            out["init_from"] = cfg.init_from
        return out

    def check(self, cfg: StageConfig) -> None:
        check_wandb(cfg.run)
        if not cfg.data.train:
            raise UserError(f"data.train: no training data given for the {self.name} stage")
        if self.needs_init and not cfg.init_from:
            raise UserError(f"init_from: the {self.name} stage starts from a trained model: a megaflow "
                            "checkpoint or hf:PATH")

    def check_init(self, cfg: StageConfig) -> None:
        """init_from is a checkpoint of a model this stage can start from (once it exists)."""
        from megaflow.training import init_from

        model = None if cfg.model_from_init else cfg.model  # StageConfig.model_from_init: pretrain names its own
        init_from.check_spec(cfg.init_from, model, language_model=self.language_model_init)

    def run(self, cfg: StageConfig) -> dict:
        return run_training(self, cfg)

    # -- hooks of the runner (runner.py) --------------------------------------------------------------

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        """The stage's data, task and vocabulary, once the processes and the tokenizer are set up."""
        raise NotImplementedError

    def after_init(self, trainer, work: Work) -> None:
        """After a fresh start's weights are loaded from init_from (not on resume)."""

    def before_train(self, trainer, work: Work, make_valid, resumed: bool) -> dict:
        """Evaluations before the first step; their results go into eval.json."""
        return {}

    def final_eval(self, trainer, work: Work, make_valid) -> dict:
        """The held-out evaluation of the trained model (with `eval.final`)."""
        return {}

    def after_train(self, trainer, work: Work) -> dict:
        """Other evaluations of the finished model (SFT's exact match by generation)."""
        return {}


def run_training(st: TrainingStage, cfg: StageConfig) -> dict:
    """`megaflow train STAGE`: returns the stage's result, also written to run.dir/STAGE/eval.json."""
    from megaflow.training.engine import Trainer

    t_start = time.time()
    st.check(cfg)
    if cfg.init_from:
        st.check_init(cfg)  # a damaged or wrong checkpoint is named before a missing data file
    check_inputs_exist(st, cfg)
    init_dir = init_from.resolve_init_from(cfg.init_from, log=dist.print_rank0) if cfg.init_from else None
    if init_dir is not None and cfg.model_from_init:
        try:  # the initial model, as it is; the assignment checks the rules that need the model
            cfg.model = ModelConfig(**weights.read_meta(init_dir)["model"])
        except ValidationError as e:
            raise UserError(f"the model of init_from {cfg.init_from}: {format_validation_error(e)}") from None
    stage.setup_runtime(cfg)
    if init_dir is not None and not cfg.tokenizer.path and (init_dir / "tokenizer").is_dir():
        cfg.tokenizer.path = str(init_dir / "tokenizer")  # the initial checkpoint's own tokenizer
    tokenizer, tokenizer_dir = stage.ensure_tokenizer(cfg)
    work = st.prepare(cfg, tokenizer, tokenizer_dir, init_dir)
    out_dir = stage.write_resolved_config(cfg)

    parents = [str(init_dir)] if init_dir is not None else []
    meta = stage.final_meta(cfg, work.vocab, 0, 0, parents) | work.meta
    trainer = Trainer(cfg, work.task, work.vocab, out_dir, meta, work.data_position, work.optimizer_steps)
    resumed = trainer.maybe_resume()
    if init_dir is not None and not resumed:
        trainer.init_weights_from(init_dir)
        st.after_init(trainer, work)
    n_chunks = len(trainer.model)
    make_valid = None
    if work.valid is not None and len(work.valid):
        make_valid = lambda: work.iterators(work.valid, n_chunks, 0, False)  # noqa: E731
    result = {"resumed": resumed} | work.result
    if make_valid is not None and cfg.eval.final:
        result |= st.before_train(trainer, work, make_valid, resumed)
    status = trainer.train(lambda consumed: work.iterators(work.train, n_chunks, consumed, True), make_valid, work.step)
    result = {"status": status, "step": trainer.state.step, "tokens_seen": trainer.state.tokens_seen,
              "skipped_steps": trainer.skipped_total} | result
    if status != "done":  # preempted or out of time: the checkpoint is written; the same command resumes
        trainer.close()
        return result
    if make_valid is not None and cfg.eval.final:
        result |= st.final_eval(trainer, work, make_valid)
    result |= st.after_train(trainer, work)
    return stage.finish(trainer, meta, work.tokenizer, result, t_start)

