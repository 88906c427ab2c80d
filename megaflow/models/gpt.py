"""ModelConfig -> megatron-core GPTModel.

The local (pure megatron-core) layer spec on CPU, the Transformer Engine spec on GPU. megatron 0.19 marks
GPTModel deprecated in favour of HybridModel, whose specs import Transformer Engine at module level; the
choice is kept inside this file so that a later switch touches nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F

from megaflow.config.schema import ModelConfig, ParallelConfig
from megaflow.runtime import cpu

logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)


def _activation(name: str):
    return {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}[name]


def use_transformer_engine() -> bool:
    if cpu.is_enabled() or not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def has_fused_wgrad() -> bool:
    """megatron's own (non-TE) output layer needs apex's fused weight-gradient kernel for
    gradient_accumulation_fusion; the NVIDIA container has apex, a plain install does not."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: str = "fp32", fp8_recipe: str = "delayed"):
    """The megatron TransformerConfig for a model shape, parallel layout and precision."""
    from megatron.core.transformer import TransformerConfig

    on_cpu = cpu.is_enabled()
    te = use_transformer_engine()
    bf16 = precision in ("bf16", "fp8")
    kwargs = {}
    if precision == "fp8":
        if not te:
            raise ValueError("precision=fp8 needs Transformer Engine on a GPU")
        kwargs.update(fp8="hybrid", fp8_recipe=fp8_recipe, fp8_param=False)
    if parallel.recompute != "none":
        kwargs.update(recompute_granularity=parallel.recompute)
        if parallel.recompute == "full":
            kwargs.update(recompute_method=parallel.recompute_method, recompute_num_layers=parallel.recompute_layers)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=_activation(model.activation),
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias or model.add_bias_linear,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp and parallel.vpp > 1 else None,
        sequence_parallel=parallel.sp,
        context_parallel_size=parallel.cp,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # CPU: initialise full weights on the CPU generator and shard them, so every TP size starts equal.
        use_cpu_initialization=on_cpu,
        # Fusions need apex / TE / CUDA kernels.
        bias_activation_fusion=te and model.activation == "swiglu",
        masked_softmax_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=te and has_fused_wgrad(),
        persist_layer_norm=False,
        cross_entropy_loss_fusion=te,
        cross_entropy_fusion_impl="te" if te else "native",
        # Interleaved pipelines over gloo are silently wrong with batched p2p (DESIGN §3).
        batch_p2p_comm=not on_cpu,
        deallocate_pipeline_outputs=True,
        **kwargs,
    )


class SequenceParallelNorm:
    """A torch LayerNorm/RMSNorm for sequence parallelism with the local spec, whose own norm refuses SP.

    Under SP each TP rank normalises its slice of the sequence with the full (replicated) weight, so the
    weight's gradient is partial: tagging it `sequence_parallel` makes finalize_model_grads all-reduce it
    over the TP group, as megatron does for its fused norms."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def layer_spec(model: ModelConfig, tcfg, vp_stage: int | None = None, attention: str = "sdpa"):
    """TE spec on GPU; megatron's local spec otherwise, with `attention`'s core attention
    (megaflow.models.attention: "sdpa" or megatron's "unfused") and SP-capable norms when SP is on."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megaflow.models.attention import CORE_ATTENTION

    if use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec()
    if attention not in CORE_ATTENTION:
        raise ValueError(f"attention: expected one of {tuple(CORE_ATTENTION)}, got {attention!r}")
    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    self_attention = spec.submodules.self_attention
    submodules = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(
        self_attention, submodules=dataclasses.replace(self_attention.submodules,
                                                       core_attention=CORE_ATTENTION[attention])))
    if not tcfg.sequence_parallel:
        return dataclasses.replace(spec, submodules=submodules)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm))
    n_layers = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=SequenceParallelNorm)


