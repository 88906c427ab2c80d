"""Deterministic fault injection for tests: `MEGAFLOW_FAULT=KIND@STAGE:STEP[,KIND@STAGE:STEP...]`.

Random kill timing costs minutes per trial; naming the step makes a fault land exactly where a test
wants it (mid-run, during a save, on a NaN). Kinds:
    nan           the step's loss and gradients become NaN
    kill          SIGKILL right after the step (no chance to save)
    kill_in_save  SIGKILL while the checkpoint of that step is half written
    sigterm       SIGTERM to this process after the step (what SLURM sends before a preemption)
"""

from __future__ import annotations

import os
import signal

KINDS = ("nan", "kill", "kill_in_save", "sigterm")


def _parse(spec: str) -> set[tuple[str, str, int]]:
    faults = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        stage, _, step = where.partition(":")
        if kind not in KINDS or not stage or not step.isdigit():
            raise ValueError(f"MEGAFLOW_FAULT: cannot parse {item!r} (expected KIND@STAGE:STEP, KIND in {KINDS})")
        faults.add((kind, stage, int(step)))
    return faults


def armed(kind: str, stage: str, step: int) -> bool:
    spec = os.environ.get("MEGAFLOW_FAULT")
    return bool(spec) and (kind, stage, step) in _parse(spec)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)
