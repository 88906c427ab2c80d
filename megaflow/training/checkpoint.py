"""Checkpoints on megatron dist_checkpointing (reshardable across TP / PP / DP).

Layout (DESIGN §2):
    STAGE/checkpoints/iter_NNNNNNN/   model, optimizer, scheduler, RNG, step, data position
    STAGE/checkpoints/latest          name of the newest complete checkpoint, replaced atomically
    STAGE/final/                      weights only + megaflow.json + tokenizer/

A training checkpoint is written into `iter_NNNNNNN.tmp`, renamed into place when every rank is done,
and only then named in `latest`; a directory without the rename is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from megaflow.errors import UserError
from megaflow.models import manifest, safe_pickle
from megaflow.models.weights import FORMAT, META_FILE, _barrier, _load_model_state, _rank, model_sharded_state_dict



def _rng_sharded_object(state=None):
    """This rank's RNG states (python, numpy, torch, megatron's tracker), one object per TP/PP rank."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if state is None:
        state = {
            "random": random.getstate(),
            "np": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state", state,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (pp, tp), replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_format(configured: str = "auto") -> str:
    """The distributed optimizer's checkpoint format (`checkpoint.optimizer_format`). `auto` is
    `fully_reshardable`: a canonical per-parameter state that loads into any TP/PP/DP layout (megatron's
    default, `fully_sharded_model_space`, fails to save on a GPU). `dp_reshardable`, each rank's own
    shard, saves without gathering but loads only into the same layout."""
    return "fully_reshardable" if configured == "auto" else configured


def _training_state_dict(model_chunks, optimizer, scheduler, extra: dict, is_loading: bool,
                         fmt: str | None = None, with_optimizer: bool = True) -> dict:
    model_sd = model_sharded_state_dict(model_chunks)
    state = dict(model_sd)
    if with_optimizer:  # not when loading into an optimizer that starts fresh (its empty state has no steps)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": fmt or optimizer_format()})
    state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["extra"] = extra
    return state


def read_latest(ckpt_root: Path) -> Path | None:
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    path = ckpt_root / latest.read_text().strip()
    return path if path.is_dir() else None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories that were renamed into place, newest first (`.tmp` ones never count)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]), reverse=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, model_chunks, optimizer, scheduler, extra: dict, meta: dict,
                    keep: int = 2, stage: str = "", async_queue=None, timings: dict | None = None) -> Path:
    """Save a complete training checkpoint and point `latest` at it; keep the newest `keep`.

    Written into `iter_N.tmp`; rank 0 then adds megaflow.json and the manifest (sizes, CRC-32), renames
    the directory into place and only then replaces `latest`. A crash at any point leaves either the
    previous state or the new complete checkpoint.

    With an `async_queue` (megatron's AsyncCallsQueue) the tensors are staged in host memory here and
    written by a background process while training goes on; the rename and `latest` happen when the
    queue finalizes the save (`finalize_saves`), so an unfinished save is never loaded.

    `timings`, when given, receives where the training loop's wait went: `state_dict_s` (building the
    sharded state dict; the distributed optimizer's `fully_reshardable` gather happens here), `save_s`
    (megatron's save call: the whole write, or validation and staging in host memory when asynchronous)
    and `schedule_s` (starting the background writer).
    """
    from megatron.core import dist_checkpointing

    from megaflow.training import faults

    name = f"iter_{step:07d}"
    final, tmp = ckpt_root / name, ckpt_root / f"{name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    state = _training_state_dict(model_chunks, optimizer, scheduler, {**extra, "step": step}, is_loading=False,
                                 fmt=meta.get("optimizer_format"))
    timings["state_dict_s"] = time.perf_counter() - t0

    def publish() -> None:
        if faults.armed("kill_in_save", stage, step):
            faults.kill_self()
        if _rank() == 0:
            _publish(tmp, final, ckpt_root, meta, keep)
        _barrier()

    t0 = time.perf_counter()
    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        timings["save_s"] = time.perf_counter() - t0
        publish()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True, async_strategy="mcore")
        request.finalize_fns.append(publish)  # after megatron's own (its .metadata file)
        timings["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        async_queue.schedule_async_request(request)
        timings["schedule_s"] = time.perf_counter() - t0
    return final


def finalize_saves(async_queue, blocking: bool = False) -> int:
    """Publish the asynchronous saves whose files are written (all of them when `blocking`); how many were
    published. Every rank must call this at the same points (megatron agrees on completion with a
    collective)."""
    if async_queue is not None and async_queue.get_num_unfinalized_calls():
        return len(async_queue.maybe_finalize_async_calls(blocking=blocking))
    return 0


def _publish(tmp: Path, final: Path, ckpt_root: Path, meta: dict, keep: int) -> None:
    """Rank 0, once every rank's files are written: metadata, manifest, rename, `latest`, pruning."""
    (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "kind": "training", **meta}, indent=2) + "\n")
    manifest.write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    manifest.fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / "latest", final.name + "\n")
    for old in complete_checkpoints(ckpt_root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def find_resumable(ckpt_root: Path, warn=print) -> Path | None:
    """The newest checkpoint whose manifest checks out, starting at `latest`; a corrupt one is skipped with
    a warning naming the bad file. Decided on rank 0 and shared, so every rank loads the same one."""
    choice = [None]
    if _rank() == 0:
        candidates = complete_checkpoints(ckpt_root)
        latest = read_latest(ckpt_root)
        if latest in candidates:  # `latest` first; older complete ones after it
            candidates = [latest] + [c for c in candidates if int(c.name[5:]) < int(latest.name[5:])]
        for ckpt in candidates:
            problem = manifest.verify(ckpt)
            if problem is None:
                choice[0] = str(ckpt)
                break
            warn(f"warning: checkpoint {ckpt} is not usable ({problem}); trying the one before")
        if candidates and choice[0] is None:
            choice[0] = ""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] == "":
        raise UserError(f"{ckpt_root}: no usable checkpoint (all failed verification); move them away to start over")
    return Path(choice[0]) if choice[0] else None


