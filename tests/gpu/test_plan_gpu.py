"""`megaflow plan`'s memory estimate against the memory a real run allocates (skipped without CUDA).

The bench-1b shape (DESIGN §4) in bf16 with Transformer Engine, one GPU, seq 2048, micro-batch 2 and 8,
three optimizer steps on random tokens through megaflow's engine (`Trainer.train_step`, the path
`megaflow train` runs). Compared, with the tolerances stated:
  - model state: `torch.cuda.memory_allocated()` between steps (weights, fp32 grad buffer, Adam state;
    no activations alive) vs plan's weights + grads + optimizer, within 5%;
  - peak: `torch.cuda.max_memory_allocated()` vs plan's total less its overhead allowance (the caching
    allocator's counter sees neither the CUDA context nor fragmentation), within 20%;
  - activations: the growth of the peak from micro-batch 2 to 8 vs plan's, within 20% (state cancels out).
The plan models megatron's fp32 logits (4sbV/t); TE's fused cross-entropy keeps bf16 ones, so the plan
should err high there, by about 2sbV bytes.
"""

from __future__ import annotations

import gc
import itertools

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

SEQ = 2048


def measure(tmp_path, micro_batch: int):
    """(plan, memory allocated between steps, peak allocated) for one micro-batch size."""
    import megatron.core  # noqa: F401  before any cuDNN op (Transformer Engine)
    import torch

    from megaflow import plan
    from megaflow.config import load_config
    from megaflow.runtime import distributed as dist
    from megaflow.training.engine import Trainer
    from megaflow.training.lm import LanguageModelTask

    cfg = load_config(None, ["model.preset=bench-1b", "precision=bf16", f"data.seq_length={SEQ}",
                             f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}",
                             f"run.dir={tmp_path}", "run.tensorboard=false", "run.progress=false"])
    estimate = plan.make_plan(cfg)  # at data.seq_length
    x = torch.randint(0, cfg.model.vocab_size, (micro_batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(micro_batch, SEQ)}
    dist.setup(seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg, LanguageModelTask(), estimate.vocab_size, stage_dir=tmp_path / f"mb{micro_batch}")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            trainer.train_step([itertools.repeat(batch)])
        torch.cuda.synchronize()
        state, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        trainer.close()
        del trainer
    finally:
        dist.teardown()
        gc.collect()
        torch.cuda.empty_cache()
    return estimate, state, peak


def test_plan_memory_matches_the_measured_allocation(tmp_path):
    GiB = 2**30
    rows = {}
    for micro_batch in (2, 8):
        estimate, state, peak = measure(tmp_path, micro_batch)
        (mem,) = estimate.memory
        rows[micro_batch] = (mem, state, peak)
        print(f"micro-batch {micro_batch}: state {state / GiB:.2f} GiB (plan "
              f"{(mem.weights + mem.grads + mem.optimizer) / GiB:.2f}), peak {peak / GiB:.2f} GiB "
              f"(plan {(mem.total - mem.overhead) / GiB:.2f}, activations {mem.activations / GiB:.2f})")
    for mem, state, peak in rows.values():
        assert state == pytest.approx(mem.weights + mem.grads + mem.optimizer, rel=0.05)
        assert peak == pytest.approx(mem.total - mem.overhead, rel=0.20)
    (small, _, peak_small), (large, _, peak_large) = rows[2], rows[8]
    assert peak_large - peak_small == pytest.approx(large.activations - small.activations, rel=0.20)
