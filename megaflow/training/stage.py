"""What every stage does before and after its loop: process setup, the stage directory with its resolved
config, the tokenizer (trained on first use when the config asks for it), and the final checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megaflow.config import StageConfig, dump_config
from megaflow.data.tokenizer import Tokenizer, train_tokenizer
from megaflow.errors import UserError
from megaflow.models.size import padded_vocab_size
from megaflow.runtime import distributed as dist


def stage_dir(cfg: StageConfig) -> Path:
    return Path(cfg.run.dir) / cfg.stage


def setup_runtime(cfg: StageConfig) -> None:
    """Check the layout against the world size (before megatron is touched), then set up processes."""
    p = cfg.parallel
    try:
        cfg.check_layout(dist.read_env().world_size)
        dist.setup(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def ensure_tokenizer(cfg: StageConfig) -> tuple[Tokenizer, str]:
    """Load `tokenizer.path`; train it first (rank 0) if it is missing and `train_if_missing` is set."""
    path = cfg.tokenizer.path
    if not path:
        raise UserError("tokenizer.path: not set")
    exists = Path(path).exists()
    if not exists and cfg.tokenizer.train_if_missing is None:
        raise UserError(f"tokenizer.path: not found: {path} (set tokenizer.train_if_missing to train one)")
    if not exists and dist.is_rank0():
        spec = cfg.tokenizer.train_if_missing
        field = cfg.data.train[0].field if cfg.data.train else "text"
        dist.print_rank0(f"tokenizer: training a {spec.vocab_size}-token BPE on {', '.join(spec.input)}")
        train_tokenizer(spec.input, spec.vocab_size, path, field=field)
        dist.print_rank0(f"trained tokenizer ({spec.vocab_size} tokens) -> {path}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return Tokenizer.load(path), path


def model_vocab_size(cfg: StageConfig, tokenizer: Tokenizer) -> int:
    """The tokenizer defines the vocabulary; megatron pads it so TP shards are equal."""
    return padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)


def run_dir_entries(run_dir: Path) -> set[Path]:
    """What a run directory holds, two levels deep (enough to tell what a failed stage added)."""
    if not run_dir.is_dir():
        return set()
    top = list(run_dir.iterdir())
    return {run_dir, *top, *(q for p in top if p.is_dir() for q in p.iterdir())}


def tidy_after_error(run_dir: Path, before: set[Path], stage_name: str) -> list[Path]:
    """After a user error: remove the directories the failed stage created that hold nothing, and its new
    stage directory if it holds no more than the resolved config; return what else it added (a trained
    tokenizer, preprocessed data: valid, and reused by the next run) for the error to name."""
    run_dir = Path(run_dir)
    new = sorted(run_dir_entries(run_dir) - before, key=lambda p: len(p.parts), reverse=True)
    for p in new:  # deepest first, so a directory emptied here goes too
        if p == run_dir / stage_name and p.is_dir() and {q.name for q in p.iterdir()} <= {"config.yaml"}:
            shutil.rmtree(p)
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    left = [p for p in new if p.exists() and p != run_dir]
    return sorted(p for p in left if p.parent not in left)


def check_resumable_model(cfg: StageConfig) -> None:
    """A run that will resume must build the model its checkpoint holds: a changed shape is one line
    before the stage directory is touched (megatron's load would fail on the first mismatched tensor)."""
    from megaflow.config.schema import ModelConfig
    from megaflow.convert.hf_config import model_differences
    from megaflow.models.weights import read_meta
    from megaflow.training.checkpoint import read_latest

    latest = read_latest(stage_dir(cfg) / "checkpoints") if cfg.checkpoint.resume else None
    if latest is None or not (latest / "megaflow.json").is_file():
        return
    try:
        theirs = ModelConfig(**read_meta(latest)["model"])
    except (KeyError, TypeError, ValueError):
        return  # unreadable: find_resumable names it and falls back
    diffs = model_differences(cfg.model, theirs, scope="shapes")
    if diffs:
        raise UserError(f"{latest}: this run would resume a checkpoint of another model (stage vs checkpoint: "
                        f"{'; '.join('model.' + d for d in diffs)}); use another run.dir, or checkpoint.resume=false "
                        "to start over in this one")


def write_resolved_config(cfg: StageConfig) -> Path:
    check_resumable_model(cfg)
    out = stage_dir(cfg)
    if dist.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    return out


def final_meta(cfg: StageConfig, vocab_size: int, step: int, tokens_seen: int, parents: list[str]) -> dict:
    return {
        "stage": cfg.stage,
        "step": step,
        "tokens_seen": tokens_seen,
        "model": cfg.model.model_dump(mode="json"),
        "padded_vocab_size": vocab_size,
        "seq_length": cfg.data.seq_length,
        "tokenizer": "tokenizer",
        "precision": cfg.precision,
        "parents": parents,
        "config": cfg.model_dump(mode="json"),
    }


def finish(trainer, meta: dict, tokenizer: Tokenizer | None, result: dict, t_start: float) -> dict:
    """The end of a completed stage: the final weights-only checkpoint (with the step, tokens and layout
    it was saved at) and the tokenizer, eval.json with the stage's minutes, and the trainer closed."""
    import time

    from megaflow.models import weights

    meta |= {"step": trainer.state.step, "tokens_seen": trainer.state.tokens_seen, "parallel_at_save": trainer.layout}
    final = trainer.stage_dir / "final"
    weights.save_final(final, trainer.model, meta, tokenizer)
    result["minutes"] = (time.time() - t_start) / 60
    trainer.write_json("eval.json", result)
    trainer.close()
    dist.print_rank0(f"final checkpoint -> {final}")
    return result
