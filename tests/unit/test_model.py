"""The model builder: parameter count from the shape equals the built megatron model's."""

from __future__ import annotations

import pytest

from megaflow.config import load_config
from megaflow.models import gpt, size
from megaflow.runtime import distributed as dist
from tests.conftest import REPO


@pytest.mark.parametrize("overrides", [
    ["model.preset=tiny"],
    ["model.preset=gpt2-124m", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
     "model.ffn_hidden_size=256", "model.vocab_size=1000", "data.seq_length=128"],
    ["model.preset=tiny", "model.tie_embeddings=true", "model.add_qkv_bias=true"],
])
def test_count_parameters_matches_the_built_model(overrides):
    cfg = load_config(REPO / "configs/stages/pretrain-test.yaml", overrides)
    vocab = size.padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)
    dist.setup(seed=1)
    try:
        tcfg = gpt.transformer_config(cfg.model, cfg.parallel)
        model = gpt.build_gpt_chunks(cfg.model, tcfg, vocab)[0]
        built = sum(p.numel() for p in model.parameters())
    finally:
        dist.teardown()
    assert size.count_parameters(cfg.model, vocab).total == built
