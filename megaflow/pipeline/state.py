"""What a pipeline remembers between runs: run.dir/pipeline.json, the hashes that decide what runs again,
and the lock that keeps two runners off one run directory.

A stage's config hash covers its resolved config (references replaced by paths) and its process count,
but not the keys that cannot change its result (progress bars, logging, checkpoint cadence). An input's
hash is the recorded output hash of the stage that made it, else the hash of the file: its contents
(files up to 256 MiB), its size and modification time (larger ones), a checkpoint's manifest (its CRC-32s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from megaflow.errors import UserError

VERSION = 1
BIG_FILE = 256 << 20
# keys that change how a stage reports or saves, never what it computes
UNHASHED = {("run", "progress"), ("run", "log_every"), ("run", "tensorboard"), ("run", "wandb"),
            ("checkpoint", "every"), ("checkpoint", "keep"), ("checkpoint", "async_save")}


def config_of(cfg, nproc: int) -> dict:
    raw = cfg.model_dump(mode="json")
    for section, key in UNHASHED:
        raw.get(section, {}).pop(key, None)
    return raw | {"nproc_per_node": nproc}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_hash(path: Path, h) -> None:
    st = path.stat()
    if st.st_size > BIG_FILE:
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def path_hash(path: str | Path) -> str | None:
    """A content hash of a file, an indexed prefix (.bin + .idx), or a directory (its manifest.json when
    it has one); None when nothing is there."""
    path = Path(str(path).removeprefix("hf:"))
    h = hashlib.sha256()
    if path.is_file():
        _file_hash(path, h)
    elif path.is_dir():
        manifest = path / "manifest.json"
        files = [manifest] if manifest.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            h.update(str(p.relative_to(path)).encode())
            _file_hash(p, h)
    else:
        parts = [path.with_name(path.name + s) for s in (".bin", ".idx")]
        if not all(p.is_file() for p in parts):
            return None
        for p in parts:
            _file_hash(p, h)
    return h.hexdigest()[:16]


class State:
    """run.dir/pipeline.json: per stage its status, hashes, resolved config, timings and metrics."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "pipeline.json"
        self.data = {"version": VERSION, "stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                raise UserError(f"{self.path}: not valid JSON; move it away to start the pipeline over") from None
            if not isinstance(self.data.get("stages"), dict):
                raise UserError(f"{self.path}: no `stages` record; move it away to start the pipeline over")

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields) -> dict:
        record = self.data["stages"].setdefault(name, {})
        record.update(fields)
        self.save()
        return record

    def save(self) -> None:
        from megaflow import __version__

        self.data["megaflow"] = __version__
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


@contextlib.contextmanager
def lock(run_dir: Path):
    """Hold run.dir/pipeline.lock for the whole run. The kernel releases it when the holder dies (a
    killed or requeued job), so only a live runner keeps another out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "pipeline.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{run_dir}: another `megaflow run` is running this pipeline ({holder}); wait for it to "
                        "finish, or stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()
