"""Parity check: the megatron model and the HF model (transformers, fp32, eager attention) on the same
few sequences; the result is the largest absolute difference of their logits over the real vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

from megaflow.errors import UserError

DEFAULT_TOLERANCE = 1e-3


def sample_tokens(vocab_size: int, max_positions: int, sequences: int = 3, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids [sequences, length] (length capped at the model's positions)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (sequences, min(length, max_positions)), generator=g)


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the HF model in `hf_dir` (local files only, no remote code) in fp32."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--verify needs transformers (pip install 'megaflow[hf]')") from None
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True, attn_implementation="eager",
                                                 **{dtype_kw: torch.float32})
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens).logits.float()
    del model
    return out


def max_abs_diff(megatron_logits: torch.Tensor, reference: torch.Tensor) -> float:
    vocab = reference.shape[-1]
    return (megatron_logits[..., :vocab] - reference).abs().max().item()


def check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise UserError(f"--verify: {what}: max |logit difference| {diff:.3g} is above the tolerance {tolerance:g}; "
                        "nothing was written")
