"""LR schedules: linear warmup, then cosine or WSD decay (megatron's scheduler behind our config)."""

from __future__ import annotations

import math

import pytest

from megaflow.config import load_config
from megaflow.training.optimizer import build_scheduler
from tests.conftest import TEST_CONFIG


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def _lrs(*overrides):
    cfg = load_config(TEST_CONFIG, list(overrides))
    opt = _FakeOptimizer()
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(cfg.train.steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1", "train.schedule=cosine")
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    # half-way through the decay the cosine is at the mid point between max and min
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_is_flat_then_decays_at_the_end():
    lrs = _lrs("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.0",
               "train.schedule=wsd", "train.wsd_decay_steps=20")
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:80])
    assert lrs[90] == pytest.approx(0.5, abs=0.06) and lrs[99] < 0.1
