"""One adapter per HF architecture family: HF tensor names <-> megatron GPTModel parameters.

An adapter knows, for every HF tensor, its shape (from the model config) and where it lives in megatron's
parameters of a one-process (TP=1, PP=1) model, named as megatron's local layer spec names them:

    embedding.word_embeddings.weight          [padded vocab, h]  rows past the real vocabulary are zeros
    embedding.position_embeddings.weight      [positions, h]     GPT-2 only (learned positions)
    decoder.layers.N.input_layernorm.*        the attention's pre-norm (TE spec: linear_qkv.layer_norm_*)
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}
        fused QKV, grouped per KV head: for each of the `ng` query groups, its `nh/ng` query heads, then
        its key head, then its value head, each `d` rows: view [ng, nh/ng + 2, d, h]
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.*      (TE spec: mlp.linear_fc1.layer_norm_*)
    decoder.layers.N.mlp.linear_fc1.{weight,bias}   SwiGLU: [gate; up] stacked along the output dim
    decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.*
    output_layer.weight                       untied embeddings only

`load` copies one HF tensor into its place and `export` takes it out again, so a conversion streams
tensor by tensor in either direction, and HF -> megaflow -> HF gives back the same bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megaflow.config.schema import ModelConfig
from megaflow.errors import UserError


@dataclass(frozen=True)
class Slot:
    param: str  # megatron parameter name
    kind: str  # full | t (Conv1D, transposed) | rows | q | k | v | c_attn | gate | up | tied (lm_head copy)
    shape: tuple[int, ...]  # the HF tensor's shape


class Adapter:
    """Base class: subclasses fill `self.slots` (HF name -> Slot) in HF write order."""

    architecture = ""
    ignored_patterns: tuple[str, ...] = ()

    def __init__(self, model: ModelConfig, padded_vocab: int):
        self.model, self.padded_vocab = model, padded_vocab
        self.h, self.V = model.hidden_size, model.vocab_size
        self.nh, self.ng = model.num_attention_heads, model.query_groups
        self.d = model.kv_channels or model.hidden_size // model.num_attention_heads
        self.f = model.ffn_hidden_size
        self.slots: dict[str, Slot] = {}

    # -- what is where ----------------------------------------------------------------------------

    def ignored(self, name: str) -> bool:
        """Buffers some HF files carry that are no parameters (rebuilt by transformers on load)."""
        return any(re.search(p, name) for p in self.ignored_patterns)

    def specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, slot.shape) for name, slot in self.slots.items()]

    def check_names(self, found: dict[str, tuple[int, ...]], where: str) -> None:
        """Every expected tensor present with its shape, nothing unexpected; one line otherwise."""
        expected = self.slots
        present = {n: s for n, s in found.items() if not self.ignored(n)}
        missing = [n for n in expected if n not in present]
        unexpected = [n for n in present if n not in expected]
        if missing:
            raise UserError(f"{where}: {len(missing)} tensor(s) missing for {self.architecture} with this config.json: "
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            raise UserError(f"{where}: {len(unexpected)} tensor(s) that are not part of {self.architecture} with this "
                            f"config.json: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        for name, shape in present.items():
            if tuple(shape) != expected[name].shape:
                raise UserError(f"{where}: tensor {name} has shape {list(shape)}, expected {list(expected[name].shape)} "
                                f"(from config.json: {self.shape_hint()})")

    def shape_hint(self) -> str:
        m = self.model
        return (f"hidden {m.hidden_size}, layers {m.num_layers}, heads {m.num_attention_heads}, kv heads "
                f"{m.query_groups}, head dim {self.d}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}")

    # -- the views -----------------------------------------------------------------------------------

    def _qkv_view(self, p: torch.Tensor) -> torch.Tensor:
        return p.view(self.ng, self.nh // self.ng + 2, self.d, *p.shape[1:])

    def _part(self, p: torch.Tensor, kind: str) -> torch.Tensor:
        """The view of megatron parameter `p` an HF tensor of this kind occupies (in megatron's layout)."""
        if kind in ("full", "t"):
            return p
        if kind in ("rows", "tied"):
            return p[: self.V]
        if kind in ("q", "k", "v"):
            view, qpg = self._qkv_view(p), self.nh // self.ng
            return {"q": view[:, :qpg], "k": view[:, qpg], "v": view[:, qpg + 1]}[kind]
        if kind == "gate":
            return p[: self.f]
        if kind == "up":
            return p[self.f:]
        raise ValueError(kind)

    def load(self, name: str, tensor: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """Copy one HF tensor into megatron's parameters."""
        slot = self.slots[name]
        if tuple(tensor.shape) != slot.shape:
            raise UserError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(slot.shape)} "
                            f"(from config.json: {self.shape_hint()})")
        p = params[slot.param].data
        with torch.no_grad():
            if slot.kind == "tied":
                return  # a copy of the embedding some files carry; the embedding itself is loaded
            if slot.kind == "c_attn":
                w = tensor.t() if tensor.dim() == 2 else tensor  # Conv1D [h, 3h] -> [3h, h]
                for kind, part in zip("qkv", w.split(self.nh * self.d, dim=0)):
                    view = self._part(p, kind)
                    view.copy_(part.reshape(view.shape))
                return
            view = self._part(p, slot.kind)
            source = tensor.t() if slot.kind == "t" else tensor
            view.copy_(source.reshape(view.shape))

    def export(self, name: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """One HF tensor, a fresh copy, from megatron's parameters."""
        slot = self.slots[name]
        p = params[slot.param].data
        if slot.kind == "c_attn":
            parts = [self._part(p, kind).reshape(self.nh * self.d, *p.shape[1:]) for kind in "qkv"]
            w = torch.cat(parts, dim=0)
            out = w.t() if w.dim() == 2 else w
        else:
            out = self._part(p, slot.kind)
            out = out.t() if slot.kind == "t" else out
        return out.reshape(slot.shape).clone(memory_format=torch.contiguous_format)

    def pad_rows(self, params: dict[str, torch.Tensor]) -> None:
        """Zero the padded vocabulary rows (megatron pads the vocabulary for TP; HF has no such rows)."""
        with torch.no_grad():
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in params:
                    params[name].data[self.V:].zero_()


class LlamaAdapter(Adapter):
    """LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (QKV biases): `model.` prefix, separate
    q/k/v and gate/up projections, RMSNorm, untied or tied `lm_head`."""

    ignored_patterns = (r"\.rotary_emb\.inv_freq$",)

    def __init__(self, model: ModelConfig, padded_vocab: int, architecture: str, names=None):
        super().__init__(model, padded_vocab)
        self.architecture = architecture
        h, V, nh, ng, d, f = self.h, self.V, self.nh, self.ng, self.d, self.f
        s = self.slots
        s["model.embed_tokens.weight"] = Slot("embedding.word_embeddings.weight", "rows", (V, h))
        qkv_bias = model.add_qkv_bias or model.add_bias_linear
        for i in range(model.num_layers):
            hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
            s[hf + "input_layernorm.weight"] = Slot(mc + "input_layernorm.weight", "full", (h,))
            for proj, kind, rows in (("q_proj", "q", nh * d), ("k_proj", "k", ng * d), ("v_proj", "v", ng * d)):
                s[hf + f"self_attn.{proj}.weight"] = Slot(mc + "self_attention.linear_qkv.weight", kind, (rows, h))
                if qkv_bias:
                    s[hf + f"self_attn.{proj}.bias"] = Slot(mc + "self_attention.linear_qkv.bias", kind, (rows,))
            s[hf + "self_attn.o_proj.weight"] = Slot(mc + "self_attention.linear_proj.weight", "full", (h, nh * d))
            if model.add_bias_linear:
                s[hf + "self_attn.o_proj.bias"] = Slot(mc + "self_attention.linear_proj.bias", "full", (h,))
            s[hf + "post_attention_layernorm.weight"] = Slot(mc + "pre_mlp_layernorm.weight", "full", (h,))
            for proj, kind in (("gate_proj", "gate"), ("up_proj", "up")):
                s[hf + f"mlp.{proj}.weight"] = Slot(mc + "mlp.linear_fc1.weight", kind, (f, h))
                if model.add_bias_linear:
                    s[hf + f"mlp.{proj}.bias"] = Slot(mc + "mlp.linear_fc1.bias", kind, (f,))
            s[hf + "mlp.down_proj.weight"] = Slot(mc + "mlp.linear_fc2.weight", "full", (h, f))
            if model.add_bias_linear:
                s[hf + "mlp.down_proj.bias"] = Slot(mc + "mlp.linear_fc2.bias", "full", (h,))
        s["model.norm.weight"] = Slot("decoder.final_layernorm.weight", "full", (h,))
        if not model.tie_embeddings:
            s["lm_head.weight"] = Slot("output_layer.weight", "rows", (V, h))
        elif names is not None and "lm_head.weight" in names:
            s["lm_head.weight"] = Slot("embedding.word_embeddings.weight", "tied", (V, h))


class GPT2Adapter(Adapter):
    """GPT2LMHeadModel: Conv1D weights stored [in, out] (transposed here), fused `c_attn` split into
    megatron's per-head [q, k, v] groups, learned positions `wpe`, LayerNorm with biases, tied `wte`."""

    architecture = "GPT2LMHeadModel"
    ignored_patterns = (r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",)  # old files' causal-mask buffers

    def __init__(self, model: ModelConfig, padded_vocab: int, architecture: str = "GPT2LMHeadModel", names=None):
        super().__init__(model, padded_vocab)
        h, V, f = self.h, self.V, self.f
        names = set(names or ())
        # save_pretrained writes `transformer.` names; the original OpenAI-converted files have none
        p = "" if names and not any(n.startswith("transformer.") for n in names) else "transformer."
        self.prefix = p
        s = self.slots
        s[p + "wte.weight"] = Slot("embedding.word_embeddings.weight", "rows", (V, h))
        s[p + "wpe.weight"] = Slot("embedding.position_embeddings.weight", "full", (model.max_position_embeddings, h))
        for i in range(model.num_layers):
            hf, mc = f"{p}h.{i}.", f"decoder.layers.{i}."
            for part in ("weight", "bias"):
                s[hf + f"ln_1.{part}"] = Slot(mc + f"input_layernorm.{part}", "full", (h,))
            s[hf + "attn.c_attn.weight"] = Slot(mc + "self_attention.linear_qkv.weight", "c_attn", (h, 3 * h))
            s[hf + "attn.c_attn.bias"] = Slot(mc + "self_attention.linear_qkv.bias", "c_attn", (3 * h,))
            s[hf + "attn.c_proj.weight"] = Slot(mc + "self_attention.linear_proj.weight", "t", (h, h))
            s[hf + "attn.c_proj.bias"] = Slot(mc + "self_attention.linear_proj.bias", "full", (h,))
            for part in ("weight", "bias"):
                s[hf + f"ln_2.{part}"] = Slot(mc + f"pre_mlp_layernorm.{part}", "full", (h,))
            s[hf + "mlp.c_fc.weight"] = Slot(mc + "mlp.linear_fc1.weight", "t", (h, f))
            s[hf + "mlp.c_fc.bias"] = Slot(mc + "mlp.linear_fc1.bias", "full", (f,))
            s[hf + "mlp.c_proj.weight"] = Slot(mc + "mlp.linear_fc2.weight", "t", (f, h))
            s[hf + "mlp.c_proj.bias"] = Slot(mc + "mlp.linear_fc2.bias", "full", (h,))
        for part in ("weight", "bias"):
            s[p + f"ln_f.{part}"] = Slot(f"decoder.final_layernorm.{part}", "full", (h,))
        if not model.tie_embeddings:
            s["lm_head.weight"] = Slot("output_layer.weight", "rows", (V, h))
        elif "lm_head.weight" in names:
            s["lm_head.weight"] = Slot("embedding.word_embeddings.weight", "tied", (V, h))


def adapter_for(architecture: str, model: ModelConfig, padded_vocab: int, names=None) -> Adapter:
    """The adapter of an HF architecture; `names` (the tensors an HF directory holds) pick naming variants."""
    if architecture == "GPT2LMHeadModel":
        return GPT2Adapter(model, padded_vocab, architecture, names)
    if architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        return LlamaAdapter(model, padded_vocab, architecture, names)
    raise UserError(f"no adapter for {architecture}")
