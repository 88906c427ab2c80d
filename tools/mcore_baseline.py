"""Bare megatron-core pretraining step: the baseline that megaflow's engine is measured against.

This is what a user of megatron-core writes without megaflow: torch.distributed + parallel_state, a
TransformerConfig and GPTModel, megatron DDP, `get_megatron_optimizer` (Adam), an OptimizerParamScheduler
and `get_forward_backward_func()` with its own forward_step / loss_func (Megatron-LM's pretrain_gpt.py
convention: per-token loss sums, divided by the batch's token count in finalize_model_grads). It shares
only `megaflow.runtime.cpu` (the CPU stand-ins for CUDA) with megaflow; every setting that matters for
speed is written out here and matches megaflow.models.gpt.transformer_config / training.optimizer:
use_cpu_initialization on CPU, the same fusion flags, bf16 params with fp32 main params and grads,
fp8 "hybrid" with the delayed recipe, calculate_per_token_loss, grad clip 1.0, the same Adam settings.

`build(shape, precision, micro_batch, seq, num_microbatches)` sets everything up and returns a
`step()` that runs one optimizer step over `num_microbatches` micro-batches and returns the loss;
tools/bench_pretrain.py imports it and times it in a subprocess of its own.

Usage (standalone; prints ms/step and tok/s):
    python tools/mcore_baseline.py [--shape tiny|small|1b] [--precision fp32|bf16|fp8]
        [--micro-batch N] [--seq N] [--num-microbatches N] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

# megatron.core (and with it Transformer Engine) is imported before any torch operation that uses cuDNN:
# otherwise TE loads a second cuDNN (see ../shared/gpu/README.md).
import megatron.core  # noqa: F401  isort: skip

import argparse
import functools
import itertools
import socket
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def init_distributed(seed: int = 1234) -> bool:
    """A world of one: gloo on CPU (with megaflow's CPU stand-ins), nccl on GPU; megatron parallel_state
    with every parallel size 1; seeds. Returns whether the CPU stand-ins are active."""
    from megatron.core import parallel_state, tensor_parallel

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from megaflow.runtime import cpu

        cpu.enable()
    else:
        torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return on_cpu


def transformer_config(shape: dict, precision: str, on_cpu: bool, te: bool):
    from megatron.core.transformer import TransformerConfig

    assert shape.get("activation", "swiglu") == "swiglu" and shape.get("normalization", "RMSNorm") == "RMSNorm"
    bf16 = precision in ("bf16", "fp8")
    extra = {}
    if precision == "fp8":
        if not te:
            raise SystemExit("precision fp8 needs Transformer Engine on a GPU")
        extra = dict(fp8="hybrid", fp8_recipe="delayed", fp8_param=False)
    return TransformerConfig(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape.get("num_query_groups") or shape["num_attention_heads"],
        kv_channels=shape.get("kv_channels"),
        ffn_hidden_size=shape["ffn_hidden_size"],
        normalization="RMSNorm",
        layernorm_epsilon=float(shape.get("norm_epsilon", 1e-5)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=float(shape.get("init_method_std", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=te,
        masked_softmax_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=te and _has_fused_wgrad(),
        persist_layer_norm=False,
        cross_entropy_loss_fusion=te,
        cross_entropy_fusion_impl="te" if te else "native",
        batch_p2p_comm=not on_cpu,
        deallocate_pipeline_outputs=True,
        calculate_per_token_loss=True,
        **extra,
    )


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's pretrain_gpt loss: the per-token loss sum and the token count of this micro-batch."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def build(shape: dict, precision: str = "fp32", micro_batch: int = 8, seq: int = 256, num_microbatches: int = 2,
          *, vocab_size: int | None = None, tokens: torch.Tensor | None = None, lr: float = 3e-4, seed: int = 1234,
          weight_decay: float = 0.1, clip_grad: float = 1.0, attention: str = "sdpa"):
    """Everything a bare-megatron-core training script sets up; returns `step() -> loss`.

    `shape` is a dict of megaflow model.* names (hidden_size, num_layers, num_attention_heads,
    num_query_groups, ffn_hidden_size, max_position_embeddings, rotary_base, norm_epsilon, vocab_size);
    `vocab_size` is the (padded) embedding size; `tokens` a [num_microbatches, micro_batch, seq + 1] batch.
    `attention` (local spec only): "sdpa" puts megaflow's SDPA core attention into megatron's spec (the one
    piece of megaflow's model this baseline shares, so that both run the same attention), "unfused" keeps
    megatron's DotProductAttention with an explicit causal mask.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    on_cpu = init_distributed(seed)
    te = have_transformer_engine()
    vocab = vocab_size or common.pad_vocab(shape["vocab_size"])
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())

    config = transformer_config(shape, precision, on_cpu, te)
    spec = get_gpt_layer_with_transformer_engine_spec() if te else get_gpt_layer_local_spec(normalization="RMSNorm")
    sdpa = not te and attention == "sdpa"
    if sdpa:
        from megaflow.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=shape["max_position_embeddings"],
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(shape.get("rotary_base", 10000)),
    )
    if not on_cpu:
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)

    bf16 = precision in ("bf16", "fp8")
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=0.9,
                        adam_beta2=0.95, adam_eps=1e-8, clip_grad=clip_grad, bf16=bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=False),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10**6,
        lr_decay_style="constant", start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=10**6,
        wd_incr_style="constant",
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    if tokens is None:
        tokens = common.make_tokens(shape["vocab_size"], num_microbatches, micro_batch, seq)
    batches = [
        {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
         "loss_mask": torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.float)}
        for x in tokens
    ]
    data_iterator = itertools.cycle(batches)
    # megatron's unfused attention takes an explicit boolean causal mask (True = masked out); TE and SDPA
    # are causal by type.
    causal = None if te or sdpa else torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, position_ids, causal, labels=labels)
        return output, functools.partial(loss_func, loss_mask)

    forward_backward = get_forward_backward_func()

    def step() -> float:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
            num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=micro_batch,
            decoder_seq_length=seq, forward_only=False,
        )
        update_ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        total = torch.stack([d["lm loss"] for d in losses]).sum(0)
        return (total[0] / total[1]).item()

    step.info = {"transformer_engine": te, "layer_spec": "te" if te else f"local, {attention}", "vocab": vocab,
                 "params_dtype": str(config.params_dtype), "optimizer": type(optimizer.optimizer).__name__
                 if hasattr(optimizer, "optimizer") else type(optimizer).__name__}
    return step


def _has_fused_wgrad() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="small")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--num-microbatches", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    shape = common.read_shape(a.shape)
    precision = a.precision or ("bf16" if gpu else "fp32")
    mbs = a.micro_batch or 8
    seq = a.seq or min(shape["max_position_embeddings"], 2048 if gpu else 256)
    n_micro = a.num_microbatches or (1 if gpu else 2)
    step = build(shape, precision, mbs, seq, n_micro)
    times, losses = common.time_steps(step, a.warmup, a.steps)
    ms = 1000 * common.median(times)
    print(f"bare megatron-core {a.shape} {precision} ({step.info['layer_spec']} spec): {ms:.1f} ms/step, "
          f"{mbs * seq * n_micro / (ms / 1000):,.0f} tok/s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()

