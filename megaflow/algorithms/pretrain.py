"""Stage 1: next-token prediction on raw text (indexed datasets, weighted blends, exact data position).

The next-token hooks live in training/lm.py; this module supplies the datasets and the stage's flow.
"""

from __future__ import annotations

import time
from pathlib import Path

from megaflow.config import StageConfig
from megaflow.errors import UserError
from megaflow.data.pretrain import BatchIterator, build_datasets, consumed_per_dataset, token_counts, unigram_perplexity
from megaflow.runtime import distributed as dist
from megaflow.training import init_from, stage
from megaflow.training.engine import Trainer, data_parallel_rank_and_size
from megaflow.training.lm import LanguageModelTask


def check_inputs(cfg: StageConfig) -> None:
    """Fail before anything is written (or megatron imported) when an input file is missing."""
    from megaflow.data.pretrain import indexed_prefix_of

    if not cfg.data.train:
        raise UserError("data.train: no training data given")
    for i, src in enumerate(cfg.data.train):
        if indexed_prefix_of(src.path) is None and not Path(src.path).is_file():
            raise UserError(f"data.train[{i}].path: file not found: {src.path}")
    if cfg.init_from:
        init_from.check_spec(cfg.init_from, cfg.model)  # a megaflow checkpoint, or hf:PATH
    spec = cfg.tokenizer.train_if_missing
    if spec and not (cfg.tokenizer.path and Path(cfg.tokenizer.path).exists()):
        for j, path in enumerate(spec.input):
            if not Path(path).is_file():
                raise UserError(f"tokenizer.train_if_missing.input[{j}]: file not found: {path}")


def _iterators(dataset, cfg: StageConfig, consumed: int, n_chunks: int) -> list[BatchIterator]:
    dp_rank, dp_size = data_parallel_rank_and_size()
    return [BatchIterator(dataset, cfg.train.micro_batch_size, dp_rank, dp_size, consumed) for _ in range(n_chunks)]


def main(cfg: StageConfig) -> dict:
    """`megaflow train pretrain`: tokenizer, data, model, loop, final eval and weights-only checkpoint."""
    t_start = time.time()
    check_inputs(cfg)
    init_dir = init_from.resolve_init_from(cfg.init_from, log=dist.print_rank0) if cfg.init_from else None
    stage.setup_runtime(cfg)
    if init_dir is not None and not cfg.tokenizer.path and (init_dir / "tokenizer").is_dir():
        cfg.tokenizer.path = str(init_dir / "tokenizer")  # the initial checkpoint's own tokenizer
    tokenizer, tokenizer_dir = stage.ensure_tokenizer(cfg)
    cfg.model.vocab_size = tokenizer.vocab_size
    vocab = stage.model_vocab_size(cfg, tokenizer)
    if init_dir is not None:  # its vocabulary (and padding), after checking the model is the same
        vocab = init_from.adopt(cfg, init_dir, tokenizer.vocab_size, log=dist.print_rank0)

    t = cfg.train
    n_eval = cfg.eval.iters * t.global_batch_size
    evals = (t.steps // cfg.eval.every if cfg.eval.every else 0) + 1
    train_ds, valid_ds, _, sources = build_datasets(cfg, tokenizer, tokenizer_dir,
                                                    [t.steps * t.global_batch_size, n_eval * evals, n_eval])
    out_dir = stage.write_resolved_config(cfg)

    parents = [str(init_dir)] if init_dir is not None else []
    meta = stage.final_meta(cfg, vocab, 0, 0, parents) | {"eval_samples": n_eval, "valid_samples_built": n_eval * evals}
    trainer = Trainer(cfg, LanguageModelTask(), vocab, out_dir, meta, consumed_per_dataset(train_ds, sources))
    resumed = trainer.maybe_resume()
    if cfg.init_from and not resumed:
        trainer.init_weights_from(init_dir)
    n_chunks = len(trainer.model)
    make_valid = (lambda: _iterators(valid_ds, cfg, 0, n_chunks)) if valid_ds is not None else None
    status = trainer.train(lambda consumed: _iterators(train_ds, cfg, consumed, n_chunks), make_valid)
    result = {"status": status, "step": trainer.state.step, "tokens_seen": trainer.state.tokens_seen,
              "resumed": resumed, "skipped_steps": trainer.skipped_total}
    if status != "done":  # preempted or out of time: the checkpoint is written; the same command resumes
        trainer.close()
        return result

    if make_valid is not None and cfg.eval.final:
        final = trainer.evaluate(make_valid, cfg.eval.iters)
        result |= {"valid_loss": final["loss"], "valid_ppl": final["ppl"], "valid_tokens": final["tokens"]}
        if dist.is_rank0():
            result["unigram_ppl"] = unigram_perplexity(valid_ds, n_eval, token_counts(train_ds, vocab))
            dist.print_rank0(f"valid ppl {final['ppl']:.2f} (unigram baseline {result['unigram_ppl']:.2f})")
    return stage.finish(trainer, meta, tokenizer, result, t_start)

