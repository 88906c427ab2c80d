"""Every stage megaflow knows, by name: what `megaflow train` offers and what a pipeline may name.

Adding a stage is one module in algorithms/ defining `STAGE = MyStage()` and one line here. Modules are
imported on first use, so a command that only validates a config stays fast.
"""

from __future__ import annotations

import importlib

from megaflow.algorithms.base import Stage

# name -> module holding STAGE; in pipeline order (a pipeline may run any subset its references allow)
STAGES: dict[str, str] = {
    "curate": "megaflow.algorithms.curate",
    "tokenizer": "megaflow.algorithms.tokenizer",
    "preprocess": "megaflow.algorithms.preprocess",
    "pretrain": "megaflow.algorithms.pretrain",
    "sft": "megaflow.algorithms.sft",
    "rm": "megaflow.algorithms.rm",
    "dpo": "megaflow.algorithms.dpo",
    "ppo": "megaflow.algorithms.ppo",
    "grpo": "megaflow.algorithms.grpo",
    "eval": "megaflow.algorithms.evaluate",
}
TRAINING = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")  # what `megaflow train` runs: TrainingStage subclasses


def get(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(name)
    return importlib.import_module(STAGES[name]).STAGE


def names() -> tuple[str, ...]:
    return tuple(STAGES)
