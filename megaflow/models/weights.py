"""The weights-only final checkpoint (STAGE/final/, DESIGN §2), what every later stage, inference,
evaluation and conversion reads:

    final/weights/       the model's tensors, megatron dist_checkpointing (loads into any TP/PP layout)
    final/megaflow.json  format, stage, model config, vocabulary, tokenizer, parents, resolved config
    final/tokenizer/     the tokenizer it was trained with
    final/manifest.json  size and CRC-32 of every file (megaflow.models.manifest), written last

Training checkpoints (optimizer, scheduler, RNG, data position) are megaflow.training.checkpoint's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megaflow.errors import UserError
from megaflow.models import manifest, safe_pickle
from megaflow.models.gpt import unwrap
from megaflow.runtime.launch import die_with_parent

FORMAT = "megaflow/1"
META_FILE = "megaflow.json"
EXTRA_STATE = "._extra_state"


def prepare_saves(async_save: bool = False) -> None:
    """dist_checkpointing's writer reports its results through a queue. Saved in this process (a
    synchronous save), a thread queue is enough; megatron would otherwise spawn a manager process for it,
    whose start-up (it imports torch) stalls the first save of every process by seconds. An asynchronous
    save writes from another process: then a manager, started here and tied to this process's life, so
    that a killed run leaves no orphan holding pipes."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = getattr(filesystem_async, "_results_queue", None)
    if current is not None and (not async_save or not isinstance(current, queue.Queue)):
        return
    if not async_save:
        filesystem_async._results_queue = queue.Queue()
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    prepare_saves.manager = manager  # keep it alive as long as the process


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(model_chunks, weights_only: bool = False) -> dict:
    """The model's sharded state dict, keyed `model` (or `model0`, `model1`, ... with virtual pipeline
    stages). `weights_only` drops the layers' `_extra_state` (Transformer Engine's FP8 scaling history):
    a final checkpoint holds tensors only, and TE refuses to unpickle that state on load."""
    chunks = [unwrap(c) for c in model_chunks]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    state = {}
    for key, chunk in zip(keys, chunks):
        sd = chunk.sharded_state_dict()
        state[key] = {k: v for k, v in sd.items() if not (weights_only and k.endswith(EXTRA_STATE))}
    return state


def _load_model_state(model_chunks, loaded: dict, skipped_prefix: str | None = None) -> None:
    """Load into every chunk; only `_extra_state` entries (weights-only checkpoints) and names under
    `skipped_prefix` (not requested) may be absent."""
    chunks = [unwrap(c) for c in model_chunks]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith(EXTRA_STATE)
                   and not (skipped_prefix and k.startswith(skipped_prefix))]
        if missing or unexpected:
            raise UserError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def save_final(final_dir: Path, model_chunks, meta: dict, tokenizer=None) -> Path:
    """Weights-only checkpoint plus megaflow.json (model config, tokenizer, parents) and the tokenizer."""
    from megatron.core import dist_checkpointing

    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    _barrier()
    prepare_saves()  # a synchronous save
    dist_checkpointing.save(model_sharded_state_dict(model_chunks, weights_only=True), str(tmp / "weights"))
    _barrier()
    if _rank() == 0:
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer"))
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "kind": "final", **meta}, indent=2) + "\n")
        manifest.write_manifest(tmp)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    _barrier()
    return final_dir


def read_meta(ckpt: str | Path) -> dict:
    """megaflow.json of a final checkpoint (or of the final/ dir next to a training checkpoint)."""
    path = Path(ckpt)
    meta = path / META_FILE
    if not meta.is_file():
        raise UserError(f"{path}: not a megaflow checkpoint (no {META_FILE})")
    try:
        loaded = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{meta}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{meta}: expected a JSON object")
    return loaded


def stored_config(ckpt: str | Path, meta: dict | None = None):
    """The resolved config a checkpoint was trained with (megaflow.json's `config`), validated by the
    schema like any other config, so every reader sees its defaults and choices the same way."""
    from megaflow.config.loader import ConfigError, validate

    meta = read_meta(ckpt) if meta is None else meta
    raw = dict(meta.get("config") or {})
    raw.setdefault("model", meta.get("model", {}))
    try:
        return validate(raw)
    except ConfigError as e:
        raise UserError(f"{ckpt}: its stored config (megaflow.json) does not validate: {e}") from None


OUTPUT_LAYER = "output_layer."


def load_weights(ckpt: str | Path, model_chunks, skip_output_layer: bool = False) -> None:
    """Load the weights of a final checkpoint (any TP/PP layout) into freshly built model chunks.
    `skip_output_layer` keeps the model's own output layer: a reward model starting from a language
    model's weights keeps its freshly initialised scalar head."""
    import pickle

    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(ckpt)
    manifest.require_intact(path)
    safe_pickle.install()
    weights = path / "weights" if (path / "weights").is_dir() else path
    wanted = model_sharded_state_dict(model_chunks, weights_only=True)
    if skip_output_layer:
        wanted = {key: {k: v for k, v in sd.items() if not k.startswith(OUTPUT_LAYER)} for key, sd in wanted.items()}
    try:
        loaded = dist_checkpointing.load(wanted, str(weights))
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, CheckpointException) as e:
        # past the manifest (sizes only, or a checkpoint damaged before its manifest was written)
        reason = next((line for line in str(e).splitlines() if "Error" in line), str(e).splitlines()[0])
        raise UserError(f"{weights}: cannot read the weights ({reason.strip()[:300]}); the checkpoint may be "
                        f"damaged: `megaflow inspect {path}` checks it") from None
    _load_model_state(model_chunks, loaded, OUTPUT_LAYER if skip_output_layer else None)
