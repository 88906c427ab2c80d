"""Core attention for megatron's local layer spec on torch's scaled_dot_product_attention.

megatron's own `DotProductAttention` (the local spec's) computes softmax(QK^T * scale + mask) V unfused:
the keys and values repeated per query group, a baddbmm into a [b*n, sq, sk] buffer, masked_fill and
softmax in separate passes, a bmm, and a layout copy. `SDPAttention` hands the same computation to
`torch.nn.functional.scaled_dot_product_attention`, whose fused CPU (and CUDA) kernels never
materialise the scores of a causal mask and read grouped keys and values in place (`enable_gqa`).
Transformer Engine's attention is used instead wherever TE is installed (megaflow.models.gpt).

Masks follow megatron's convention: a boolean [b or 1, 1, sq, sk] tensor, True = masked out, and None =
causal by the module's type (as TE's attention is). A query row must keep at least one key: packed rows
(megaflow.data.packing, megaflow.data.pair_packing) let padding attend to padding for that reason.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron's DotProductAttention (same constructor, parameters and checkpoint keys) with a fused forward:

        out = softmax(Q K^T * scale + M) V,   M = 0 where attended, -inf where masked

    Q [sq, b, n, d] and K, V [sk, b, g, d] with g query groups (n / g queries share one key/value head)
    in megatron's layout; the output is [sq, b, n*d]. The scale is megatron's (1/sqrt(d), or the
    config's softmax_scale), with apply_query_key_layer_scaling folded back in: it only moves where an
    fp16 softmax rounds. Dropout on the probabilities is the config's attention_dropout, drawn in the
    same RNG tracker region as megatron's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.softmax_offset is not None:
            raise ValueError("SDPA attention supports softmax_type='vanilla' only")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("SDPA attention does not do sliding-window attention")
        self.scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences go through a mask with the local spec"
        assert attention_bias is None, "attention bias is not supported"
        sq, sk = query.shape[0], key.shape[0]
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:  # queries are the last sq positions of sk (a chunk after cached keys): bottom-right aligned
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(diagonal=sk - sq)
        dropout = self.attention_dropout.p if self.training else 0.0
        # [s, b, heads, d] -> [b, heads, s, d]: views; SDPA's kernels take the strides as they are
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # megatron draws attention dropout from the model-parallel RNG stream unless SP is on
        forked = dropout and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                                 scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
        # [b, n, sq, d] -> [sq, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], self.hidden_size_per_partition)


# the `attention` choices of the local spec: torch SDPA, or megatron's unfused DotProductAttention
CORE_ATTENTION = {"sdpa": SDPAttention, "unfused": DotProductAttention}
