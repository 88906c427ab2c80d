"""Verifiable rewards: a Python function scores each (prompt, response), in worker processes with a timeout.

    fn(prompt: str, response: str, answer: str | None = None, **fields) -> float

`fields` are the prompt record's other fields. The function is named `file.py:name` (a file of the user's)
or by a bundled name: `exact_match` (1.0 when the response equals the reference answer, whitespace
stripped, else 0.0) and `words` (the tiny task's: the share of the answer's lines the response gets right
in place, over the longer of the two, so an exact answer scores 1.0).

A call that raises, returns something that is not a finite number, or runs past `timeout` seconds is a
*failure*: counted by kind, its first messages kept, and its sample left out of the loss (never a silent
0, the failure of verl PR #5635). Workers are spawned processes (no fork of a process holding torch and
its threads); a call that hangs is stopped by an alarm in its worker, and a worker that does not come
back is killed with its pool, which is started afresh.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megaflow.errors import UserError

BUNDLED = ("exact_match", "words")


def exact_match(prompt: str, response: str, answer: str | None = None, **fields) -> float:
    """1.0 when the response is the reference answer (surrounding whitespace ignored), else 0.0."""
    if answer is None:
        raise ValueError("exact_match needs a reference answer (the record's answer field)")
    return float(response.strip() == str(answer).strip())


def words(prompt: str, response: str, answer: str | None = None, **fields) -> float:
    """The tiny task's reward (megaflow.data.synthetic: one word a line): matching lines in place over the
    longer of answer and response, so extra or missing lines cost and only the exact answer scores 1.0."""
    if answer is None:
        raise ValueError("words needs a reference answer (the record's answer field)")
    want, got = str(answer).strip().split("\n"), response.strip().split("\n")
    return sum(a.strip() == b.strip() for a, b in zip(want, got)) / max(len(want), len(got))


def check_spec(spec: str, key: str = "rl.reward.function") -> None:
    """A bundled name, or FILE.py:NAME with FILE existing: one line naming the key otherwise. The name
    itself is checked when the function is loaded (importing the user's file runs its code)."""
    if spec in BUNDLED:
        return
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise UserError(f"{key}: expected FILE.py:FUNCTION or one of {', '.join(BUNDLED)}, got {spec!r}")
    if not Path(path).is_file():
        raise UserError(f"{key}: file not found: {path}")


def load_function(spec: str) -> Callable:
    """The callable `spec` names (see check_spec)."""
    if spec in BUNDLED:
        return globals()[spec]
    check_spec(spec)
    path, _, name = spec.rpartition(":")
    module_name = f"megaflow_reward_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error is theirs, in one line
        raise UserError(f"rl.reward.function: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"rl.reward.function: {path} has no function {name!r}")
    return fn


# --- one call, in a worker or here -------------------------------------------------------------------

_FUNCTION: Callable | None = None


def _init_worker(spec: str) -> None:
    global _FUNCTION
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stage handles Ctrl-C; workers just go
    _FUNCTION = load_function(spec)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _call(args: tuple) -> tuple[str, float | str]:
    """("ok", reward) or (failure kind, message): runs in a worker, the alarm bounding the call."""
    prompt, response, answer, fields, timeout = args
    previous = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    if timeout:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        value = _FUNCTION(prompt, response, answer=answer, **fields)
    except _Timeout:
        return "timeout", f"no result within {timeout:g} s"
    except Exception as e:  # noqa: BLE001 - the user's code: any exception is a counted failure
        return "error", f"{type(e).__name__}: {e}"
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return "bad value", f"returned {value!r}, not a finite number"
    return "ok", float(value)


@dataclass
class RewardResults:
    """Rewards of a batch: `values[i]` is None where call i failed."""

    values: list[float | None]
    failures: Counter = field(default_factory=Counter)  # kind -> count
    examples: list[str] = field(default_factory=list)  # the first few failure messages

    @property
    def failure_rate(self) -> float:
        return sum(self.failures.values()) / max(1, len(self.values))


class RewardFunction:
    """A reward function in a pool of `workers` spawned processes (0: in this process, no timeout)."""

    def __init__(self, spec: str, workers: int = 2, timeout: float = 10.0):
        self.spec, self.workers, self.timeout = spec, workers, timeout
        self._fn = load_function(spec)  # here too: a missing name or a broken import is one line now
        self._pool = None

    def _ensure_pool(self):
        if self._pool is None and self.workers:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.spec,))
        return self._pool

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None],
                 fields: list[dict]) -> RewardResults:
        args = [(p, r, a, f, self.timeout) for p, r, a, f in zip(prompts, responses, answers, fields)]
        if not self.workers:
            global _FUNCTION
            _FUNCTION = self._fn
            outcomes = [_call(a[:-1] + (0,)) for a in args]
        else:
            outcomes = self._in_pool(args)
        results = RewardResults([v if kind == "ok" else None for kind, v in outcomes])
        for i, (kind, v) in enumerate(outcomes):
            if kind != "ok":
                results.failures[kind] += 1
                if results.failures[kind] <= 2:  # the first two of each kind
                    results.examples.append(f"sample {i}: {kind}: {v}")
        return results

    def _in_pool(self, args: list[tuple]) -> list[tuple[str, float | str]]:
        pool = self._ensure_pool()
        pending = [pool.apply_async(_call, (a,)) for a in args]
        # the alarm stops a hanging call; this deadline catches a worker that cannot be interrupted
        rounds = -(-len(args) // self.workers)
        deadline = time.monotonic() + (rounds + 1) * self.timeout + 10.0
        outcomes, stuck = [], False
        for job in pending:
            try:
                outcomes.append(job.get(timeout=max(0.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                outcomes.append(("timeout", f"no result within {self.timeout:g} s (worker killed)"))
                stuck = True
        if stuck:
            self.close()
        return outcomes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
