"""Checkpoints you can trust: a killed, preempted or corrupted run resumes onto exactly the trajectory of
an uninterrupted one; NaN steps are skipped; a diverging run stops."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megaflow.models import manifest
from tests.conftest import TEST_CONFIG, run_megaflow

pytestmark = pytest.mark.slow

STEPS = 30


def _args(tiny_pretrain, run_dir, *extra):
    return ["train", "pretrain", "--config", str(TEST_CONFIG), f"train.steps={STEPS}", "train.warmup_steps=3",
            "eval.every=0", "eval.final=false", "checkpoint.every=5", "checkpoint.keep=2", f"run.dir={run_dir}",
            f"tokenizer.path={tiny_pretrain / 'final' / 'tokenizer'}", f"data.cache_dir={tiny_pretrain.parent / 'data'}",
            *extra]


def _train(workdir, tiny_pretrain, run_dir, *extra, fault=None):
    env = {"MEGAFLOW_FAULT": fault} if fault else {}
    return run_megaflow(*_args(tiny_pretrain, run_dir, *extra), cwd=workdir, env=env)


def _trajectory(workdir, run_dir):
    rows = [json.loads(line) for line in (workdir / run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "split" not in r]


def _assert_complete_checkpoints_verify(workdir, run_dir):
    root = workdir / run_dir / "pretrain" / "checkpoints"
    for ckpt in root.glob("iter_*"):
        if not ckpt.name.endswith(".tmp"):
            assert manifest.verify(ckpt) is None, ckpt


@pytest.fixture(scope="module")
def reference(workdir, tiny_pretrain):
    proc = _train(workdir, tiny_pretrain, "runs/resume-ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _trajectory(workdir, "runs/resume-ref")
    assert [s for s, _, _ in ref] == list(range(1, STEPS + 1))
    return ref


@pytest.mark.parametrize("fault", ["kill@pretrain:12", "kill_in_save@pretrain:20"])
def test_injected_kill_then_resume_is_bitwise_identical(workdir, tiny_pretrain, reference, fault):
    run_dir = f"runs/resume-{fault.split('@')[0]}"
    first = _train(workdir, tiny_pretrain, run_dir, fault=fault)
    assert first.returncode == -signal.SIGKILL
    ckpts = workdir / run_dir / "pretrain" / "checkpoints"
    if fault.startswith("kill_in_save"):
        assert (ckpts / "iter_0000020.tmp").is_dir()  # half written ...
        assert (ckpts / "latest").read_text().strip() == "iter_0000015"  # ... and never named complete
    _assert_complete_checkpoints_verify(workdir, run_dir)
    second = _train(workdir, tiny_pretrain, run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert _trajectory(workdir, run_dir) == reference  # bitwise: floats round-trip exactly through JSON


def test_real_kill_9_at_random_moments(workdir, tiny_pretrain, reference):
    """Three real SIGKILLs at random times (seeded) into one run, then a clean finish."""
    rng = random.Random(20261126)
    run_dir = "runs/resume-random-kill"
    cmd = [sys.executable, "-m", "megaflow", *_args(tiny_pretrain, run_dir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for trial in range(3):
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(5.0, 9.0))  # ~5 s of start-up, then somewhere in the steps or a save
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _assert_complete_checkpoints_verify(workdir, run_dir)
    last = _train(workdir, tiny_pretrain, run_dir)
    assert last.returncode == 0, last.stderr[-3000:]
    assert _trajectory(workdir, run_dir) == reference


def test_sigterm_saves_exits_0_and_resumes_exactly(workdir, tiny_pretrain, reference):
    run_dir = "runs/resume-sigterm"
    first = _train(workdir, tiny_pretrain, run_dir, fault="sigterm@pretrain:13")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stop requested (SIGTERM)" in first.stdout
    stage = workdir / run_dir / "pretrain"
    assert (stage / "checkpoints" / "latest").read_text().strip() == "iter_0000013"
    assert not (stage / "final").exists()  # not finished: no final checkpoint
    second = _train(workdir, tiny_pretrain, run_dir)
    assert second.returncode == 0 and "resumed from" in second.stdout
    assert _trajectory(workdir, run_dir) == reference


@pytest.mark.parametrize("fault, resumes_at", [("sigterm@pretrain:13", 13), ("kill_in_save@pretrain:20", 15)])
def test_async_saves_resume_exactly(workdir, tiny_pretrain, reference, fault, resumes_at):
    """checkpoint.async_save: files are written by a background process while training goes on; a save
    in flight is finished before a stop, and one interrupted before it is published is never loaded."""
    run_dir = f"runs/resume-async-{fault.split('@')[0]}"
    first = _train(workdir, tiny_pretrain, run_dir, "checkpoint.async_save=true", fault=fault)
    ckpts = workdir / run_dir / "pretrain" / "checkpoints"
    if fault.startswith("sigterm"):
        assert first.returncode == 0, first.stderr[-3000:]
    else:
        assert first.returncode == -signal.SIGKILL
        assert (ckpts / "iter_0000020.tmp").is_dir()  # written in the background, never published
    assert (ckpts / "latest").read_text().strip() == f"iter_{resumes_at:07d}"
    _assert_complete_checkpoints_verify(workdir, run_dir)
    second = _train(workdir, tiny_pretrain, run_dir, "checkpoint.async_save=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at step {resumes_at}" in second.stdout
    assert (ckpts / "latest").read_text().strip() == f"iter_{STEPS:07d}"  # the last save was finished before exit
    assert _trajectory(workdir, run_dir) == reference


def test_corrupted_newest_checkpoint_falls_back_to_the_one_before(workdir, tiny_pretrain, reference):
    run_dir = "runs/resume-corrupt"
    first = _train(workdir, tiny_pretrain, run_dir, fault="kill@pretrain:22")
    assert first.returncode == -signal.SIGKILL
    newest = workdir / run_dir / "pretrain" / "checkpoints" / "iter_0000020"
    victim = max((p for p in newest.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    second = _train(workdir, tiny_pretrain, run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoints/iter_0000020 is not usable" in second.stdout and victim.name in second.stdout
    assert "checksum mismatch" in second.stdout
    assert "resumed from" in second.stdout and "iter_0000015 at step 15" in second.stdout
    assert _trajectory(workdir, run_dir) == reference


def test_nan_step_is_skipped_and_counted(workdir, tiny_pretrain, reference):
    run_dir = "runs/nan-once"
    proc = _train(workdir, tiny_pretrain, run_dir, fault="nan@pretrain:7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "split" not in r]
    assert rows[6]["step"] == 7 and not rows[6]["update_ok"] and rows[6]["skipped_total"] == 1
    assert rows[5]["loss"] == reference[5][1]  # untouched before the fault
    assert all(r["update_ok"] for r in rows[7:]) and rows[-1]["skipped_total"] == 1
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # the skipped step did not poison the weights
    # A resume after a skipped step continues exactly too (Adam's step count is updates, not steps).
    killed = _train(workdir, tiny_pretrain, run_dir + "-killed", fault="nan@pretrain:7,kill@pretrain:12")
    assert killed.returncode == -signal.SIGKILL
    assert _train(workdir, tiny_pretrain, run_dir + "-killed").returncode == 0
    assert _trajectory(workdir, run_dir + "-killed") == _trajectory(workdir, run_dir)


def test_consecutive_nan_steps_stop_the_run(workdir, tiny_pretrain):
    run_dir = "runs/nan-many"
    proc = _train(workdir, tiny_pretrain, run_dir, "train.max_bad_steps=3",
                  fault="nan@pretrain:7,nan@pretrain:8,nan@pretrain:9")
    assert proc.returncode == 3
    assert "3 consecutive steps with a NaN/Inf loss or gradient" in proc.stderr and "Traceback" not in proc.stderr
    stage = workdir / run_dir / "pretrain"
    assert (stage / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
    assert not (stage / "final").exists()
    shutil.rmtree(workdir / run_dir)


def test_time_limit_saves_exits_0_and_resumes_exactly(workdir, tiny_pretrain, reference):
    run_dir = "runs/resume-time-limit"
    first = _train(workdir, tiny_pretrain, run_dir, "train.max_minutes=0.01")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train.max_minutes (0.01) reached" in first.stdout
    stage = workdir / run_dir / "pretrain"
    meta = json.loads((stage / "checkpoints" / (stage / "checkpoints" / "latest").read_text().strip() / "megaflow.json").read_text())
    assert 0 < meta["step"] < STEPS and not (stage / "final").exists()
    assert sum(meta["consumed_per_dataset"].values()) == meta["consumed_samples"] == meta["step"] * 16
    second = _train(workdir, tiny_pretrain, run_dir)
    assert second.returncode == 0 and "resumed from" in second.stdout
    assert _trajectory(workdir, run_dir) == reference