class ScalarHead(torch.nn.Module):
    """A reward / value model's head in place of GPTModel's output layer: one number per position,
    `score = h . w` ([s, b, h] -> [s, b, 1]; GPTModel returns it as [b, s, 1]).

    The weight is replicated over tensor-parallel ranks: their hidden states are the same, so each rank
    computes the whole output and the whole input gradient, and nothing is reduced (unlike a
    ColumnParallelLinear). With sequence parallelism the sequence shards are gathered first, and the
    backward only splits the gradient again (`tensor_parallel_output_grad=False`): every rank already
    holds the full one. Its key is `output_layer.weight` ([1, h]), where megatron's checkpoint code
    expects an output layer; loading a language model's weights into a reward model leaves it out
    (megaflow.models.weights.load_weights)."""

    def __init__(self, tcfg):
        super().__init__()
        self.sequence_parallel = tcfg.sequence_parallel
        self.weight = torch.nn.Parameter(torch.empty(1, tcfg.hidden_size, dtype=tcfg.params_dtype))
        with torch.no_grad():
            tcfg.init_method(self.weight)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return torch.matmul(hidden_states, self.weight.t()), None


@contextlib.contextmanager
def rotary_positions(model: torch.nn.Module, position_ids: torch.Tensor):
    """RoPE at the given positions [b, s] instead of 0..s-1 for the forwards inside the block.

    megatron's rotary embedding takes a length and rotates row position t by t, which is right wherever
    only distances within a contiguous segment matter (packed SFT rows); a row whose tokens must sit at
    other positions (a shared prompt followed by two branches, megaflow.data.pair_packing) needs each
    token's own. The embedding's forward is swapped for one returning its rows at `position_ids`,
    [s, b, 1, d], which megatron's (unfused) rotary application broadcasts per batch row."""
    inner = unwrap(model)
    rotary = getattr(inner, "rotary_pos_emb", None)
    if rotary is None or inner.position_embedding_type != "rope":
        yield
        return
    own = rotary.forward

    def at_positions(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        emb = rotary.get_emb(int(position_ids.max()) + 1)[:, 0, 0, :]  # [positions, d]
        return emb[position_ids].transpose(0, 1)[:, :, None, :]

    rotary.forward = at_positions
    try:
        yield
    finally:
        rotary.forward = own


def loss_at_positions(loss_mask: torch.Tensor):
    """A GPTModel `output_processor` that runs the output layer and the cross-entropy only where
    `loss_mask` ([b, s]) is set and returns the per-token loss [b, s], zero elsewhere.

    Where few positions carry loss (a preference pair's responses after a long prompt) the logits of the
    others, a [positions, vocab] matmul and softmax each, are pure waste. The loss at the selected
    positions is megatron's own (`compute_language_model_loss`, vocab-parallel under TP). Not with
    sequence parallelism, where each TP rank holds a slice of the sequence: callers check
    `sequence_parallel` first."""
    keep = loss_mask.reshape(-1) > 0
    if not keep.any():  # nothing to score: one position keeps the shapes (its loss is masked out anyway)
        keep = keep.clone()
        keep[0] = True

    def process(*, hidden_states, output_layer, output_weight, labels, compute_language_model_loss, **_):
        b, s = loss_mask.shape
        flat = hidden_states.transpose(0, 1).reshape(b * s, 1, -1)  # [s, b, h] -> [b*s, 1, h]
        logits, _ = output_layer(flat[keep], weight=output_weight)
        ce = compute_language_model_loss(labels.reshape(1, -1)[:, keep], logits)  # [1, n]
        out = torch.zeros(b * s, dtype=ce.dtype, device=ce.device)
        return out.masked_scatter(keep, ce.reshape(-1)).reshape(b, s)

    return process


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, from this TP rank's shard of the vocabulary [..., V/tp]:

        H = log Z - sum_v p_v z_v,   Z = sum_v exp(z_v)      (sums over every shard)

    The shards' partial sums are all-reduced with megatron's reduce-from-TP mapping, whose backward is the
    identity, so the gradient is exact (every rank computes the same H from the reduced sums)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits.float()
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    top = z.max(dim=-1, keepdim=True).values.detach()
    if tp > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    e = torch.exp(z - top)
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)], dim=-1)
    if tp > 1:
        sums = reduce_from_tensor_model_parallel_region(sums)
    return torch.log(sums[..., 0]) + top.squeeze(-1) - sums[..., 1] / sums[..., 0]


