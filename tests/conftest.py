"""Shared fixtures. Runs happen in a temporary directory; the repository's sample corpus is read from
REPO; CPU tests never need CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"


def run_megaflow(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, nproc: int | None = None):
    """Run the CLI in a subprocess (the way users do); returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "megaflow", *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)
