"""`megaflow inspect CKPT`: what a checkpoint holds and whether it is complete, without building a model.

Reads megaflow.json, the manifest (sizes, CRC-32) and the distributed checkpoint's metadata through the
restricted unpickler; never loads a tensor.
"""

from __future__ import annotations

from pathlib import Path

from megaflow.errors import UserError
from megaflow.models import manifest
from megaflow.models.weights import META_FILE, read_meta
from megaflow.training.checkpoint import read_latest


def resolve(path: str | Path) -> Path:
    """A checkpoint directory itself, or a stage directory / checkpoints/ folder (its final/, else latest)."""
    p = Path(path)
    if (p / META_FILE).is_file() or (p / manifest.MANIFEST).is_file():
        return p
    for candidate in (p / "final", read_latest(p), read_latest(p / "checkpoints")):
        if candidate is not None and (candidate / META_FILE).is_file():
            return candidate
    raise UserError(f"{path}: not a megaflow checkpoint (no {META_FILE}, no checkpoints/latest)")


def _tensor_summary(weights_dir: Path) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megaflow.models.safe_pickle import load_metadata

    if not (weights_dir / ".metadata").is_file():
        return {}
    meta = load_metadata(weights_dir)
    tensors = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    model = {k: v for k, v in tensors.items() if k.startswith(("model", "decoder", "embedding", "output_layer"))}
    return {"tensors": len(tensors), "model_parameters": sum(v.size.numel() for v in model.values())}


def inspect_checkpoint(path: str | Path, verify_checksums: bool = True) -> dict:
    ckpt = resolve(path)
    problem = manifest.verify(ckpt, checksums=verify_checksums)
    try:
        meta = read_meta(ckpt) if (ckpt / META_FILE).is_file() else {}
    except UserError as e:  # reported as what makes the checkpoint incomplete
        meta, problem = {}, problem or str(e)
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    weights_dir = ckpt / "weights" if (ckpt / "weights").is_dir() else ckpt
    model = meta.get("model", {})
    return {
        "path": str(ckpt),
        "kind": meta.get("kind", "unknown"),
        "complete": problem is None,
        "problem": problem,
        "stage": meta.get("stage"),
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "model": model,
        "padded_vocab_size": meta.get("padded_vocab_size"),
        "tokenizer": str(ckpt / meta["tokenizer"]) if meta.get("tokenizer") and (ckpt / meta["tokenizer"]).exists()
        else meta.get("config", {}).get("tokenizer", {}).get("path"),
        "parallel_at_save": meta.get("parallel_at_save"),
        "precision": meta.get("precision"),
        "parents": meta.get("parents", []),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        **_tensor_summary(weights_dir),
    }


def format_report(info: dict) -> str:
    m = info["model"] or {}
    shape = (f"{m.get('family')} h{m.get('hidden_size')} L{m.get('num_layers')} heads {m.get('num_attention_heads')}/"
             f"{m.get('num_query_groups') or m.get('num_attention_heads')} ffn {m.get('ffn_hidden_size')} "
             f"vocab {info.get('padded_vocab_size')}") if m else "unknown"
    layout = info["parallel_at_save"] or {}
    lines = [
        f"checkpoint   {info['path']} ({info['kind']})",
        f"complete     {'yes' if info['complete'] else 'NO: ' + str(info['problem'])}",
        f"stage        {info['stage']}, step {info['step']}, {info['tokens_seen']} tokens seen",
        f"model        {shape}" + (f", {info['model_parameters']:,} parameters" if "model_parameters" in info else ""),
        f"tokenizer    {info['tokenizer']}",
        "layout       " + " ".join(f"{k}={v}" for k, v in layout.items()) if layout else "layout       unknown",
        f"precision    {info['precision']}",
        f"size         {info['bytes'] / 2**20:.1f} MiB in {info['files']} files",
        f"parents      {', '.join(info['parents']) or '-'}",
    ]
    return "\n".join(lines)
