"""Metrics: one JSON object per logged step in metrics.jsonl, TensorBoard scalars, and the peak FLOP/s
that MFU is measured against."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch

# Dense BF16 tensor-core peak of an H100/H200 SXM (the MFU convention of Megatron-LM and torchtitan).
HOPPER_BF16_PEAK = 989e12


@functools.cache
def peak_flops(dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s that MFU is relative to: 989 TFLOP/s on an H100/H200, else a measured matmul peak."""
    from megaflow.runtime import cpu

    if torch.cuda.is_available() and not cpu.is_enabled():
        name = torch.cuda.get_device_name()
        if "H100" in name or "H200" in name or "GH200" in name:
            return HOPPER_BF16_PEAK
        return measured_matmul_flops(dtype)
    return _cpu_peak(dtype)


def _cpu_peak(dtype: torch.dtype) -> float:
    """The CPU's measured matmul peak, kept per machine, thread count and dtype in the megaflow cache (a
    second of every training process's start otherwise). A measurement taken while other processes ran
    is low (MFU above 100% follows), so each entry keeps the 1-minute load average it was measured at and
    is measured again, keeping the higher value, when the machine is quieter than it was then."""
    import json
    import platform

    from megaflow.training.init_from import cache_home

    key = f"{platform.machine()}|{_cpu_model()}|{torch.get_num_threads()} threads|{dtype}|torch {torch.__version__}"
    path = cache_home() / "cpu-peak-flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    load = os.getloadavg()[0]
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and load > entry.get("load", 0) - 0.5:
        return float(entry["flops"])
    flops = measured_matmul_flops(dtype)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)):
        flops, load = max(flops, float(entry["flops"])), min(load, float(entry.get("load", load)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known | {key: {"flops": flops, "load": load}}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return flops


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N FLOP/s of an n x n x n matmul on the current device."""
    from megaflow.runtime import cpu

    on_gpu = torch.cuda.is_available() and not cpu.is_enabled()
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        n = 8192
        dtype = torch.bfloat16
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def open_wandb(wandb_cfg, run_name: str, stage: str, stage_dir: Path, config: dict | None = None):
    """The W&B run of one stage (`run.wandb`), or None when it is not set. Its id is kept in the stage
    directory, so a resumed stage logs on into the same W&B run and a stage run again from scratch (its
    directory cleared) starts a new one. W&B's files go under the stage directory."""
    if wandb_cfg is None:
        return None
    import uuid

    import wandb

    id_file = stage_dir / "wandb-id"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not id_file.is_file():
        id_file.write_text(f"{stage}-{uuid.uuid4().hex[:12]}\n")
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group or run_name,
                      name=stage, job_type=stage, tags=wandb_cfg.tags, id=id_file.read_text().strip(),
                      resume="allow", mode=wandb_cfg.mode, dir=str(stage_dir), config=config,
                      settings=wandb.Settings(console="off", silent=True))


class MetricsWriter:
    """Appends metrics to `metrics.jsonl`, TensorBoard and W&B (a run from open_wandb); a no-op on ranks
    other than 0."""

    def __init__(self, stage_dir: Path | None, tensorboard: bool = True, wandb_run=None):
        self.enabled = stage_dir is not None
        self._jsonl = None
        self._tb = None
        self._wandb = wandb_run
        if not self.enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(stage_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(stage_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **({"split": prefix} if prefix != "train" else {}), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop the records of steps after the checkpoint: they are about to be redone, and
        metrics.jsonl stays one trajectory."""
        if not self.enabled:
            return
        path = Path(self._jsonl.name)
        self._jsonl.close()
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._jsonl = open(path, "a", buffering=1)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
