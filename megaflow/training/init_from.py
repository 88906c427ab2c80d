"""`init_from`: where a stage's starting weights come from.

    init_from: runs/x/pretrain/final       a megaflow checkpoint (final/ or a training checkpoint)
    init_from: hf:/models/Llama-3.2-1B     a Hugging Face model directory

An HF directory is converted on first use (`megaflow convert hf-to-megaflow`, in a subprocess: megatron's
parallel state is per process) into a cache keyed by a fingerprint of its files, and reused while the
files are unchanged. The cache is `$MEGAFLOW_CACHE/hf/` (default `~/.cache/megaflow/hf/`); in a
multi-node run it must be on a file system every node sees. Rank 0 converts; the other ranks wait for
the finished (renamed-into-place) checkpoint or for rank 0's failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from megaflow.errors import RunFailed, UserError
from megaflow.models import manifest

HF_PREFIX = "hf:"
_SMALL = 64 << 20  # files up to this size are hashed whole
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def is_hf(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(HF_PREFIX)


def cache_home() -> Path:
    """megaflow's cache: MEGAFLOW_CACHE, else ~/.cache/megaflow."""
    return Path(os.environ.get("MEGAFLOW_CACHE", "~/.cache/megaflow")).expanduser()


def cache_root() -> Path:
    """Where converted HF models are kept."""
    return cache_home() / "hf"


def check_spec(spec: str, model=None, key: str = "init_from", language_model: bool = True) -> None:
    """Fail fast (before megatron is imported) on an init_from that cannot work: one line naming `key`. With
    the stage's `model`, also when its shape is not the checkpoint's; a stage that trains a language model
    (`language_model`) cannot start from a reward model, whose scalar head has no vocabulary."""
    theirs = model_of(spec, key, language_model)
    if model is not None and theirs is not None:
        _check_same_model(spec, model, theirs)


def model_of(spec: str, key: str = "init_from", language_model: bool = False):
    """The ModelConfig of an initial checkpoint (a megaflow final checkpoint or hf:DIR), None for an older
    or foreign megaflow.json; a checkpoint that cannot be a start is a UserError naming `key`."""
    from megaflow.config.schema import ModelConfig
    from megaflow.convert.hf_config import model_config_from_hf, read_hf_config

    if is_hf(spec):
        from megaflow.convert.safetensors_io import ShardedReader

        path = Path(spec[len(HF_PREFIX):])
        try:
            theirs, _ = model_config_from_hf(read_hf_config(path), str(path / "config.json"))
            ShardedReader(path)
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
        return theirs
    meta_file = Path(spec) / "megaflow.json"
    if not meta_file.is_file():
        raise UserError(f"{key}: not a megaflow checkpoint (no megaflow.json) nor hf:PATH: {spec}")
    try:
        manifest.require_intact(spec)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    try:
        meta = json.loads(meta_file.read_text())
        theirs = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError):
        return None  # an older or foreign megaflow.json: the load itself will tell
    if language_model and meta.get("head", "lm") != "lm":
        raise UserError(f"{key}: {spec} is a reward model (a scalar head, no vocabulary); this stage trains a "
                        "language model: start from a pretrained or SFT checkpoint")
    return theirs


def _check_same_model(spec: str, ours, theirs, log=None) -> None:
    """Different weight shapes fail (one line naming every field); other differences (RoPE base or
    scaling, norm epsilon, GELU variant: a deliberate change such as context extension) are announced."""
    from megaflow.convert.hf_config import model_differences

    diffs = model_differences(ours, theirs, scope="shapes")
    if diffs:
        raise UserError(f"init_from {spec}: the stage's model differs from the checkpoint's (stage vs checkpoint): "
                        f"{'; '.join('model.' + d for d in diffs)}")
    if log is not None:
        others = [d for d in model_differences(ours, theirs) if not d.startswith(("vocab_size:", "max_position_embeddings:"))]
        if others:
            log(f"init_from {spec}: note: the stage changes the model (stage vs checkpoint): "
                f"{'; '.join('model.' + d for d in others)}")