def token_logps_at_positions(loss_mask: torch.Tensor, temperature: float = 1.0, entropy: bool = False):
    """A GPTModel `output_processor` for the RL stages: per-token log-probs of the labels under
    softmax(logits / temperature) (the distribution the rollout sampled from) at the positions where
    `loss_mask` ([b, s]) is set, [b, s] and zero elsewhere; with `entropy`, [b, s, 2] holding the
    log-probs and the entropy of that distribution. Under sequence parallelism every position is computed
    (each TP rank holds a slice of the sequence; the output layer gathers it)."""
    b, s = loss_mask.shape

    def process(*, hidden_states, output_layer, output_weight, labels, compute_language_model_loss, **_):
        if getattr(output_layer, "sequence_parallel", False):  # the whole [s, b] grid
            logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, V/tp]
            logits = logits.float() / temperature
            parts = [vocab_parallel_entropy(logits).transpose(0, 1)] if entropy else []
            # megatron's cross entropy works in place on its input: the entropy reads a copy's original
            parts.insert(0, -compute_language_model_loss(labels, logits.clone() if entropy else logits))  # [b, s]
            out = torch.stack(parts, dim=-1)
            return out if entropy else out[..., 0]
        keep = loss_mask.reshape(-1) > 0
        if not keep.any():  # nothing to score: one position keeps the shapes
            keep = keep.clone()
            keep[0] = True
        flat = hidden_states.transpose(0, 1).reshape(b * s, 1, -1)  # [s, b, h] -> [b*s, 1, h]
        logits, _ = output_layer(flat[keep], weight=output_weight)  # [n, 1, V/tp]
        logits = logits.float() / temperature
        parts = [vocab_parallel_entropy(logits[:, 0, :])] if entropy else []
        ce = compute_language_model_loss(labels.reshape(1, -1)[:, keep], logits.clone() if entropy else logits)
        parts.insert(0, -ce.reshape(-1))
        picked = torch.stack(parts, dim=-1)
        out = torch.zeros(b * s, len(parts), dtype=picked.dtype, device=picked.device)
        out[keep] = picked
        out = out.reshape(b, s, len(parts))
        return out if entropy else out[..., 0]

    return process


HEADS = ("lm", "scalar")


def build_gpt_chunks(model: ModelConfig, tcfg, vocab_size: int, head: str = "lm",
                     attention: str = "sdpa") -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage owned by this rank (a list of one without VPP). `head`:
    "lm" (the language-model output layer) or "scalar" (ScalarHead: reward and value models, whose
    embeddings are never tied to an output layer); `attention`: the local spec's core attention.

    Every attention is causal by type: a forward without an attention mask is causal (TE's and
    megatron's own attention build that themselves); a mask is passed only to keep packed samples apart."""
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vpp = tcfg.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        chunk = GPTModel(
            config=tcfg,
            transformer_layer_spec=layer_spec(model, tcfg, vp_stage if vpp > 1 else None, attention),
            vocab_size=vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings and head == "lm",
            position_embedding_type="rope" if model.position_embedding == "rope" else "learned_absolute",
            rotary_base=int(model.rotary_base),
            rope_scaling=model.rope_scaling is not None,
            rope_scaling_factor=model.rope_scaling.factor if model.rope_scaling else 8.0,
            vp_stage=vp_stage if vpp > 1 else None,
        )
        _own_inverse_frequencies(chunk, model)
        if head == "scalar" and chunk.post_process:
            chunk.output_layer = ScalarHead(tcfg)
        chunks.append(chunk)
    if not cpu.is_enabled():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


def _own_inverse_frequencies(chunk: torch.nn.Module, model: ModelConfig) -> None:
    """megatron's RoPE takes an integer base, and its Llama-3.1 scaling only the factor (low/high frequency
    factors and original context fixed at 1, 4, 8192); other values get the same formulas with their own
    numbers. RoPE keeps `inv_freq` as a plain attribute: it survives `.cuda()` and never enters a checkpoint."""
    rotary = getattr(chunk, "rotary_pos_emb", None)
    scaling = model.rope_scaling
    custom_scaling = scaling is not None and not scaling.megatron_defaults
    if rotary is None or not (custom_scaling or model.rotary_base != int(model.rotary_base)):
        return
    dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    inv_freq = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is not None:
        inv_freq = rotary._apply_scaling(
            inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)


def wrap_ddp(chunks: list[torch.nn.Module], tcfg, parallel: ParallelConfig) -> list[torch.nn.Module]:
    """megatron DDP: contiguous fp32 grad buffers, bucketed all-reduce / reduce-scatter, optionally
    overlapped with the backward pass (and the distributed optimizer's param all-gather with the forward)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module

