"""`megaflow run PIPELINE`: decide what must run, run it stage by stage, check the gates, write the report.

What runs (decided for every stage before the first starts, printed by --dry-run):
    run     no record of the stage
    skip    done, and its config, its inputs and its output are what pipeline.json recorded
    resume  same config and inputs, not finished (failed, killed, preempted): from its latest checkpoint
    rerun   its config or an input changed, or a stage upstream runs: its directory is cleared first
A training stage runs as `megaflow train STAGE` in its own processes (`nproc_per_node`), so each stage
has its own parallel layout; the tokenizer, preprocess and eval stages run in this process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megaflow.algorithms import registry
from megaflow.errors import RunFailed, UserError
from megaflow.pipeline import state as st
from megaflow.pipeline.gates import flat_metrics
from megaflow.pipeline.spec import Pipeline, PlannedStage
from megaflow.runtime.launch import die_with_parent


class GateFailed(RunFailed):
    """A stage finished but its metrics do not pass its gate."""


class Stopped(RunFailed):
    """A stage saved a checkpoint and stopped before its end (SIGUSR1/SIGTERM, train.max_minutes): exit 75
    (EX_TEMPFAIL), so a SLURM script requeues the job and `megaflow run` resumes the stage."""

    exit_code = 75


class StageFailed(RunFailed):
    """A stage's command failed: its own error is above; exit 2 when that was a user error."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = 2 if exit_code == 2 else 3


@dataclass
class Decision:
    action: str  # run | skip | resume | rerun | keep (not selected)
    reason: str


def _inputs_hashes(p: PlannedStage, state: st.State) -> dict[str, str | None]:
    out = {}
    for key, path in p.stage.inputs(p.cfg).items():
        maker = p.references.get(str(path))
        out[key] = f"{maker}:{(state.stage(maker) or {}).get('output_hash')}" if maker else st.path_hash(path)
    return out


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


def plan(pipeline: Pipeline, state: st.State, selected: set[str]) -> dict[str, Decision]:
    decisions: dict[str, Decision] = {}
    for name, p in pipeline.stages.items():
        rec = state.stage(name)
        config = st.config_of(p.cfg, p.nproc)
        upstream = [d for d in p.deps if decisions[d].action in ("run", "rerun", "resume")]
        if name not in selected:
            ok = rec and rec.get("status") == "done" and p.stage.is_complete(p.cfg)
            decisions[name] = Decision("keep", "not selected" + ("" if ok else "; not finished: later stages may fail"))
        elif rec is None:
            decisions[name] = Decision("run", "new")
        elif rec.get("config_hash") != st.digest(config):
            changed = _changed_keys(rec.get("config", {}), config)
            decisions[name] = Decision("rerun", "config changed: " + (", ".join(changed[:4]) or "?")
                                       + (f" (+{len(changed) - 4})" if len(changed) > 4 else ""))
        elif upstream:
            decisions[name] = Decision("rerun", f"upstream {', '.join(upstream)} runs")
        elif (diff := [k for k, v in _inputs_hashes(p, state).items() if rec.get("inputs", {}).get(k) != v]):
            decisions[name] = Decision("rerun", f"input changed: {', '.join(diff)}")
        elif rec.get("status") == "done":
            if p.stage.is_complete(p.cfg) and st.path_hash(p.stage.output(p.cfg)) == rec.get("output_hash"):
                decisions[name] = Decision("skip", "done, unchanged")
            else:
                decisions[name] = Decision("rerun", "its output is missing or was changed")
        else:
            decisions[name] = Decision("resume", f"{rec.get('status', 'unfinished')} last time")
    return decisions


def format_plan(pipeline: Pipeline, decisions: dict[str, Decision]) -> str:
    width = max(len(n) for n in pipeline.stages)
    lines = [f"pipeline {pipeline.path} -> {pipeline.run_dir}"]
    for name, d in decisions.items():
        p = pipeline.stages[name]
        after = f"  after {', '.join(p.deps)}" if p.deps else ""
        procs = f"  x{p.nproc}" if p.nproc > 1 else ""
        lines.append(f"  {name:<{width}}  {d.action:<6}  {d.reason}{procs}{after}")
    if pipeline.missing:
        lines.append("missing inputs (a run stops on the first):")
        lines += [f"  {m}" for m in pipeline.missing]
    return "\n".join(lines)


def _train_command(p: PlannedStage, config_file: Path) -> list[str]:
    cmd = [sys.executable, "-m", "megaflow", "train", p.name, "--config", str(config_file)]
    return cmd + (["--nproc-per-node", str(p.nproc)] if p.nproc > 1 else [])


