"""Helpers shared by tools/bench_pretrain.py and tools/mcore_baseline.py: benchmark shapes, the fixed token
batch, step timing, environment facts, medians and the table. Nothing here imports megaflow (the bare
megatron-core baseline may share only megaflow.runtime.cpu with the package), and torch is imported
lazily, so a parent process that only plans and collects never touches a GPU.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
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
