"""Tiny Hugging Face models for the conversion tests: built from configs with random weights (never
downloaded), saved sharded with transformers' own save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 300
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# Non-default Llama-3.1 factors: megatron's built-in scaling cannot express them.
LLAMA3_CUSTOM = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                 "original_max_position_embeddings": 512}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)


def configs() -> dict:
    """name -> (transformers config, dtype to save in)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    return {
        # Llama 1/2: multi-head attention, untied, plain RoPE
        "llama": (LlamaConfig(**SMALL, max_position_embeddings=64, rms_norm_eps=1e-5), torch.float32),
        # Llama 3.1/3.2: GQA 4/2, tied embeddings, llama3 RoPE scaling (megatron's built-in factors)
        "llama31": (LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=True,
                                rope_parameters={**LLAMA3, "rope_theta": 10000.0}), torch.float32),
        # llama3 scaling with non-default low/high factors and original context: megaflow's inverse frequencies
        "llama31_custom": (LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=2048,
                                       rope_parameters={**LLAMA3_CUSTOM, "rope_theta": 10000.0}), torch.float32),
        # Mistral: GQA, head_dim 32 (heads x head_dim != hidden), no sliding window
        "mistral": (MistralConfig(**SMALL, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                                  sliding_window=None), torch.float32),
        # Mistral v0.1 style: a sliding window shorter than the context (mapped: context capped at the window)
        "mistral_window": (MistralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=16),
                           torch.float32),
        # Qwen2: QKV biases, GQA, saved in bfloat16 (dtype kept on the way back)
        "qwen2": (Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=64, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0}), torch.bfloat16),
        # GPT-2: Conv1D weights, learned positions, tied, gelu_new, an odd vocabulary (padded to 384)
        "gpt2": (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=257, n_positions=64, bos_token_id=0,
                            eos_token_id=0), torch.float32),
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights near 1, biases too), large enough that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.08 * noise)


def build(name: str, out: Path, tokenizer_dir: Path | None, seed: int = 0):
    """Save the model `name` sharded (small shards) into `out`, with the tokenizer files; returns the model."""
    from transformers import AutoModelForCausalLM

    config, dtype = configs()[name]
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size="40KB")
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, out / f.name)
        (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}) + "\n")
    return model.float().eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def variant(model, **config_changes):
    """The same weights under a changed config (a control: does the test notice the change?)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__(**{**model.config.to_dict(), **config_changes})
    config._attn_implementation = "eager"
    other = AutoModelForCausalLM.from_config(config)
    other.load_state_dict(model.state_dict())
    return other.float().eval()