class _Signals:
    """SIGUSR1/SIGTERM while the pipeline runs: passed on to the running stage as SIGUSR1 (a training stage
    saves a checkpoint at its next step and exits; the `--nproc-per-node` launcher passes it to its ranks),
    and no later stage starts."""

    def __init__(self):
        self.received: str | None = None
        self.child: subprocess.Popen | None = None

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        print(f"megaflow: {signal.Signals(signum).name} received: the running stage saves a checkpoint and stops",
              file=sys.stderr, flush=True)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGUSR1)

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_stage(pipeline: Pipeline, p: PlannedStage, signals: _Signals) -> tuple[int, dict | None]:
    """Run one stage to its end: (exit status, 0 when the stage's command succeeded; its result)."""
    if p.name not in registry.TRAINING:
        try:
            return 0, p.stage.run(p.cfg)
        except UserError as e:
            print(f"megaflow: error: stages.{p.name}: {e}", file=sys.stderr)
            return 2, None
    config_file = pipeline.run_dir / ".pipeline" / f"{p.name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(p.raw, sort_keys=False))  # as written: unset keys stay unset
    sys.stdout.flush()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # the stage's processes end with the runner: a second runner never finds one still writing there
    signals.child = subprocess.Popen(_train_command(p, config_file), env=env, preexec_fn=die_with_parent)
    try:
        rc = signals.child.wait()
    finally:
        signals.child = None
    return rc, p.stage.result(p.cfg)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def execute(pipeline: Pipeline, only: str | None = None, start_from: str | None = None,
            dry_run: bool = False) -> int:
    names = list(pipeline.stages)
    for flag, value in (("--only", only), ("--from", start_from)):
        if value is not None and value not in names:
            raise UserError(f"{flag} {value}: not a stage of this pipeline (stages: {', '.join(names)})")
    selected = {only} if only else set(names[names.index(start_from):]) if start_from else set(names)
    if dry_run:
        state = st.State(pipeline.run_dir)
        print(format_plan(pipeline, plan(pipeline, state, selected)))
        return 0
    from megaflow.pipeline import report

    with st.lock(pipeline.run_dir), _Signals().installed() as signals:
        state = st.State(pipeline.run_dir)
        decisions = plan(pipeline, state, selected)
        print(format_plan(pipeline, decisions), flush=True)
        try:
            for name, d in decisions.items():
                if signals.received and d.action not in ("keep", "skip"):
                    raise Stopped(f"{signals.received} received: stage {name} not started; "
                                  "`megaflow run` again goes on from there")
                _one(pipeline, state, name, d, signals)
        finally:
            written = report.write_report(pipeline, state)
            print(f"report -> {written}", flush=True)
    return 0


def _one(pipeline: Pipeline, state: st.State, name: str, d: Decision, signals: _Signals) -> None:
    p = pipeline.stages[name]
    if d.action in ("keep", "skip"):
        if d.action == "skip":
            _check_gates(p, state.stage(name).get("metrics", {}), state)
        return
    if d.action == "rerun" or (d.action == "run" and p.stage.stage_dir(p.cfg).exists()):
        _clear(p)
    config = st.config_of(p.cfg, p.nproc)
    record = state.stage(name) or {}
    state.update(name, status="running", config_hash=st.digest(config), config=config,
                 inputs=_inputs_hashes(p, state), started=_now(), attempts=record.get("attempts", 0) + 1,
                 stage_dir=str(p.stage.stage_dir(p.cfg)), output=str(p.stage.output(p.cfg)))
    print(f"\n== {name} ({d.action}: {d.reason})", flush=True)
    t0 = time.time()
    rc, result = run_stage(pipeline, p, signals)
    seconds = time.time() - t0 + (record.get("seconds", 0.0) if d.action == "resume" else 0.0)
    if rc != 0 and signals.received and rc != 2:  # ended by the signal before it could save
        state.update(name, status="stopped", exit_code=rc, finished=_now(), seconds=seconds)
        raise Stopped(f"stage {name} ended on {signals.received} (exit {rc}); `megaflow run` again resumes it")
    if rc != 0:
        state.update(name, status="failed", exit_code=rc, finished=_now(), seconds=seconds)
        raise StageFailed(f"stage {name} failed (exit {rc}); `megaflow run` again resumes it" if rc != 2 else
                          f"stage {name} stopped on the error above; fix it and run again", rc)
    if result is None or result.get("status", "done") != "done" or not p.stage.is_complete(p.cfg):
        status = (result or {}).get("status", "unfinished")
        state.update(name, status="stopped", finished=_now(), seconds=seconds)
        why = f" on {signals.received}" if signals.received else ""
        raise Stopped(f"stage {name} stopped{why} ({status}) before its end; `megaflow run` again resumes it")
    metrics = flat_metrics(result)
    state.update(name, status="done", finished=_now(), seconds=seconds, metrics=metrics,
                 output_hash=st.path_hash(p.stage.output(p.cfg)), exit_code=0)
    _check_gates(p, metrics, state)


def _check_gates(p: PlannedStage, metrics: dict, state: st.State) -> None:
    failed = []
    results = []
    for gate in p.gates:
        passed, text = gate.check(metrics, p.name)
        results.append({"gate": gate.text, "passed": passed, "detail": text})
        if not passed:
            failed.append(text)
    if p.gates:
        state.update(p.name, gates=results)
    if failed:
        raise GateFailed(f"gate of stage {p.name} failed: {'; '.join(failed)}")


def _clear(p: PlannedStage) -> None:
    d = p.stage.stage_dir(p.cfg)
    if d.is_dir():
        shutil.rmtree(d)
    elif d.exists():
        d.unlink()
    for suffix in (".bin", ".idx"):  # an indexed prefix as output
        out = Path(str(p.stage.output(p.cfg)) + suffix)
        if out.is_file():
            out.unlink()
