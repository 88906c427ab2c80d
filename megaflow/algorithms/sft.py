"""Stage 2: supervised fine-tuning on chat and instruction data.

What is specific to SFT: the data (megaflow/data/sft.py: records -> chat template -> assistant-only loss
masks -> packed rows), the attention of packed rows (no token attends across a sample boundary: a
block-diagonal mask with the local spec, THD packed attention with TE), and the exact-match evaluation
by generation at the end. The loss is the engine's per-token loss over the masked tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megaflow.algorithms.base import Work, pad_multiple
from megaflow.algorithms.runner import TrainingStage
from megaflow.config import StageConfig
from megaflow.data import packing, sft
from megaflow.data.records import files_key
from megaflow.data.sampler import MicroBatches
from megaflow.errors import UserError
from megaflow.models import gpt
from megaflow.runtime import distributed as dist
from megaflow.training import init_from
from megaflow.training.engine import Trainer, data_parallel_rank_and_size
from megaflow.training.lm import LanguageModelTask


class SFTTask(LanguageModelTask):
    """Batches of packed rows: tokens, labels, loss_mask, position_ids, segment_ids ([batch, seq] each)."""

    @staticmethod
    def get_batch(data_iterator):
        batch = {k: v.to(dist.device(), non_blocking=True) for k, v in next(data_iterator).items()}
        if gpt.use_transformer_engine():  # THD: one flattened sequence with cu_seqlens per sample
            params = packing.packed_seq_params(batch["segment_ids"])
            batch = packing.to_thd(batch)
            return batch["tokens"], batch["labels"], batch["loss_mask"], None, batch["position_ids"], params
        mask = packing.block_diagonal_mask(batch["segment_ids"])
        return batch["tokens"], batch["labels"], batch["loss_mask"], mask, batch["position_ids"], None

    def forward_step(self, data_iterator, model):
        tokens, labels, loss_mask, attention_mask, position_ids, packed = self.get_batch(data_iterator)
        kwargs = {}
        if packed is None and not gpt.unwrap(model).config.sequence_parallel:  # logits of the assistant's tokens only
            kwargs["output_processor"] = gpt.loss_at_positions(loss_mask)
        output = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed, **kwargs)
        return output, functools.partial(self.loss_func, loss_mask)


def _options(cfg: StageConfig) -> sft.SFTDataOptions:
    return sft.SFTDataOptions.from_config(cfg.data.sft, seq_length=cfg.data.seq_length,
                                          invalid_utf8=cfg.data.invalid_utf8)


def prepare_data(cfg: StageConfig, tokenizer):
    """(prepared training data, held-out samples): the held-out files, else a seeded fraction."""
    opts = _options(cfg)
    dist.print_rank0(f"data: reading and tokenizing {files_key('data.train', [src.path for src in cfg.data.train])}")
    prepared = sft.prepare([src.path for src in cfg.data.train], tokenizer, opts)
    if cfg.data.sft.valid:
        held_out = sft.tokenize(sft.load_conversations(cfg.data.sft.valid, opts), prepared.template, opts,
                                source=files_key("data.sft.valid", cfg.data.sft.valid))
        return prepared, prepared.samples, held_out
    train, held_out = sft.split_holdout(prepared.samples, cfg.data.sft.valid_fraction, cfg.train.seed)
    return prepared, train, held_out


@torch.no_grad()
def _init_new_token_rows(model_chunks, old_vocab: int, new_vocab: int) -> None:
    """Rows of tokens the chat template added start as the mean of the existing rows (embedding and
    output layer), not as the zeros of vocabulary padding. Each TP rank holds a slice of the rows."""
    from megatron.core import parallel_state as ps

    for chunk in model_chunks:
        inner = gpt.unwrap(chunk)
        weights = [m.weight for m in (getattr(getattr(inner, "embedding", None), "word_embeddings", None),
                                      getattr(inner, "output_layer", None)) if m is not None and m.weight is not None]
        for w in weights:
            rows = w.shape[0]
            start = ps.get_tensor_model_parallel_rank() * rows
            local = torch.arange(start, start + rows, device=w.device)
            old = (local < old_vocab)[:, None].to(w.dtype)
            stats = torch.cat([(w * old).sum(0), old.sum().reshape(1)]).float()
            if ps.get_tensor_model_parallel_world_size() > 1:
                torch.distributed.all_reduce(stats, group=ps.get_tensor_model_parallel_group())
            mean = (stats[:-1] / stats[-1]).to(w.dtype)
            new = (local >= old_vocab) & (local < new_vocab)
            w[new] = mean


class SFT(TrainingStage):
    name = "sft"
    summary = "supervised fine-tuning on chat and instruction data (assistant-only loss, packed rows)"

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        return super().inputs(cfg) | {f"data.sft.valid[{i}]": path for i, path in enumerate(cfg.data.sft.valid)}

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        prepared, train_samples, held_out = prepare_data(cfg, tokenizer)
        vocab = init_from.adopt(cfg, init_dir, tokenizer.vocab_size, log=dist.print_rank0)
        chat_tokenizer = prepared.tokenizer
        if chat_tokenizer.vocab_size > vocab:
            raise UserError(f"data.sft.chat_template: the built-in template adds {len(prepared.added_tokens)} tokens "
                            f"({chat_tokenizer.vocab_size} in all) but the model has {vocab} embedding rows; use a "
                            "template with the tokenizer's own tokens")
        cfg.model.vocab_size = chat_tokenizer.vocab_size
        pad, packed = chat_tokenizer.pad_id, cfg.data.sft.packing
        train_ds = sft.SFTDataset(train_samples, cfg.data.seq_length, pad, packed)
        train_ds.record_in(prepared.summary)
        valid_ds = sft.SFTDataset(held_out, cfg.data.seq_length, pad, packed) if held_out else None
        for line in prepared.summary.lines():
            dist.print_rank0(line)
        return Work(SFTTask(), vocab, chat_tokenizer, train_ds, valid_ds, _iterators(cfg),
                    result={"data": prepared.summary.as_dict()},
                    extra={"prepared": prepared, "held_out": held_out, "base_vocab": tokenizer.vocab_size})

    def after_init(self, trainer: Trainer, work: Work) -> None:
        prepared = work.extra["prepared"]
        if prepared.added_tokens:
            _init_new_token_rows(trainer.model, work.extra["base_vocab"], prepared.tokenizer.vocab_size)
            trainer.optimizer.reload_model_params()

    def final_eval(self, trainer: Trainer, work: Work, make_valid) -> dict:
        iters = max(1, min(trainer.cfg.eval.iters, len(work.valid) // trainer.cfg.train.global_batch_size))
        final = trainer.evaluate(make_valid, iters)
        dist.print_rank0(f"valid loss {final['loss']:.4f}")
        return {"valid_loss": final["loss"], "valid_ppl": final["ppl"]}

    def after_train(self, trainer: Trainer, work: Work) -> dict:
        cfg, held_out = trainer.cfg, work.extra["held_out"]
        if not (cfg.eval.exact_match and held_out):
            return {}
        return exact_match_of(trainer, work.tokenizer, work.extra["prepared"].template, held_out, cfg)


def _iterators(cfg: StageConfig):
    t = cfg.train

    def make(dataset, n_chunks: int, consumed: int, shuffle: bool) -> list:
        dp_rank, dp_size = data_parallel_rank_and_size()
        return [MicroBatches(dataset, t.micro_batch_size, dp_rank, dp_size, consumed, t.seed, shuffle, pad_multiple(cfg))
                for _ in range(n_chunks)]
    return make


def exact_match_of(trainer: Trainer, tokenizer, template, held_out, cfg: StageConfig) -> dict:
    """Greedy generation with the trained weights on the first `eval.exact_match` held-out examples."""
    from megaflow.eval.exact_match import exact_match
    from megaflow.inference import InferenceModel

    model = InferenceModel.from_chunks(trainer.model, tokenizer, vocab_size=tokenizer.vocab_size,
                                       max_sequence_length=cfg.model.max_position_embeddings)
    examples = sft.exact_match_examples(held_out[:cfg.eval.exact_match])
    with trainer.params_synced():
        em = exact_match(model, template, examples, cfg.eval.max_new_tokens)
    dist.print_rank0(f"exact match {em['exact_match']:.1%} on {em['examples']} held-out examples")
    return {"exact_match": em["exact_match"], "exact_match_examples": em["examples"], "exact_match_samples": em["samples"]}


STAGE = SFT()
