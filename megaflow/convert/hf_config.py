"""Hugging Face config.json <-> megaflow ModelConfig, both ways, without importing torch or transformers.

Reading accepts both RoPE layouts: transformers 5.x writes `rope_parameters` ({rope_type, rope_theta, ...}),
older files `rope_theta` plus `rope_scaling` ({type|rope_type, factor, ...}). Writing produces the layout of
the installed transformers (5.x: `rope_parameters`; 4.x: `rope_theta` + `rope_scaling`; none installed: 5.x).

Mistral, Qwen2 and Llama share megaflow's Llama family (RMSNorm, SwiGLU, RoPE, GQA); Qwen2 adds QKV
biases. The HF architecture travels in the checkpoint's megaflow.json (`hf` block), with the original
config.json, so megaflow -> HF writes the same file back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megaflow.config.schema import ModelConfig
from megaflow.errors import UserError

# HF architecture -> adapter family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt2": "GPT2LMHeadModel"}
SUPPORTED = ", ".join(ARCHITECTURES)
ROPE_TYPES = ("default", "llama3")
# ModelConfig fields that are training settings, not part of the model's function.
_TRAINING_FIELDS = {"preset", "family", "make_vocab_size_divisible_by", "hidden_dropout", "attention_dropout",
                    "init_method_std"}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"--hf: not a directory: {hf_dir}")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json (expected a Hugging Face model directory with config.json and "
                        f"model.safetensors or model.safetensors.index.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def architecture_of(config: dict[str, Any], where: str = "config.json") -> tuple[str, str]:
    """(HF architecture, adapter family); one line listing the supported ones otherwise."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(config.get("model_type", ""))
    if arch not in ARCHITECTURES:
        named = arch or config.get("model_type") or "none given"
        raise UserError(f"{where}: architecture {named!r} is not supported (supported: {SUPPORTED})")
    if len(archs) > 1:
        raise UserError(f"{where}: several architectures {archs}; expected one of: {SUPPORTED}")
    return arch, ARCHITECTURES[arch]


def _need(config: dict, key: str, where: str):
    if config.get(key) is None:
        raise UserError(f"{where}: missing {key!r}")
    return config[key]


def rope_settings(config: dict[str, Any], where: str = "config.json") -> tuple[float, dict | None]:
    """(rope theta, llama3 scaling or None) from either layout; unsupported RoPE types are refused."""
    params = config.get("rope_parameters")
    if params is None:  # transformers 4.x: rope_theta + rope_scaling
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{where}: per-layer-type RoPE parameters are not supported (one set for every layer expected)")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{where}: partial_rotary_factor={partial} is not supported (RoPE over the whole head expected)")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    scaling = {"type": "llama3", "factor": float(_need(params, "factor", where + " rope parameters"))}
    for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)):
        value = params.get(key, default)
        scaling[key] = int(value) if key.startswith("original") else float(value)
    return theta, scaling


def _sliding_window(config: dict[str, Any], family: str) -> int | None:
    """The window that changes attention, if any (Mistral: `sliding_window`; Qwen2: only with
    `use_sliding_window` and layers typed sliding_attention)."""
    window = config.get("sliding_window")
    if not window:
        return None
    if family == "qwen2":
        layer_types = config.get("layer_types") or []
        if not config.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    return int(window)


