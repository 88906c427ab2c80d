"""How big a model is and how much compute it takes, from its config alone (no torch): the one home of
these formulas for `megaflow plan`, the engine's MFU and the pipeline's report (notation: megaflow/plan.py).

Parameters: exact for megatron's GPTModel (tests compare against built models).
Training FLOPs, two conventions, both with causal attention counted at half (6·L·s·q per token):
    training_flops   6·N·D + 6·L·s·q·D, N all parameters: the budgets papers publish (`megaflow plan`)
    flops_per_step   Megatron-LM's num_floating_point_operations: 6 x the matmul weights per token (QKV,
                     projection, MLP, logits; no embedding lookup, norms or biases) + the attention term:
                     the model FLOPs that MFU divides by peak
"""

from __future__ import annotations

from dataclasses import dataclass

from megaflow.config.schema import ModelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron pads the embedding so every tensor-parallel shard has the same number of rows."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the whole model by part. A layer's `layer_split` part is divided over TP ranks;
    `layer_whole` (norms, the row-parallel biases) is replicated on each."""

    num_layers: int
    layer_split: int
    layer_whole: int
    word_embedding: int  # V·h, split over TP
    position_embedding: int  # S_max·h for learned positions, whole on each TP rank
    output_layer: int  # V·h, 0 when tied to the embedding
    final_norm: int

    @property
    def layer(self) -> int:
        return self.layer_split + self.layer_whole

    @property
    def total(self) -> int:
        return (self.num_layers * self.layer + self.word_embedding + self.position_embedding
                + self.output_layer + self.final_norm)


def count_parameters(model: ModelConfig, vocab_size: int) -> ParamCount:
    """The parameters megatron's GPTModel allocates for `model` with a `vocab_size`-row embedding."""
    h, f = model.hidden_size, model.ffn_hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    q, k = model.num_attention_heads * d, model.query_groups * d
    up = 2 if model.activation == "swiglu" else 1  # SwiGLU: gate and up projections in one fc1
    norm = 2 * h if model.normalization == "LayerNorm" else h
    bias, qkv_bias = model.add_bias_linear, model.add_bias_linear or model.add_qkv_bias
    split = h * (q + 2 * k) + q * h + up * h * f + f * h
    split += (q + 2 * k if qkv_bias else 0) + (up * f if bias else 0)
    whole = 2 * norm + (2 * h if bias else 0)  # projection and fc2 biases are added after the all-reduce
    learned = model.position_embedding == "learned"
    return ParamCount(
        num_layers=model.num_layers, layer_split=split, layer_whole=whole, word_embedding=vocab_size * h,
        position_embedding=model.max_position_embeddings * h if learned else 0,
        output_layer=0 if model.tie_embeddings else vocab_size * h, final_norm=norm,
    )


def training_flops(model: ModelConfig, params: int, tokens: float, seq_length: int) -> tuple[float, float]:
    """(6·N·D, causal attention term 6·L·s·q·D) — see the module docstring."""
    d = model.kv_channels or model.hidden_size // model.num_attention_heads
    return 6.0 * params * tokens, 6.0 * model.num_layers * seq_length * model.num_attention_heads * d * tokens


def flops_per_step(model: ModelConfig, vocab_size: int, batch: int, seq: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, Megatron's formula with causal
    attention counted at half: per layer QKV and output projections, 2*s*h attention scores and values,
    the MLP; plus the logits layer."""
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    kv = model.kv_channels or h // model.num_attention_heads
    q, g = model.num_attention_heads * kv, model.query_groups * kv
    mlp_mats = 3 if model.activation == "swiglu" else 2
    per_token_layer = 2 * (h * (q + 2 * g) + q * h + mlp_mats * h * f) + 2 * seq * q  # causal: half of 4*s*q
    per_token = L * per_token_layer + 2 * h * vocab_size
    return 3.0 * per_token * batch * seq
