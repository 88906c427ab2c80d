"""Worker for tests/distributed/test_layouts.py: trains a tiny model for a few steps in one parallel layout
after another and reports loss, grad norm and what the layout really is on each rank.

    python tests/distributed/layout_worker.py --out DIR --reference            # one process: weights + reference
    torchrun --nproc-per-node N tests/distributed/layout_worker.py --out DIR --layouts tp2 pp2 ...

Every layout starts from the weights the reference saved (loaded, not re-seeded: pipeline stages build
and initialise their layers in a different order) and sees the same global batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LAYOUTS = {
    "tp2": {"tp": 2},
    "pp2": {"pp": 2},
    "pp2-vpp2": {"pp": 2, "vpp": 2},
    "dp2": {},
    "tp2-sp": {"tp": 2, "sp": True},
    "dp2-distopt": {"distributed_optimizer": True},
    "tp2-pp2": {"tp": 2, "pp": 2},
    "tp2-dp2": {"tp": 2},
    "pp2-dp2": {"pp": 2},
    # not layouts, but settings that must not change the numbers either
    "recompute-full": {"recompute": "full", "recompute_method": "uniform", "recompute_layers": 2},
    "recompute-selective": {"recompute": "selective"},
    "dp2-distopt-overlap": {"distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True},
}
STEPS = 3
VOCAB = 256
SEQ = 32


def stage_config(parallel: dict):
    from megaflow.config.schema import StageConfig

    return StageConfig(
        stage="pretrain",
        run={"tensorboard": False, "progress": False},
        model={"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4,
               "num_query_groups": 2, "ffn_hidden_size": 128, "max_position_embeddings": SEQ},
        data={"seq_length": SEQ},
        train={"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
               "clip_grad": 1.0, "seed": 7},
        parallel=parallel,
    )


class PatternDataset:
    """Learnable synthetic samples: each is an arithmetic progression mod VOCAB with a per-sample start
    and stride, so the loss falls within a few steps and every sample differs."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stride = (i * 37) % VOCAB, 1 + (i % 5)
        seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.ones(SEQ)}


def layout_facts(trainer) -> dict:
    """What this rank really runs: group sizes, layers and parameter shards it holds."""
    from megatron.core import parallel_state as ps

    from megaflow.models.gpt import unwrap

    chunks = [unwrap(c) for c in trainer.model]
    qkv = [p for c in chunks for n, p in c.named_parameters() if n.endswith("linear_qkv.weight")]
    norms = [p for c in chunks for n, p in c.named_parameters() if "layernorm" in n]
    shard = [g["params"] for g in trainer.optimizer.param_groups]
    return {
        "rank": torch.distributed.get_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "chunks": len(chunks),
        "layers": sum(len(c.decoder.layers) for c in chunks),
        "qkv_rows": qkv[0].shape[0] if qkv else 0,
        "sequence_parallel": bool(trainer.tcfg.sequence_parallel) and all(getattr(p, "sequence_parallel", False) for p in norms),
        "has_embedding": any(getattr(c, "pre_process", False) for c in chunks),
        "has_output": any(getattr(c, "post_process", False) for c in chunks),
        "recompute": trainer.tcfg.recompute_granularity,
        "overlap": [trainer.model[0].ddp_config.overlap_grad_reduce, trainer.model[0].ddp_config.overlap_param_gather],
        "params_here": sum(p.numel() for c in chunks for p in c.parameters()),
        "optimizer_numel": sum(p.numel() for group in shard for p in group),
    }


def run_layout(name: str, parallel: dict, out: Path, reference: bool = False) -> dict:
    from megatron.core import parallel_state

    from megaflow.data.sampler import MicroBatches, stack_lm
    from megaflow.models import weights
    from megaflow.runtime import distributed as dist
    from megaflow.training.engine import Trainer, data_parallel_rank_and_size
    from megaflow.training.lm import LanguageModelTask

    cfg = stage_config(parallel)
    world = dist.read_env().world_size
    cfg.check_layout(world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    p = cfg.parallel
    dist.setup(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
    trainer = Trainer(cfg, LanguageModelTask(), VOCAB, out / name)
    if reference:
        weights.save_final(out / "weights", trainer.model, {"model": cfg.model.model_dump(mode="json")})
    else:
        trainer.init_weights_from(out / "weights")
    dp_rank, dp_size = data_parallel_rank_and_size()
    iterators = [MicroBatches(PatternDataset(), cfg.train.micro_batch_size, dp_rank, dp_size, collate=stack_lm)
                 for _ in trainer.model]
    steps = [trainer.train_step(iterators) for _ in range(STEPS)]
    facts = [None] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(facts, layout_facts(trainer))
    else:
        facts = [layout_facts(trainer)]
    return {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps], "ranks": facts}


def context_parallel_check() -> dict:
    """CP needs TE attention (GPU), but its data split and loss reduction are ours to get right: split a
    batch over a CP group of 2, reduce per-token losses as the engine does, compare with the full batch."""
    from megatron.core import parallel_state

    from megaflow.data.sampler import MicroBatches, stack_lm
    from megaflow.training.engine import _reduce_losses
    from megaflow.training.lm import LanguageModelTask

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    full = next(MicroBatches(PatternDataset(), 2, 0, 1, collate=stack_lm))
    positions = torch.arange(SEQ).expand(2, SEQ)
    full["loss_mask"][:, ::7] = 0  # masked tokens must stay out of both the sum and the count
    per_token = full["labels"].float() * 0.01 + positions * 0.001  # a stand-in for the per-token CE

    tokens, labels, loss_mask, _, position_ids = LanguageModelTask.get_batch(iter([full]))
    local_loss = per_token.gather(1, position_ids)
    _, _, report = LanguageModelTask.loss_func(loss_mask, local_loss)
    reduced = _reduce_losses([report], LanguageModelTask.loss_names)
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, position_ids[0].tolist())
    result = {
        "cp": parallel_state.get_context_parallel_world_size(),
        "positions_per_rank": gathered,
        "tokens_match": bool(torch.equal(tokens, full["tokens"].gather(1, position_ids))),
        "labels_match": bool(torch.equal(labels, full["labels"].gather(1, position_ids))),
        "reduced_loss": reduced["lm loss"],
        "reduced_tokens": reduced["_tokens"],
        "full_loss": float((per_token * full["loss_mask"]).sum() / full["loss_mask"].sum()),
        "full_tokens": float(full["loss_mask"].sum()),
    }
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--layouts", nargs="*", default=[])
    ap.add_argument("--cp-check", action="store_true", help="also check the context-parallel split (2 ranks)")
    args = ap.parse_args()
    from megaflow.runtime import distributed as dist

    results = {}
    if args.reference:
        results["reference"] = run_layout("reference", {}, args.out, reference=True)
    for name in args.layouts:
        results[name] = run_layout(name, LAYOUTS[name], args.out)
    if args.cp_check:
        results["cp2-split"] = context_parallel_check()
    if dist.is_rank0():
        tag = "reference" if args.reference else f"world{torch.distributed.get_world_size()}"
        (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=1))
    dist.teardown()


if __name__ == "__main__":
    main()
