"""A checkpoint's manifest: every file with its size and CRC-32, written last, checked before loading.

A directory renamed into place is complete as far as the writer knew; the manifest also catches what
happens afterwards (a truncated copy, a flipped byte, a file deleted by hand) and names the file.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from megaflow.errors import UserError

MANIFEST = "manifest.json"
_CHUNK = 1 << 24


def crc32(path: Path, fsync: bool = False) -> int:
    """CRC-32 of a file; with `fsync`, also make its contents durable before the manifest vouches for it."""
    value = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            value = zlib.crc32(block, value)
        if fsync:
            os.fsync(f.fileno())
    return value


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> dict:
    """Record size and CRC-32 of every file under `root`, then fsync so the record survives a crash."""
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "crc32": crc32(p, fsync=True)} for p in _files(root)}
    manifest = {"files": files, "total_bytes": sum(f["size"] for f in files.values())}
    path = root / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify(root: Path, checksums: bool = True) -> str | None:
    """None if every file the manifest names is there with its size (and checksum); else what is wrong."""
    path = root / MANIFEST
    if not path.is_file():
        return f"{root.name}: no {MANIFEST} (not a complete checkpoint)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError):
        return f"{path}: unreadable manifest"
    for rel, expected in files.items():
        f = root / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != expected["size"]:
            return f"{f}: {size} bytes, expected {expected['size']} (truncated or replaced)"
        if checksums and crc32(f) != expected["crc32"]:
            return f"{f}: checksum mismatch (corrupted)"
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_CHECKSUMS = "MEGAFLOW_NO_CHECKSUMS"  # set to 1 (or pass --no-checksums) to check sizes only
_verified: set[tuple[str, bool]] = set()


def require_intact(ckpt: str | Path) -> None:
    """Refuse a damaged checkpoint before loading it, in one line naming the file: every file its manifest
    lists must be there with its size and (unless MEGAFLOW_NO_CHECKSUMS=1) its CRC-32. The checksums are
    read by the first process of each node only (the others check sizes), and once per process."""
    path = Path(ckpt)
    first_on_node = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
    checksums = first_on_node and os.environ.get(NO_CHECKSUMS, "0") in ("", "0")
    key = (str(path.resolve()), checksums)
    if key in _verified:
        return
    problem = verify(path, checksums=checksums)
    if problem is not None:
        raise UserError(f"damaged checkpoint: {problem}; `megaflow inspect {path}` shows its state")
    _verified.add(key)