def _file_digest(path: Path) -> str:
    """Whole-content SHA-256 for small files; for large ones the hub's own content hash when the file is
    a link into a Hugging Face cache (blobs are named by their SHA-256), else size, mtime and the SHA-256
    of the first and last MiB."""
    stat = path.stat()
    if stat.st_size <= _SMALL:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    target = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", target):
        return target
    h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def fingerprint(hf_dir: Path) -> str:
    """A key for the files of an HF directory (names and digests; subdirectories are not part of a model)."""
    h = hashlib.sha256()
    for path in sorted(p for p in hf_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.name}\0{_file_digest(path)}\n".encode())
    return h.hexdigest()[:24]


def _complete(ckpt: Path) -> bool:
    return (ckpt / "megaflow.json").is_file() and (ckpt / "manifest.json").is_file()


def _launch_id() -> str:
    env = os.environ
    return ":".join(env.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
                                             "SLURM_STEP_ID"))


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(hf_dir: Path, target: Path, status: Path, log) -> None:
    """Rank 0: convert in a subprocess (one process, its own megatron state) unless another run did."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.with_name(target.name + ".lock")):
        if _complete(target):
            return
        log(f"init_from: converting {hf_dir} -> {target} (once; cached while its files are unchanged)")
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        cmd = [sys.executable, "-m", "megaflow", "convert", "hf-to-megaflow", "--hf", str(hf_dir), "--out", str(target),
               "--overwrite"]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if ln.startswith("megaflow: error:")), lines[-1] if lines else "")
            message = f"init_from: converting {hf_dir} failed: {reason.removeprefix('megaflow: error: ')}"
            status.write_text(json.dumps({"launch": _launch_id(), "error": message}))
            raise UserError(message)
        for line in proc.stdout.splitlines():
            if line.startswith("note:"):
                log(f"init_from: {line}")


def _wait(target: Path, status: Path, timeout_s: float) -> None:
    """Ranks other than 0: wait for rank 0's conversion (the renamed-into-place checkpoint) or its failure."""
    start = time.time()
    while not _complete(target):
        if status.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                info = json.loads(status.read_text())
                if info.get("launch") == _launch_id():
                    raise UserError(info["error"])
        if time.time() - start > timeout_s:
            raise RunFailed(f"init_from: waited {timeout_s / 60:.0f} min for rank 0 to convert into {target}")
        time.sleep(2.0)


def resolve_init_from(spec: str, log=print, timeout_s: float = 6 * 3600) -> Path:
    """The local megaflow checkpoint for `spec`: the path itself, or the (cached) conversion of hf:PATH."""
    if not is_hf(spec):
        return Path(spec)
    from megaflow.runtime.distributed import read_env

    hf_dir = Path(spec[len(HF_PREFIX):]).resolve()
    target = cache_root() / fingerprint(hf_dir)
    if _complete(target):
        return target
    status = target.with_name(target.name + ".status")
    if read_env().rank == 0:
        _convert(hf_dir, target, status, log)
    else:
        _wait(target, status, timeout_s)
    return target


def adopt(cfg, init_dir: Path, tokenizer_vocab: int, log=print) -> int:
    """Check that the stage's model is the checkpoint's (one line naming every differing field) and take
    the checkpoint's vocabulary (an HF embedding may have more rows than its tokenizer has tokens).
    Returns the padded vocabulary size to build the model with."""
    from megaflow.config.schema import ModelConfig
    from megaflow.models.weights import read_meta

    meta = read_meta(init_dir)
    theirs = ModelConfig(**meta["model"])
    _check_same_model(cfg.init_from, cfg.model, theirs, log)
    padded = int(meta["padded_vocab_size"])
    if tokenizer_vocab > theirs.vocab_size:
        raise UserError(f"init_from {cfg.init_from}: the tokenizer has {tokenizer_vocab} tokens but the checkpoint's "
                        f"embedding only {theirs.vocab_size} rows")
    if padded % cfg.parallel.tp:
        raise UserError(f"init_from {cfg.init_from}: the checkpoint's padded vocabulary ({padded}) is not divisible "
                        f"by parallel.tp ({cfg.parallel.tp})")
    cfg.model.vocab_size = theirs.vocab_size
    return padded
