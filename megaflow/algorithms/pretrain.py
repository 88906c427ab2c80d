"""Stage 1: next-token prediction on raw text (indexed datasets, weighted blends, exact data position).

The next-token hooks live in training/lm.py; this module supplies the datasets and the final
perplexity against a unigram model of the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from megaflow.algorithms.base import Work
from megaflow.algorithms.runner import TrainingStage
from megaflow.config import StageConfig
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.training import init_from, stage
from megaflow.training.lm import LanguageModelTask


def _iterators(cfg: StageConfig):
    from megaflow.data.sampler import MicroBatches, stack_lm
    from megaflow.training.engine import data_parallel_rank_and_size

    def make(dataset, n_chunks: int, consumed: int, shuffle: bool) -> list:  # megatron's datasets are shuffled
        dp_rank, dp_size = data_parallel_rank_and_size()
        return [MicroBatches(dataset, cfg.train.micro_batch_size, dp_rank, dp_size, consumed, collate=stack_lm)
                for _ in range(n_chunks)]
    return make


class Pretrain(TrainingStage):
    name = "pretrain"
    summary = "next-token prediction on raw text (indexed datasets, blends)"
    needs_init = False

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        out = super().inputs(cfg)
        spec = cfg.tokenizer.train_if_missing
        if spec and not (cfg.tokenizer.path and Path(cfg.tokenizer.path).exists()):
            out |= {f"tokenizer.train_if_missing.input[{j}]": path for j, path in enumerate(spec.input)}
        elif cfg.tokenizer.path and not spec:
            out["tokenizer.path"] = cfg.tokenizer.path
        return out

    def check(self, cfg: StageConfig) -> None:
        super().check(cfg)
        from megaflow.data.pretrain import indexed_prefix_of

        from megaflow.data.readers import expand_inputs

        for i, src in enumerate(cfg.data.train):  # a raw file, a directory of them, or an indexed .bin/.idx prefix
            if indexed_prefix_of(src.path) is None and Path(src.path).is_dir():
                try:
                    expand_inputs([src.path])
                except UserError as e:
                    raise UserError(f"data.train[{i}].path: {e}") from None

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        from megaflow.data.pretrain import build_datasets, consumed_per_dataset

        cfg.model.vocab_size = tokenizer.vocab_size
        vocab = stage.model_vocab_size(cfg, tokenizer)
        if init_dir is not None:  # its vocabulary (and padding), after checking the model is the same
            vocab = init_from.adopt(cfg, init_dir, tokenizer.vocab_size, log=dist.print_rank0)
        t = cfg.train
        n_eval = cfg.eval.iters * t.global_batch_size
        evals = (t.steps // cfg.eval.every if cfg.eval.every else 0) + 1
        train_ds, valid_ds, _, sources = build_datasets(cfg, tokenizer, tokenizer_dir,
                                                        [t.steps * t.global_batch_size, n_eval * evals, n_eval])
        return Work(LanguageModelTask(), vocab, tokenizer, train_ds, valid_ds, _iterators(cfg),
                    meta={"eval_samples": n_eval, "valid_samples_built": n_eval * evals},
                    data_position=consumed_per_dataset(train_ds, sources), extra={"n_eval": n_eval})

    def final_eval(self, trainer, work: Work, make_valid) -> dict:
        from megaflow.data.pretrain import token_counts, unigram_perplexity

        final = trainer.evaluate(make_valid, trainer.cfg.eval.iters)
        out = {"valid_loss": final["loss"], "valid_ppl": final["ppl"], "valid_tokens": final["tokens"]}
        if dist.is_rank0():
            out["unigram_ppl"] = unigram_perplexity(work.valid, work.extra["n_eval"], token_counts(work.train, work.vocab))
            dist.print_rank0(f"valid ppl {final['ppl']:.2f} (unigram baseline {out['unigram_ppl']:.2f})")
        return out


STAGE = Pretrain()