def load_checkpoint(ckpt_dir: Path, model_chunks, optimizer, scheduler, layout: dict, warn=print) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the `extra` dict (step, data position).

    Model weights reshard across any TP/PP/DP layout. RNG states are per (PP, TP) rank and restored only
    when those sizes are unchanged. The plain optimizer's state reshards with the model; the distributed
    optimizer's too when it was saved fully_reshardable, and a dp_reshardable one only into the same
    layout; otherwise the optimizer starts fresh (with a warning).
    """
    from megatron.core import dist_checkpointing

    meta = json.loads((ckpt_dir / META_FILE).read_text())
    saved, fmt = meta.get("parallel_at_save", {}), meta.get("optimizer_format", "fully_sharded_model_space")
    same_rng_layout = all(saved.get(k) == layout.get(k) for k in ("tp", "pp", "vpp"))
    same_optimizer_kind = bool(saved.get("distributed_optimizer")) == bool(layout.get("distributed_optimizer"))
    keep_optimizer = same_optimizer_kind and (
        not layout.get("distributed_optimizer") or saved == layout or fmt == "fully_reshardable")
    safe_pickle.install()
    if keep_optimizer:
        _init_empty_adam_state(optimizer)
    state = _training_state_dict(model_chunks, optimizer, scheduler, {}, is_loading=True, fmt=fmt,
                                 with_optimizer=keep_optimizer)
    if not same_rng_layout:
        del state["rng_state"]
        warn(f"warning: parallel layout changed ({_layout_str(saved)} -> {_layout_str(layout)}): RNG states not restored")
    if not keep_optimizer:
        warn("warning: the optimizer state was saved for another optimizer (plain vs distributed) or, in "
             f"{fmt}, for another layout: the optimizer starts fresh")
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    _load_model_state(model_chunks, loaded)
    if keep_optimizer:
        with torch.no_grad():  # fp32 main params are views of the model's own
            optimizer.load_state_dict(loaded["optimizer"])
        extra = loaded["extra"]  # optimizer updates so far: an RL iteration takes several (older checkpoints: one a step)
        _restore_adam_steps(optimizer, extra.get("updates", extra["step"] - extra.get("skipped_total", 0)))
    scheduler.load_state_dict(loaded["scheduler"])
    if same_rng_layout:
        _restore_rng(loaded["rng_state"])
    return loaded["extra"]


def _torch_adams(optimizer):
    """The torch Adam(W) instances inside a megatron optimizer (the CPU's fallback for fused Adam)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def _init_empty_adam_state(optimizer) -> None:
    """A fresh torch Adam has no state until its first step, and megatron's distributed optimizer reads
    that state to describe what it will load: give it zero moments and step 0 (then overwritten)."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))


def _restore_adam_steps(optimizer, updates: int) -> None:
    """Without apex/TE (the CPU), megatron's distributed optimizer runs torch's Adam and restores its
    `step` as 0, one tensor shared by every parameter, which torch then increments once per parameter:
    the bias correction of every resumed step would be wrong. Each parameter gets its own count of the
    updates applied so far (steps minus the skipped non-finite ones)."""
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(float(updates))


def _layout_str(layout: dict) -> str:
    return " ".join(f"{k}={layout.get(k)}" for k in ("tp", "pp", "vpp", "dp", "distributed_optimizer"))
