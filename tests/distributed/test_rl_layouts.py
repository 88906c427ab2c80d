"""The RL stages in parallel layouts equal one process, through `megaflow train ppo|grpo` as users run them:

- an iteration's losses (actor, surrogate, KL, entropy, ratio; PPO's value loss), grad norm and rewards
  under TP2, PP2 and DP2 equal the single process's (1e-5): two iterations of 2 epochs x 2 minibatches,
  so later updates see ratios away from 1 and a policy away from its reference;
- the rollout's log-probs equal the training forward's at every iteration (max token ratio 1 + 1e-5),
  in every layout;
- every loss aggregation gives the same loss and gradient, element by element, with 1 or 4 micro-batches
  and at DP2 (1e-6, fp32, gloo).

How the gradient is compared: one update by Adam with lr = eps = 100 (no weight decay, no clipping) moves
each weight by 100 g / (|g| + 100) (the first step's bias-corrected moments are g and g^2), about g itself
and a one-to-one function of it. So the saved weights after the update equal element by element exactly when the gradients do.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, run_megaflow

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GRPO_CONFIG = REPO / "configs" / "stages" / "grpo-tiny.yaml"
PROMPTS = REPO / "data" / "sample" / "sft-words" / "train.jsonl"
LAYOUTS = {"single": [], "tp2": ["--nproc-per-node", "2", "parallel.tp=2"],
           "pp2": ["--nproc-per-node", "2", "parallel.pp=2"], "dp2": ["--nproc-per-node", "2"]}
COMPARED = ("loss", "pg loss", "kl", "entropy", "ratio", "clip fraction", "grad_norm", "reward/mean", "kl/ref",
            "critic/value loss")


def _common(sft, run_dir) -> list[str]:
    return [f"init_from={sft / 'final'}", f"data.train=[{{path: {PROMPTS}}}]", "data.prompts.valid=[]",
            f"run.dir={run_dir}", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=8",
            "checkpoint.every=0", "eval.final=false"]


def _rows(stage_dir) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


@pytest.fixture(scope="module")
def short_rm(workdir, tiny_sft):
    """A reward model of a few steps: any scalar head will do to compare layouts."""
    pairs = REPO / "data" / "sample" / "pref-words"
    proc = run_megaflow("train", "rm", "--config", str(REPO / "configs/stages/rm-tiny.yaml"),
                        f"init_from={tiny_sft / 'final'}", f"data.train=[{{path: {pairs / 'train.jsonl'}}}]",
                        f"data.preference.valid=[{pairs / 'heldout.jsonl'}]", "run.dir=runs/rl-rm", "train.steps=5", "train.warmup_steps=1",
                        cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / "rl-rm" / "rm"


@pytest.fixture(scope="module")
def layout_runs(workdir, tiny_sft, short_rm):
    runs = {}
    for algo in ("grpo", "ppo"):
        extra = ["train.steps=2", "rl.epochs=2", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "train.lr=2e-4"]
        if algo == "ppo":
            extra += ["rl.reward.function=null", f"rl.reward.model={short_rm / 'final'}", "rl.group_size=2", "rl.prompts_per_step=8",
                      "rl.kl_penalty_coef=0.05"]
        for name, launch in LAYOUTS.items():
            run_dir = workdir / "runs" / f"rl-{algo}-{name}"
            proc = run_megaflow("train", algo, "--config", str(GRPO_CONFIG), *_common(tiny_sft, run_dir), *extra,
                                *launch, cwd=workdir)
            assert proc.returncode == 0, f"{algo} {name}: {proc.stderr[-3000:]}"
            runs[algo, name] = _rows(run_dir / algo)
    return runs


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_an_rl_iteration_in_a_layout_equals_one_process(layout_runs, algo, layout):
    ref, got = layout_runs[algo, "single"], layout_runs[algo, layout]
    assert len(ref) == len(got) == 2
    for step, (a, b) in enumerate(zip(ref, got), 1):
        for key in COMPARED:
            if key in a:
                print(f"{algo} {layout} iteration {step} {key}: {b[key]:.8g} vs {a[key]:.8g}")
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (step, key)
    assert ref[1]["kl/ref"] != 0.0 and ref[1]["ratio"] != 1.0  # the second iteration compares a moved policy
    if algo == "ppo":
        assert "critic/value loss" in ref[0] and "explained_variance" in ref[0]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rollout_log_probs_equal_the_training_forward(layout_runs, algo, layout):
    for row in layout_runs[algo, layout]:
        assert row["logprob_gap/max_ratio"] - 1.0 < 1e-5
        assert abs(row["logprob_gap/k3"]) < 1e-9


def _update(stage_dir, start) -> dict[str, torch.Tensor]:
    """Weight changes of a run's single update: its final weights minus the ones it started from."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = stage_dir / "weights.pt"
    dcp_to_torch_save(str(stage_dir / "final" / "weights"), str(out))
    after = torch.load(out, weights_only=False)
    return {k: after[k].float() - start[k].float() for k in start if isinstance(start[k], torch.Tensor)}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregation_does_not_depend_on_micro_batches_or_data_parallel_size(workdir, tiny_sft, mode):
    """One update of 16 rollouts: 1 micro-batch, 4 micro-batches, and 2 data-parallel ranks of 2."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    start_file = workdir / "runs" / "rl-agg-start.pt"
    if not start_file.exists():
        dcp_to_torch_save(str(tiny_sft / "final" / "weights"), str(start_file))
    start = torch.load(start_file, weights_only=False)
    got, updates = {}, {}
    for name, (mbs, launch) in {"1 micro-batch": (16, []), "4 micro-batches": (4, []),
                                "dp2": (4, ["--nproc-per-node", "2"])}.items():
        run_dir = workdir / "runs" / f"rl-agg-{mode}-{name.replace(' ', '-')}"
        proc = run_megaflow("train", "grpo", "--config", str(GRPO_CONFIG), *_common(tiny_sft, run_dir),
                            "train.steps=1", "train.global_batch_size=16", f"train.micro_batch_size={mbs}",
                            f"rl.loss_aggregation={mode}", "rl.kl_loss_coef=0.1", "rl.entropy_coef=0.01",
                            "train.lr=100", "train.adam_eps=100", "train.weight_decay=0", "train.clip_grad=0",
                            *launch, cwd=workdir)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        got[name] = _rows(run_dir / "grpo")[0]
        updates[name] = _update(run_dir / "grpo", start)
    ref, ref_update = got["1 micro-batch"], updates["1 micro-batch"]
    assert ref["grad_norm"] > 0
    scale = max(d.abs().max().item() for d in ref_update.values())
    assert scale > 1e-3  # 100 g / (|g| + 100): the update really moved the weights
    ulp = torch.finfo(torch.float32).eps
    for name, row in got.items():
        # what the update moved beyond two fp32 roundings of the weight itself (|w| ulp each)
        diff = max(((updates[name][k] - d).abs() - 2 * ulp * (start[k].float() + d).abs()).max().item()
                   for k, d in ref_update.items())
        print(f"{mode} {name}: loss {row['loss']:.9g} grad_norm {row['grad_norm']:.9g} "
              f"max |update - 1 micro-batch's| {diff:.3g} (largest update {scale:.3g})")
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)  # a mean near 0 of terms near 1
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
        assert diff <= 1e-6 * scale, name
