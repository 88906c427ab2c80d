"""Checkpoint stall: how long training waits for a synchronous save vs an asynchronous one.

Runs `megaflow train pretrain` with `checkpoint.async_save=false` and `=true` (interleaved repeats) on
the same config and reads the `checkpoint` records of metrics.jsonl: `stall_s` is the time the training
loop spent inside the save call (the whole write when synchronous; building the state dict, staging the
tensors in host memory and starting the writer process when asynchronous), and `publish_s` the time an
asynchronous save's finalization (manifest checksums, rename, `latest`) took at a later step boundary.
The first save of a process pays one-time setup and is reported apart. It also reports the step time of
the step after each save, where a background writer competes with training, against the median step time.

    python tools/bench_checkpoint.py                                   # CPU: the test config, 60 steps
    python tools/bench_checkpoint.py --config configs/stages/pretrain-1b.yaml --steps 60 --every 20 \\
        parallel.distributed_optimizer=true precision=bf16              # GPU: the 1B shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(config: str, steps: int, every: int, async_save: bool, overrides: list[str], run_dir: Path,
          resume: bool = False) -> list[dict]:
    """One `megaflow train pretrain` run; its metrics.jsonl records."""
    cmd = [sys.executable, "-m", "megaflow", "train", "pretrain", "--config", config, f"train.steps={steps}",
           f"checkpoint.every={every}", "checkpoint.keep=2", f"checkpoint.async_save={str(async_save).lower()}",
           "eval.every=0", "eval.final=false", f"checkpoint.resume={str(resume).lower()}", "run.progress=false",
           f"run.dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_checkpoint: run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def resume_check(config: str, steps: int, every: int, overrides: list[str], run_dir: Path) -> dict:
    """Drops the async run's last checkpoint, resumes from the one before (written asynchronously too) and
    compares the resumed losses with the uninterrupted run's."""
    original = losses([json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()])
    ckpts = run_dir / "pretrain" / "checkpoints"
    last, before = f"iter_{steps:07d}", f"iter_{steps - every:07d}"
    shutil.rmtree(ckpts / last)
    (ckpts / "latest").write_text(before + "\n")
    resumed = losses(train(config, steps, every, True, overrides, run_dir, resume=True))
    compared = range(steps - every + 1, steps + 1)
    diff = max(abs(resumed[s] - original[s]) for s in compared)
    print(f"resumed from the async {before}: steps {compared.start}-{compared.stop - 1} max |loss diff| {diff:.3g}"
          f" ({'bitwise' if diff == 0 else 'NOT bitwise'})")
    return {"from": before, "max_abs_loss_diff": diff, "original": [original[s] for s in compared],
            "resumed": [resumed[s] for s in compared]}


def run_once(config: str, steps: int, every: int, async_save: bool, overrides: list[str], work: Path,
             keep: bool) -> dict:
    run_dir = work / f"run-{'async' if async_save else 'sync'}"
    rows = train(config, steps, every, async_save, overrides, run_dir)
    if not keep:  # a 1B shape's checkpoints are tens of GB
        shutil.rmtree(run_dir)
    train_steps = {r["step"]: r["step_time"] for r in rows if "split" not in r}
    saves = [r for r in rows if r.get("split") == "checkpoint" and "stall_s" in r]
    publishes = [r["publish_s"] for r in rows if r.get("split") == "checkpoint" and "publish_s" in r]
    after = [train_steps[r["step"] + 1] for r in saves if r["step"] + 1 in train_steps]
    later = saves[1:] or saves  # the first save of a process also pays one-time setup (see first_stall_s)
    parts = {k: _median([r.get(k) for r in later]) for k in ("state_dict_s", "save_s", "schedule_s")}
    return {"stall_s": statistics.median(r["stall_s"] for r in later), "first_stall_s": saves[0]["stall_s"], **parts,
            "saves": len(saves), "stall_each_s": [r["stall_s"] for r in saves],
            "publish_s": statistics.median(publishes) if publishes else None,
            "step_s": statistics.median(train_steps.values()), "step_after_save_s": statistics.median(after) if after else None}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, width: int) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "stages" / "pretrain-test.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="sync,async", help="which saves to measure (comma-separated: sync, async)")
    ap.add_argument("--resume-check", action="store_true",
                    help="afterwards, resume the async run from its second-to-last checkpoint and compare losses")
    ap.add_argument("--out", default=None, help="JSON results (default: bench-results/bench_checkpoint.json)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_args()
    modes = [m for m in ("sync", "async") if m in a.modes.split(",")]
    if not modes or (a.resume_check and "async" not in modes):
        sys.exit("bench_checkpoint: --modes must name sync and/or async (async with --resume-check)")
    results = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(a.repeats):
            for mode in modes:
                keep = a.resume_check and mode == "async" and repeat == a.repeats - 1
                results[mode].append(run_once(a.config, a.steps, a.every, mode == "async", a.overrides, Path(tmp), keep))
        if a.resume_check:
            results["resume"] = resume_check(a.config, a.steps, a.every, a.overrides, Path(tmp) / "run-async")
    resume = results.pop("resume", None)
    scalars = ("first_stall_s", "stall_s", "state_dict_s", "save_s", "schedule_s", "publish_s", "step_s",
               "step_after_save_s")
    table = {mode: {k: _median([r[k] for r in runs]) for k in scalars} for mode, runs in results.items()}
    print(f"{'mode':6} {'first save (s)':>15} {'later saves (s)':>16} {'of which: state dict':>21} {'save call':>10} "
          f"{'schedule':>9} {'publish (s)':>12} {'median step (s)':>16} {'step after a save (s)':>22}")
    for mode, m in table.items():
        print(f"{mode:6} {_fmt(m['first_stall_s'], 15)} {_fmt(m['stall_s'], 16)} {_fmt(m['state_dict_s'], 21)} "
              f"{_fmt(m['save_s'], 10)} {_fmt(m['schedule_s'], 9)} {_fmt(m['publish_s'], 12)} {_fmt(m['step_s'], 16)} "
              f"{_fmt(m['step_after_save_s'], 22)}")
    if len(table) == 2:
        print(f"async / sync stall: {table['async']['stall_s'] / table['sync']['stall_s']:.2f}")
    out = Path(a.out or os.environ.get("OUT", "bench-results")) / "bench_checkpoint.json" if not a.out else Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "median": table, "runs": results, "resume": resume}, indent=1) + "\n")


if __name__ == "__main__":
    main()
