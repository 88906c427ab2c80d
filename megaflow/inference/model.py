"""A model ready for inference: this rank's megatron chunks, the tokenizer and the vocabulary sizes, plus
the one forward every inference path uses (generation steps, scoring).

    model = load_for_inference("runs/tiny/sft/final", tp=2)      # sets up the runtime if needed
    model = InferenceModel.from_chunks(trainer.model, tokenizer)  # in-process, e.g. PPO's policy

`InferenceModel.forward` runs one batch through the pipeline with megatron's forward-only schedule (no
pipelining, or 1F1B over the pipeline ranks; hidden states go stage to stage by megatron's p2p), so TP
and PP need nothing else here. Every rank of a model-parallel group calls it with the same batch; the
logits exist on the last pipeline stage and the callers broadcast what the other ranks need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import UserError
from megaflow.models import gpt
from megaflow.runtime import distributed as dist


@dataclass
class InferenceModel:
    """This rank's model chunks with what generation and scoring need to know about them.

    `vocab_size` is the tokenizer's (true) vocabulary; `padded_vocab_size` the rows of the embedding and
    output layer (megatron pads them so TP shards are equal). Sampling never picks a padded id; log-probs
    are normalised over all `padded_vocab_size` logits, exactly as the training loss is."""

    chunks: list[torch.nn.Module]
    tokenizer: Tokenizer | None
    vocab_size: int
    padded_vocab_size: int
    max_sequence_length: int
    learned_positions: bool = False
    meta: dict = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def from_chunks(cls, chunks, tokenizer: Tokenizer | None = None, vocab_size: int | None = None,
                    max_sequence_length: int | None = None, meta: dict | None = None) -> "InferenceModel":
        """Wrap model chunks built elsewhere (a Trainer's `model`, DDP-wrapped or not), sharing their
        weights: generation with a policy that is being trained sees its current parameters.

        Under sequence parallelism the chunks are switched to plain TP for the duration of each inference
        call (a decode step has one token, which cannot be split over TP ranks) and restored after. With
        the distributed optimizer's overlapped param gather, call it inside `Trainer.params_synced()`."""
        chunks = list(chunks)
        if len(chunks) != 1:
            raise UserError("inference over virtual pipeline stages (parallel.vpp > 1) is not supported: "
                            "load the checkpoint with load_for_inference(ckpt, pp=...) instead")
        inner = gpt.unwrap(chunks[0])
        padded = _padded_vocab(inner)
        true_vocab = vocab_size or (tokenizer.vocab_size if tokenizer is not None else padded)
        if true_vocab > padded:
            raise UserError(f"the tokenizer has {true_vocab} tokens but the model only {padded} rows")
        return cls(chunks=chunks, tokenizer=tokenizer, vocab_size=true_vocab, padded_vocab_size=padded,
                   max_sequence_length=max_sequence_length or inner.max_sequence_length,
                   learned_positions=inner.position_embedding_type == "learned_absolute", meta=dict(meta or {}))

    # --- layout --------------------------------------------------------------------------------------

    @property
    def config(self):
        return gpt.unwrap(self.chunks[0]).config

    @property
    def is_first_stage(self) -> bool:
        return bool(gpt.unwrap(self.chunks[0]).pre_process)

    @property
    def is_last_stage(self) -> bool:
        return bool(gpt.unwrap(self.chunks[0]).post_process)

    @property
    def device(self) -> torch.device:
        return dist.device()

    # --- the forward -----------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, inference_context=None,
                position_offset: int = 0, gather: bool = True) -> torch.Tensor | None:
        """Logits [b, s', V] of a [b, s] batch on the last pipeline stage (None on the others).

        `gather` all-gathers the vocab-parallel logits over TP (V = padded vocab); without it each TP rank
        gets its [b, s', V/tp] shard (what megatron's vocab-parallel cross entropy takes). With a static
        `inference_context` the keys and values go to (and come from) its KV cache, `position_offset` is the
        position of the first token (learned absolute positions need it; RoPE takes it from the context)
        and, inside megatron's InferenceMode, only the last position's logits are materialised (s' = 1)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = tokens.shape
        tokens = tokens.to(self.device)
        position_ids = (torch.arange(s, device=self.device) + position_offset).unsqueeze(0).expand(b, s)
        mask = attention_mask.to(self.device) if attention_mask is not None else None

        def forward_step(data_iterator, model):
            out = model(tokens, position_ids, mask, inference_context=inference_context, runtime_gather_output=gather)
            return out, None  # no loss function: the schedule hands back the output itself

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=self.chunks, num_microbatches=1,
            seq_length=s, micro_batch_size=b, decoder_seq_length=s, forward_only=True)
        return outputs[0] if self.is_last_stage else None

    @contextlib.contextmanager
    def inference_mode(self):
        """Eval mode (no dropout), no autograd and no sequence parallelism for the duration; restored after."""
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad(), _sequence_parallel_off(self.chunks):
                yield
        finally:
            for c, training in zip(self.chunks, was_training):
                c.train(training)

    # --- broadcasting results of the last stage ----------------------------------------------------------

    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank of this model replica gets the last pipeline stage's (TP source rank's) `tensor`;
        the other ranks pass a tensor of the same shape and dtype to receive into."""
        from megatron.core import parallel_state as ps

        if not torch.distributed.is_initialized():
            return tensor
        tensor = tensor.contiguous()
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(tensor, ps.get_tensor_model_parallel_src_rank(),
                                        group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(tensor, ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        return tensor

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer: pass token ids")
        return self.tokenizer.encode(text)


def _padded_vocab(inner) -> int:
    if getattr(inner, "vocab_size", None):
        return int(inner.vocab_size)
    raise UserError("cannot tell the model's vocabulary size")


@contextlib.contextmanager
def _sequence_parallel_off(chunks):
    """Plain TP for a while: megatron copies `config.sequence_parallel` into its linear layers and the
    embedding at build time, so each copy is switched off and restored after."""
    config = gpt.unwrap(chunks[0]).config
    if not config.sequence_parallel:
        yield
        return
    saved: list[tuple[Any, str, Any]] = [(config, "sequence_parallel", True)]
    for chunk in chunks:
        for module in chunk.modules():
            for name in ("sequence_parallel", "reduce_scatter_embeddings"):
                if isinstance(getattr(module, name, None), bool) and getattr(module, name):
                    saved.append((module, name, True))
    for obj, name, _ in saved:
        setattr(obj, name, False)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _ensure_runtime(tp: int, pp: int, seed: int) -> None:
    """Set up torch.distributed and megatron's parallel state for (tp, pp) unless already done; an
    existing setup must have the same layout."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise UserError(f"the runtime is already set up with tp={have[0]} pp={have[1]}, not tp={tp} pp={pp}")
        return
    world = dist.read_env().world_size
    if world % (tp * pp):
        raise UserError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    dist.setup(tp=tp, pp=pp, seed=seed)


def load_for_inference(ckpt: str | Path, tp: int = 1, pp: int = 1, precision: str | None = None,
                       seed: int = 1234) -> InferenceModel:
    """Build the model of a final checkpoint (DIR with weights/, megaflow.json, tokenizer/) for this rank's
    share of a (tp, pp) layout, load its weights (saved in any layout) and return it in eval mode.

    Sets up torch.distributed (from torchrun/SLURM variables, else a world of one) and megatron's parallel
    state when that has not been done; the world may hold several data-parallel replicas, each generating
    on its own prompts. `precision` defaults to the checkpoint's (fp8 runs as bf16)."""
    from megaflow.config.loader import validate
    from megaflow.models import manifest
    from megaflow.models import weights

    path = Path(ckpt)
    meta = weights.read_meta(path)
    manifest.require_intact(path)  # before megatron is set up: one line naming a damaged file
    if "model" not in meta or "padded_vocab_size" not in meta:
        raise UserError(f"{path}: megaflow.json lacks the model config (not a final checkpoint?)")
    precision = precision or meta.get("precision", "fp32")
    if precision == "fp8":
        precision = "bf16"
    model_raw = dict(meta["model"])
    model_raw.pop("preset", None)
    cfg = validate({"model": model_raw, "parallel": {"tp": tp, "pp": pp}, "precision": precision,
                    "data": {"seq_length": 2}, "train": {"micro_batch_size": 1, "global_batch_size": 1}})
    padded = int(meta["padded_vocab_size"])
    if padded % tp:
        raise UserError(f"tp={tp} does not divide the checkpoint's padded vocabulary ({padded} rows)")
    tok_dir = path / meta.get("tokenizer", "tokenizer")
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.exists() else None

    _ensure_runtime(tp, pp, seed)
    tcfg = gpt.transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = gpt.build_gpt_chunks(cfg.model, tcfg, padded, head=meta.get("head", "lm"))
    weights.load_weights(path, chunks)
    for chunk in chunks:
        chunk.eval()
    true_vocab = tokenizer.vocab_size if tokenizer is not None else int(meta["model"].get("vocab_size", padded))
    return InferenceModel(chunks=chunks, tokenizer=tokenizer, vocab_size=min(true_vocab, padded),
                          padded_vocab_size=padded, max_sequence_length=cfg.model.max_position_embeddings,
                          learned_positions=cfg.model.position_embedding == "learned", meta=meta)
