"""The megatron side of a conversion: one process, a TP=1 / PP=1 GPTModel, its parameters by name, logits.

Conversions build the whole model in one process (megatron's parallel_state is process-global, so the
`megaflow convert` command, or a subprocess, owns it); the checkpoint it writes is megatron
dist_checkpointing and loads into any TP/PP layout.
"""

from __future__ import annotations

import torch

from megaflow.config.schema import ModelConfig, ParallelConfig
from megaflow.errors import UserError
from megaflow.models import gpt
from megaflow.runtime import distributed as dist

# Transformer Engine's spec fuses the pre-norms into the next linear layer; the adapters use local names.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def setup_one_process() -> None:
    if dist.read_env().world_size > 1:
        raise UserError("megaflow convert runs in one process: start it without torchrun/srun "
                        "(the checkpoint it writes loads into any TP/PP layout)")
    dist.setup(tp=1, pp=1, seed=0)


def build(model: ModelConfig, padded_vocab: int, initialize: bool = False) -> torch.nn.Module:
    """A TP=1 GPTModel in eval mode, fp32. Without `initialize` its weights are left unset (to be loaded)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("conversion needs a TP=1, PP=1 megatron setup")
    tcfg = gpt.transformer_config(model, ParallelConfig(), "fp32")
    tcfg.perform_initialization = initialize
    chunk = gpt.build_gpt_chunks(model, tcfg, padded_vocab)[0]
    return chunk.eval()


def parameters(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under the local spec's names, whichever spec built it."""
    out = {}
    for name, param in gpt.unwrap(chunk).named_parameters():
        for te, local in _TE_NAMES.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        out[name] = param
    return out


def logits(chunk: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary (padded) logits [batch, seq, vocab] on the CPU, gathered over TP ranks."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = dist.device()
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = chunk(tokens, positions, None)  # no mask: causal
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            out = gather_from_tensor_model_parallel_region(out)
    return out.float().cpu()
