"""Stage 2: supervised fine-tuning on chat and instruction data.

What is specific to SFT: the data (megaflow/data/sft.py: records -> chat template -> assistant-only loss
masks -> packed rows), the attention of packed rows (no token attends across a sample boundary: a
block-diagonal mask with the local spec, THD packed attention with TE), and the exact-match evaluation
by generation at the end. The loss is the engine's per-token loss over the masked tokens.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from megaflow.config import StageConfig
from megaflow.config.schema import ModelConfig
from megaflow.data import packing, sft
from megaflow.data.records import files_key
from megaflow.errors import UserError
from megaflow.models import gpt
from megaflow.runtime import distributed as dist
from megaflow.training import checkpoint, init_from, stage
from megaflow.training.engine import Trainer, data_parallel_rank_and_size, pad_multiple
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


def check_inputs(cfg: StageConfig) -> None:
    """Fail before anything is written (or megatron imported): data files, the initial checkpoint."""
    if not cfg.data.train:
        raise UserError("data.train: no SFT data given")
    for i, src in enumerate(cfg.data.train):
        if not Path(src.path).exists():
            raise UserError(f"data.train[{i}].path: not found: {src.path}")
    for i, path in enumerate(cfg.data.sft.valid):
        if not Path(path).exists():
            raise UserError(f"data.sft.valid[{i}]: not found: {path}")
    if not cfg.init_from:
        raise UserError("init_from: SFT starts from a pretrained model: a megaflow checkpoint or hf:PATH")
    init_from.check_spec(cfg.init_from, cfg.model if cfg.model.model_fields_set else None)


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


def main(cfg: StageConfig) -> dict:
    """`megaflow train sft`: data, model from `init_from`, loop, validation loss, exact match, final checkpoint."""
    t_start = time.time()
    check_inputs(cfg)
    init_dir = init_from.resolve_init_from(cfg.init_from, log=dist.print_rank0)
    if not cfg.model.model_fields_set:  # no model section: the pretrained model's, as it is
        cfg.model = ModelConfig(**checkpoint.read_meta(init_dir)["model"])
    stage.setup_runtime(cfg)
    if not cfg.tokenizer.path:
        cfg.tokenizer.path = str(init_dir / "tokenizer")  # the pretrained model's own tokenizer
    base_tokenizer, _ = stage.ensure_tokenizer(cfg)
    prepared, train_samples, held_out = prepare_data(cfg, base_tokenizer)
    tokenizer = prepared.tokenizer
    vocab = init_from.adopt(cfg, init_dir, base_tokenizer.vocab_size, log=dist.print_rank0)
    if tokenizer.vocab_size > vocab:
        raise UserError(f"data.sft.chat_template: the built-in template adds {len(prepared.added_tokens)} tokens "
                        f"({tokenizer.vocab_size} in all) but the model has {vocab} embedding rows; use a template "
                        "with the tokenizer's own tokens")
    cfg.model.vocab_size = tokenizer.vocab_size

    t = cfg.train
    train_ds = sft.SFTDataset(train_samples, cfg.data.seq_length, tokenizer.pad_id, cfg.data.sft.packing)
    train_ds.record_in(prepared.summary)
    valid_ds = sft.SFTDataset(held_out, cfg.data.seq_length, tokenizer.pad_id, cfg.data.sft.packing) if held_out else None
    for line in prepared.summary.lines():
        dist.print_rank0(line)
    out_dir = stage.write_resolved_config(cfg)

    meta = stage.final_meta(cfg, vocab, 0, 0, [str(init_dir)])
    trainer = Trainer(cfg, SFTTask(), vocab, out_dir, meta)
    resumed = trainer.maybe_resume()
    if not resumed:
        trainer.init_weights_from(init_dir)
        if prepared.added_tokens:
            _init_new_token_rows(trainer.model, base_tokenizer.vocab_size, tokenizer.vocab_size)
            trainer.optimizer.reload_model_params()
    dp_rank, dp_size = data_parallel_rank_and_size()

    def iterators(dataset, consumed: int, shuffle: bool = True):
        return [sft.SFTBatchIterator(dataset, t.micro_batch_size, dp_rank, dp_size, consumed, t.seed, shuffle,
                                     pad_multiple(cfg)) for _ in trainer.model]

    make_valid = (lambda: iterators(valid_ds, 0, shuffle=False)) if valid_ds is not None and len(valid_ds) else None
    status = trainer.train(lambda consumed: iterators(train_ds, consumed), make_valid)
    result = {"status": status, "step": trainer.state.step, "resumed": resumed, "skipped_steps": trainer.skipped_total,
              "data": prepared.summary.as_dict()}
    if status != "done":
        trainer.close()
        return result

    if make_valid is not None and cfg.eval.final:
        final = trainer.evaluate(make_valid, max(1, min(cfg.eval.iters, len(valid_ds) // t.global_batch_size)))
        result |= {"valid_loss": final["loss"], "valid_ppl": final["ppl"]}
        dist.print_rank0(f"valid loss {final['loss']:.4f}")
    if cfg.eval.exact_match and held_out:
        result |= exact_match_of(trainer, tokenizer, prepared.template, held_out, cfg)
    return stage.finish(trainer, meta, tokenizer, result, t_start)


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
