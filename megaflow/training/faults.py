"""Deterministic fault injection for tests: `MEGAFLOW_FAULT=KIND@STAGE:STEP[,KIND@STAGE:STEP...]`.

Random kill timing costs minutes per trial; naming the step makes a fault land exactly where a test
wants it (mid-run, during a save, on a NaN). Kinds:
    nan           the step's loss and gradients become NaN
    kill          SIGKILL right after the step (no chance to save)
    kill_in_save  SIGKILL while the checkpoint of that step is half written
    kill_in_step  SIGKILL in the middle of the step (an RL iteration: its rollouts scored, no update yet)
    sigterm       SIGTERM to this process after the step (what SLURM sends before a preemption)
    pause         after the step, wait (at most 60 s) until a stop signal arrives: a window in which a
                  test's own signal lands at a known step; "fault: paused after step N" on stderr says when
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

KINDS = ("nan", "kill", "kill_in_save", "kill_in_step", "sigterm", "pause")


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


def pause_until(stop_requested: Callable[[], bool], step: int, seconds: float = 60.0) -> None:
    print(f"fault: paused after step {step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + seconds
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.05)
