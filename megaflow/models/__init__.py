"""ModelConfig -> megatron-core GPTModel (local spec on CPU, Transformer Engine spec on GPU)."""
