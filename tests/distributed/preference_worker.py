"""Worker for tests/distributed/test_preference_layouts.py: the reward-model and DPO tasks in one parallel
layout after another, reporting loss, grad norm, the reference pass's log-probs and the layout's facts.

    python tests/distributed/preference_worker.py --out DIR --reference
    torchrun --nproc-per-node N tests/distributed/preference_worker.py --out DIR --layouts tp2-sp pp2 ...

Every layout loads the weights the one-process run saved (the reward model's scalar head included) and
sees the same pairs: synthetic token ids with prompts and responses of varied lengths, right-padded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_worker import LAYOUTS, STEPS, VOCAB, layout_facts, stage_config  # noqa: E402

PAIRS = 64


def make_pairs():
    """PreferenceSamples: prompt 4-12 tokens, chosen and rejected responses 2-15 tokens each (masked)."""
    from megaflow.data.preference import PreferenceSample

    rng = np.random.default_rng(0)
    out = []
    for i in range(PAIRS):
        prompt = rng.integers(3, VOCAB, rng.integers(4, 13))
        sides = []
        for _ in range(2):
            response = rng.integers(3, VOCAB, rng.integers(2, 16))
            ids = np.concatenate([prompt, response]).astype(np.int64)
            sides += [ids, np.arange(len(ids)) >= len(prompt)]
        out.append(PreferenceSample(f"pair {i}", *sides, margin=float(i % 3) * 0.5))
    return out


def run(task_name: str, layout: str, parallel: dict, out: Path, reference: bool = False) -> dict:
    from megatron.core import parallel_state

    from megaflow.algorithms.dpo import DPOTask
    from megaflow.algorithms.rm import RewardTask
    from megaflow.runtime import distributed as dist
    from megaflow.algorithms import preference
    from megaflow.algorithms import reference as ref
    from megaflow.models import weights
    from megaflow.training.engine import Trainer

    cfg = stage_config(parallel)
    cfg.stage = task_name.split("-")[0]
    cfg.data.preference.packing = packed = task_name == "dpo-packed"
    cfg.check_layout(dist.read_env().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    p = cfg.parallel
    dist.setup(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
    initial = out / f"weights-{cfg.stage}"  # dpo-packed starts from dpo's
    samples = make_pairs()
    result, ref_logps = {}, None
    task = DPOTask(beta=0.5, packed=packed) if cfg.stage == "dpo" else RewardTask(use_margin=True, center_coef=0.01)
    trainer = Trainer(cfg, task, VOCAB, out / f"{task_name}-{layout}")
    if reference and not packed:
        meta = {"model": cfg.model.model_dump(mode="json")} | ({"head": "scalar"} if task_name == "rm" else {})
        weights.save_final(initial, trainer.model, meta)
    else:
        trainer.init_weights_from(initial)
    if cfg.stage == "dpo":  # the reference pass in this layout, from the weights the one-process run saved
        ref_logps = ref.compute_logps(cfg, ref.ReferenceModel(cfg, VOCAB, initial), ref.pair_dataset(cfg, samples, 0))
        result["ref_logps"] = ref_logps.tolist()
    dataset = ref.pair_dataset(cfg, samples, 0, ref_logps)
    iterators = preference.batch_iterators(cfg, len(trainer.model), dataset)
    steps = [trainer.train_step(iterators) for _ in range(STEPS)]
    facts = [None] * torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
    if facts is not None:
        torch.distributed.all_gather_object(facts, layout_facts(trainer))
    trainer.close()
    return result | {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                     "accuracy": [s.get("accuracy", s.get("rewards/accuracies")) for s in steps],
                     "ranks": facts or [layout_facts(trainer)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--layouts", nargs="*", default=[])
    args = ap.parse_args()
    from megaflow.runtime import distributed as dist

    results = {}
    for task_name in ("rm", "dpo", "dpo-packed"):
        if args.reference:
            results[f"{task_name}/reference"] = run(task_name, "reference", {}, args.out, reference=True)
        for name in args.layouts:
            results[f"{task_name}/{name}"] = run(task_name, name, LAYOUTS[name], args.out)
    if dist.is_rank0():
        tag = "reference" if args.reference else f"world{torch.distributed.get_world_size()}"
        (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=1))
    dist.teardown()


if __name__ == "__main__":
    main()
