"""The one sequence every training stage runs (Megatron-LM's `pretrain()` in spirit):

    check -> init_from -> processes -> tokenizer -> stage data and task (prepare) -> resolved config ->
    trainer -> resume or initial weights -> [before_train] -> loop -> final evaluation -> final checkpoint

A stage supplies only the hooks of algorithms/base.TrainingStage; this module holds the order.
"""

from __future__ import annotations

import time

from megaflow.algorithms.base import TrainingStage, check_inputs_exist
from megaflow.config import StageConfig
from megaflow.config.schema import ModelConfig
from megaflow.runtime import distributed as dist
from megaflow.training import checkpoint, init_from, stage


def run_training(st: TrainingStage, cfg: StageConfig) -> dict:
    """`megaflow train STAGE`: returns the stage's result, also written to run.dir/STAGE/eval.json."""
    from megaflow.training.engine import Trainer

    t_start = time.time()
    st.check(cfg)
    if cfg.init_from:
        st.check_init(cfg)  # a damaged or wrong checkpoint is named before a missing data file
    check_inputs_exist(st, cfg)
    init_dir = init_from.resolve_init_from(cfg.init_from, log=dist.print_rank0) if cfg.init_from else None
    if init_dir is not None and st.model_from_init and not cfg.model.model_fields_set:
        cfg.model = ModelConfig(**checkpoint.read_meta(init_dir)["model"])  # the initial model, as it is
    stage.setup_runtime(cfg)
    if init_dir is not None and not cfg.tokenizer.path and (init_dir / "tokenizer").is_dir():
        cfg.tokenizer.path = str(init_dir / "tokenizer")  # the initial checkpoint's own tokenizer
    tokenizer, tokenizer_dir = stage.ensure_tokenizer(cfg)
    work = st.prepare(cfg, tokenizer, tokenizer_dir, init_dir)
    out_dir = stage.write_resolved_config(cfg)

    parents = [str(init_dir)] if init_dir is not None else []
    meta = stage.final_meta(cfg, work.vocab, 0, 0, parents) | work.meta
    trainer = Trainer(cfg, work.task, work.vocab, out_dir, meta, work.data_position)
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
    status = trainer.train(lambda consumed: work.iterators(work.train, n_chunks, consumed, True), make_valid)
    result = {"status": status, "step": trainer.state.step, "tokens_seen": trainer.state.tokens_seen,
              "skipped_steps": trainer.skipped_total} | result
    if status != "done":  # preempted or out of time: the checkpoint is written; the same command resumes
        trainer.close()
        return result
    if make_valid is not None and cfg.eval.final:
        result |= st.final_eval(trainer, work, make_valid)
    result |= st.after_train(trainer, work)
    return stage.finish(trainer, meta, work.tokenizer, result, t_start)