def model_config_from_hf(config: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """megaflow's ModelConfig for an HF config, and notes worth telling the user."""
    from pydantic import ValidationError

    try:
        return _model_config_from_hf(config, where)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{where}: not a model megaflow can build ({'.'.join(map(str, first['loc'])) or 'model'}: "
                        f"{first['msg']})") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: unexpected value ({str(e).splitlines()[0]})") from None


def _model_config_from_hf(config: dict[str, Any], where: str) -> tuple[ModelConfig, list[str]]:
    arch, family = architecture_of(config, where)
    notes: list[str] = []
    if family == "gpt2":
        return _gpt2_from_hf(config, where, notes), notes
    hidden = _need(config, "hidden_size", where)
    heads = _need(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act={act!r} is not supported for {arch} (supported: silu, i.e. SwiGLU)")
    attention_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    if family == "llama" and attention_bias != mlp_bias:
        raise UserError(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                        "(megatron biases all linear layers or none; supported: both true or both false)")
    theta, scaling = rope_settings(config, where)
    max_pos = int(config.get("max_position_embeddings", 2048))
    window = _sliding_window(config, family)
    if window is not None and window < max_pos:
        notes.append(f"sliding_window={window} < max_position_embeddings={max_pos}: megaflow attends over the full "
                     f"causal context, so the model is converted with max_position_embeddings={window} "
                     f"(identical to {arch} up to {window} tokens)")
        max_pos = window
    model = ModelConfig(
        family="llama",
        vocab_size=_need(config, "vocab_size", where),
        hidden_size=hidden,
        num_layers=_need(config, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        kv_channels=head_dim if head_dim and head_dim * heads != hidden else None,
        ffn_hidden_size=_need(config, "intermediate_size", where),
        max_position_embeddings=max_pos,
        position_embedding="rope",
        rotary_base=theta,
        rope_scaling=scaling,
        normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        add_bias_linear=attention_bias and mlp_bias,
        add_qkv_bias=family == "qwen2",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_method_std=config.get("initializer_range", 0.02),
        attention_dropout=config.get("attention_dropout", 0.0) or 0.0,
    )
    return model, notes


_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_from_hf(config: dict[str, Any], where: str, notes: list[str]) -> ModelConfig:
    act = config.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise UserError(f"{where}: activation_function={act!r} is not supported for GPT2LMHeadModel "
                        f"(supported: {', '.join(_GELU)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if bool(config.get(key, ok)) != ok:
            raise UserError(f"{where}: {key}={config.get(key)} is not supported (expected {ok})")
    hidden = _need(config, "n_embd", where)
    resid, embd = config.get("resid_pdrop", 0.1), config.get("embd_pdrop", 0.1)
    if resid != embd:
        notes.append(f"embd_pdrop={embd} differs from resid_pdrop={resid}: megatron uses one hidden dropout ({resid})")
    return ModelConfig(
        family="gpt2",
        vocab_size=_need(config, "vocab_size", where),
        hidden_size=hidden,
        num_layers=_need(config, "n_layer", where),
        num_attention_heads=_need(config, "n_head", where),
        ffn_hidden_size=config.get("n_inner") or 4 * hidden,
        max_position_embeddings=_need(config, "n_positions", where),
        position_embedding="learned",
        normalization="LayerNorm",
        norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        activation=_GELU[act],
        add_bias_linear=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        init_method_std=config.get("initializer_range", 0.02),
        hidden_dropout=resid,
        attention_dropout=config.get("attn_pdrop", 0.1),
    )


# --- comparing models ---------------------------------------------------------------------------------


def model_fields(model: ModelConfig) -> dict[str, Any]:
    """What defines the model's function (not training settings), with derived values made explicit."""
    d = model.model_dump(mode="json")
    for key in _TRAINING_FIELDS:
        d.pop(key, None)
    d["num_query_groups"] = model.query_groups
    d["kv_channels"] = model.kv_channels or model.hidden_size // model.num_attention_heads
    if model.position_embedding == "learned":
        d.pop("rotary_base"), d.pop("rope_scaling")
    return d


# What decides the shapes of the weights (max positions only with learned positions, added below).
_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "position_embedding", "normalization", "add_bias_linear", "add_qkv_bias",
                 "tie_embeddings")


def model_differences(ours: ModelConfig, theirs: ModelConfig, scope: str = "all") -> list[str]:
    """Fields (as `name: ours vs theirs`) where two model configs differ. scope `all`: everything that
    defines the model's function; `shapes`: only what decides the weights' shapes (not the vocabulary,
    which a stage takes from its checkpoint)."""
    a, b = model_fields(ours), model_fields(theirs)
    if scope == "shapes":
        keys = set(_SHAPE_FIELDS) | {"gated"} | ({"max_position_embeddings"} if ours.position_embedding == "learned" else set())
        a["gated"], b["gated"] = ours.activation == "swiglu", theirs.activation == "swiglu"
    else:
        keys = set(a) | set(b)
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(keys) if a.get(k) != b.get(k)]


# --- writing ----------------------------------------------------------------------------------------------


def transformers_major() -> int | None:
    try:
        import importlib.metadata

        return int(importlib.metadata.version("transformers").split(".")[0])
    except Exception:  # not installed, or an unparsable version
        return None


def unrepresentable(model: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot compute `model`, or None when it can."""
    head_dim_ok = not model.kv_channels or model.kv_channels * model.num_attention_heads == model.hidden_size
    if arch == "GPT2LMHeadModel":
        if not (model.position_embedding == "learned" and model.normalization == "LayerNorm"
                and model.activation in ("gelu_tanh", "gelu") and model.add_bias_linear):
            return "GPT-2 needs learned positions, LayerNorm, GELU and biases"
        if model.query_groups != model.num_attention_heads or not head_dim_ok:
            return "GPT-2 has neither grouped-query attention nor a separate head dimension"
        return None
    if not (model.position_embedding == "rope" and model.normalization == "RMSNorm" and model.activation == "swiglu"):
        return f"{arch} needs RoPE, RMSNorm and SwiGLU"
    if arch == "Qwen2ForCausalLM":
        if not model.add_qkv_bias or model.add_bias_linear:
            return "Qwen2 has biases on Q, K and V only (add_qkv_bias without add_bias_linear)"
        return None if head_dim_ok else "Qwen2 has no head_dim (kv_channels must be hidden_size / num_attention_heads)"
    if model.add_qkv_bias and not model.add_bias_linear:
        return f"{arch} has no Q/K/V-only biases"
    if arch == "MistralForCausalLM" and model.add_bias_linear:
        return "Mistral has no biases"
    return None


def architecture_for(model: ModelConfig, arch: str | None = None) -> str:
    """`arch` when it computes what `model` computes, else (for checkpoints that never were HF ones, arch
    None) the HF architecture that does; one line saying why not otherwise."""
    if arch is not None:
        why = unrepresentable(model, arch)
        if why:
            raise UserError(f"this model cannot be written as {arch}: {why}")
        return arch
    for candidate in ("Qwen2ForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel"):
        if unrepresentable(model, candidate) is None:
            return candidate
    raise UserError(
        "this model has no Hugging Face architecture: supported are RoPE + RMSNorm + SwiGLU (LlamaForCausalLM; "
        "Qwen2ForCausalLM with add_qkv_bias) and learned positions + LayerNorm + GELU + biases (GPT2LMHeadModel); "
        f"got position_embedding={model.position_embedding}, normalization={model.normalization}, "
        f"activation={model.activation}, add_bias_linear={model.add_bias_linear}, add_qkv_bias={model.add_qkv_bias}")


def _rope_keys(model: ModelConfig, new_style: bool) -> dict[str, Any]:
    theta = model.rotary_base
    theta = int(theta) if theta == int(theta) and not new_style else theta
    s = model.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    if new_style:
        return {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": float(theta)}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _generated(model: ModelConfig, arch: str, dtype: str, new_style: bool) -> dict[str, Any]:
    """The keys megaflow owns in an HF config of `arch`."""
    if arch == "GPT2LMHeadModel":
        return {
            "architectures": [arch], "model_type": "gpt2", "vocab_size": model.vocab_size,
            "n_embd": model.hidden_size, "n_layer": model.num_layers, "n_head": model.num_attention_heads,
            "n_inner": None if model.ffn_hidden_size == 4 * model.hidden_size else model.ffn_hidden_size,
            "n_positions": model.max_position_embeddings, "layer_norm_epsilon": model.norm_epsilon,
            "activation_function": "gelu_new" if model.activation == "gelu_tanh" else "gelu",
            "tie_word_embeddings": model.tie_embeddings, "initializer_range": model.init_method_std,
            "resid_pdrop": model.hidden_dropout, "embd_pdrop": model.hidden_dropout,
            "attn_pdrop": model.attention_dropout, _dtype_key(new_style): dtype,
        }
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch]
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads, "num_key_value_heads": model.query_groups,
        "intermediate_size": model.ffn_hidden_size, "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "hidden_act": "silu", "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_method_std, "attention_dropout": model.attention_dropout,
        **_rope_keys(model, new_style), _dtype_key(new_style): dtype,
    }
    if model_type != "qwen2":
        out["head_dim"] = head_dim
    if model_type == "llama":
        out["attention_bias"] = out["mlp_bias"] = model.add_bias_linear
    return out


def _dtype_key(new_style: bool) -> str:
    return "dtype" if new_style else "torch_dtype"


_ROPE_AND_DTYPE = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype")


def hf_config_for(model: ModelConfig, base: dict[str, Any] | None, arch: str | None,
                  dtype: str | None) -> dict[str, Any]:
    """The config.json for `model` with tensors in `dtype` (None: as `base` says). With `base` (the
    config.json it was converted from) and the same model, `base` itself, so a round trip writes the same
    file; otherwise `base` with megaflow's keys replaced (what megaflow does not know, such as token ids,
    dropout and init settings, is kept)."""
    new_style = (transformers_major() or 5) >= 5
    if base is not None and not model_differences(model, model_config_from_hf(base)[0]):
        out = dict(base)
    else:
        arch = architecture_for(model, arch)
        generated = _generated(model, arch, dtype or "float32", new_style)
        out = {k: v for k, v in (base or {}).items() if k not in _ROPE_AND_DTYPE}
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "initializer_range"):
            if base is not None and key in base:
                generated[key] = base[key]
        if base is not None and dtype is None:
            generated.pop(_dtype_key(new_style))
            if base.get("dtype", base.get("torch_dtype")) is not None:
                generated[_dtype_key(new_style)] = base.get("dtype", base.get("torch_dtype"))
        out.update(generated)
        family = ARCHITECTURES.get(arch)
        window = _sliding_window(out, family) if family in ("mistral", "qwen2") else None
        if window is not None and window < model.max_position_embeddings:  # megaflow attended over everything
            out["sliding_window"] = None
            if family == "qwen2":
                out["use_sliding_window"] = False
                out.pop("layer_types", None)
    if dtype is not None:
        key = next((k for k in ("dtype", "torch_dtype") if k in out), _dtype_key(new_style))
        out[key] = dtype
    return out


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'bf16'; what HF writes in config.json."""
    text = str(dtype).replace("torch.", "")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}.get(text, text)
