"""Helpers shared by the benchmarks in tools/: benchmark shapes, the fixed token batch, step timing (also
of a megaflow Trainer and of a transformers/TRL Trainer in their own loops), the worker's result, the
common command-line flags, environment facts, medians and the table. Nothing here imports megaflow (the
bare megatron-core baseline may share only megaflow.runtime.cpu with the package), and torch is imported
lazily, so a parent process that only plans and collects never touches a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "configs" / "models"

# Benchmark shapes: a model preset in configs/models plus model.* overrides.
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("tiny", {}),
    "small": ("tiny", {"hidden_size": 256, "ffn_hidden_size": 768}),
    "1b": ("bench-1b", {}),
}

# The prefix of the one line a worker prints with its result (megatron prints its own lines too).
RESULT_PREFIX = "@@BENCH_RESULT@@ "


def read_shape(name: str) -> dict:
    """The `model:` section of a shape's preset YAML with the shape's overrides applied (plain dict)."""
    preset, overrides = SHAPES[name]
    model = dict(yaml.safe_load((MODELS_DIR / f"{preset}.yaml").read_text())["model"])
    model.update(overrides)
    return model


def pad_vocab(vocab_size: int, divisible_by: int = 128) -> int:
    return -(-vocab_size // divisible_by) * divisible_by


def make_tokens(vocab_size: int, num_microbatches: int, micro_batch: int, seq: int, seed: int = 4321):
    """One fixed [num_microbatches, micro_batch, seq + 1] int64 token tensor (CPU, generated once): every
    implementation sees tokens = x[..., :-1] and labels = x[..., 1:]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_microbatches, micro_batch, seq + 1), generator=gen, dtype=torch.long)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step_fn, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run `warmup` untimed steps, then `steps` timed ones (device synchronised around each). `step_fn()`
    returns the step's loss as a float. Returns (seconds per timed step, loss of every step)."""
    losses = []
    for _ in range(warmup):
        losses.append(float(step_fn()))
    synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step_fn()
        synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


def clock_train_step(trainer, ends: list[float], losses: list[float]) -> None:
    """Record, from inside megaflow's own loop (Trainer.train), when every step ends (device synchronised)
    and its loss: a step is timed from the end of the one before."""
    step = trainer.train_step

    def timed_step(iterators):
        metrics = step(iterators)
        synchronize()
        ends.append(time.perf_counter())
        losses.append(metrics["loss"])
        return metrics

    trainer.train_step = timed_step


def clock_hf_trainer(trainer, ends: list[float], losses: list[float], stats: list[dict], batch_stats) -> None:
    """The same for a transformers Trainer (TRL's included) in its own loop: `batch_stats(batch)` of every
    collated micro-batch into `stats`, every training micro-batch's loss into `losses`, the end of every
    optimizer step into `ends`."""
    from transformers import TrainerCallback

    collate, compute_loss = trainer.data_collator, trainer.compute_loss

    def counted(examples):
        batch = collate(examples)
        stats.append(batch_stats(batch))
        return batch

    def loss_recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        if trainer.model.training:
            losses.append(float(loss.detach()))
        return loss

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            synchronize()
            ends.append(time.perf_counter())

    trainer.data_collator, trainer.compute_loss = counted, loss_recorded
    trainer.add_callback(Clock())


def finish_worker(out: dict, warmup: int) -> dict:
    """A worker's result: step times after `warmup` steps from its step ends, its stats and losses cut to
    the steps that ended, the environment and the load it ran under."""
    ends = out.pop("ends")
    out["times"] = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    out["stats"], out["losses"] = out["stats"][:len(ends)], out["losses"][:len(ends)]
    out["env"] = env_info() | {"trl": package_version("trl")}
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags every side-by-side benchmark has: rounds and steps, limits, output, device, plan only."""
    for flag in ("--repeats", "--steps", "--warmup"):
        p.add_argument(flag, type=int)
    p.add_argument("--max-minutes", type=float, help="start no new round past this (default 8 on GPU)")
    p.add_argument("--worker-timeout", type=float)
    p.add_argument("--out")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def resolve_run_flags(a: argparse.Namespace, defaults: dict[str, dict], name: str) -> None:
    """The device (auto: a GPU if torch sees one), every unset flag from that device's `defaults`, the
    precision (bf16 on GPU, fp32 on CPU) and the JSON path (bench-results/NAME.json, or $OUT/NAME.json
    when $OUT is a folder)."""
    import torch

    a.device = ("gpu" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    for k, v in defaults[a.device].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    a.precision = "bf16" if a.device == "gpu" else "fp32"
    if a.out is None:
        o = os.environ.get("OUT")
        a.out = str(Path(o) / f"{name}.json") if o and Path(o).is_dir() else f"bench-results/{name}.json"


def result_paths(out: str | None, name: str) -> tuple[Path, Path]:
    """(JSON file, folder for the workers' logs) of a benchmark: --out, else $OUT/NAME.json when $OUT is a
    folder, else bench-results/NAME.json (resolve_run_flags' rule, for tools without its other flags)."""
    if out is None:
        o = os.environ.get("OUT")
        out = str(Path(o) / f"{name}.json") if o and Path(o).is_dir() else str(REPO_ROOT / "bench-results" / f"{name}.json")
    path = Path(out) if Path(out).suffix == ".json" else Path(out) / f"{name}.json"
    logs = path.parent / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    return path, logs


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info() -> dict:
    """Versions and the device, read without importing megatron or Transformer Engine."""
    import torch

    te = None
    for dist_name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        te = te or package_version(dist_name)
    gpu = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": package_version("megatron-core") or package_version("megatron_core"),
        "transformers": package_version("transformers"),
        "transformer_engine": te,
        "device": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()) + " CPU",
        "cuda": torch.version.cuda if gpu else None,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit_result(payload: dict) -> None:
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-style markdown table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = [i > 0 for i in range(len(headers))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}{unit}"
    return f"{x:.1f}{unit}"
