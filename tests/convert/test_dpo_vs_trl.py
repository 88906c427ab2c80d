"""megaflow's DPO loss against TRL 1.16's DPOTrainer: sigmoid DPO and IPO, first optimizer step, the same
weights, the same token ids and response masks, the same reference; the losses agree to 1e-4.

Models (a worker process, this file run as a script): the tokenizer with megaflow's chat template (plus the
`{% generation %}` marks, tools/bench_sft.py's TEMPLATE) and megaflow's random `tiny` model, as
tools/bench_sft.py builds them (`initial`); `perturbed` is the same weights plus Gaussian noise (std NOISE,
fixed seed), saved as a second megaflow checkpoint. Both go through `megaflow_to_hf(..., verify=True)` (what
`megaflow convert megaflow-to-hf --verify` runs), so TRL loads exactly megaflow's weights.

Two references, so that the check is not only of a closed form:
- `same`: policy = reference = `initial`. At step 1 both sides must give the closed forms, log 2 for sigmoid
  and (1/(2 beta))^2 for IPO, with every implicit reward 0.
- `perturbed`: policy = `perturbed`, reference = `initial` (megaflow `dpo.reference_from`, TRL `ref_model`).
  Policy and reference differ, so the log-ratios are not 0 and the step-1 loss is far from the closed form
  (asserted; about 0.751 for sigmoid and 1.97 for IPO, against log 2 and 1.0).
  Why this rather than reference log-probs precomputed once and fed to both sides: it needs only each
  library's public settings, keeps each side's own reference pass in the comparison, and the perturbation
  is cheaper than fine-tuning a second model (no extra training run); noise of std 0.1 on weights
  initialised with std 0.02 moves the per-sequence log-ratios by about 1 nat.
The reference paths are crossed, to cover each side's two: sigmoid with megaflow's cached reference
(`dpo.reference=cached`, the default) against TRL's live `ref_model`; IPO with megaflow's live reference
(`dpo.reference=live`) against TRL's `precompute_ref_log_probs=True`.

Tokenization. TRL renders the conversational record through the tokenizer's chat template: prompt_ids with
the generation prompt, and the completion is whatever prompt + response adds after it. With megaflow's
template that is the response, `<|end_of_turn|>` AND the newline the template writes after every turn;
megaflow's response mask stops at `<|end_of_turn|>` (the generation marks; the newline is not the model's
answer). `test_tokenization_matches_trl` checks TRL's own tokenization against megaflow's token for token:
the prompt ids are equal, and TRL's completion is megaflow's masked tokens followed by exactly that newline.
The loss comparison then feeds TRL megaflow's ids pre-tokenized (prompt_ids = the tokens before the mask,
chosen_ids / rejected_ids = the masked tokens): TRL 1.16 has no pass-through for pre-tokenized rows, so a
subclass skips its `_prepare_dataset` for rows that already have `prompt_ids`. Its collator, forward, masks
and loss are TRL's own. The policy's summed log-probs (TRL's `logps/chosen` and `logps/rejected`) and the
reward margin are compared too: they show both sides score the same tokens.

About 70 s on 2 shared CPU cores (one init process, four `megaflow train dpo` runs of one step, TRL in this
process).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_megaflow, run_python

TOOLS = REPO / "tools"
PAIRS = REPO / "data" / "sample" / "pref-words" / "train.jsonl"
DPO_CONFIG = REPO / "configs" / "stages" / "dpo-tiny.yaml"

pytestmark = pytest.mark.slow

N_PAIRS = 8  # one micro-batch of 8 pairs: the whole step on both sides
SEQ = 64  # megaflow's row length and TRL's max_length (the longest pair has 31 tokens: nothing is truncated)
NOISE, NOISE_SEED = 0.1, 7  # the perturbed policy: every parameter + N(0, NOISE^2) (init std is 0.02)
BETA = {"sigmoid": 0.1, "ipo": 0.5}
CLOSED_FORM = {"sigmoid": math.log(2), "ipo": (1 / (2 * BETA["ipo"])) ** 2}
TOL = 1e-4
# megaflow's reference mode and TRL's, per loss type (crossed: see the docstring)
MEGAFLOW_REFERENCE = {"sigmoid": "cached", "ipo": "live"}
TRL_PRECOMPUTE = {"sigmoid": False, "ipo": True}


def _bench_sft():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import bench_sft

    return bench_sft


# ---------------------------------------------------------------------------------------------- worker


def make_models(out: Path) -> dict:
    """(In a process of its own.) The tokenizer and megaflow's random tiny model (`initial`), the perturbed
    copy, both converted to HF with verification."""
    import megatron.core  # noqa: F401
    import torch

    from megaflow.convert import megaflow_to_hf
    from megaflow.data.tokenizer import Tokenizer
    from megaflow.models import weights
    from megaflow.training import stage
    from megaflow.training.engine import build_model

    bench_sft = _bench_sft()
    spec = {"dir": str(out), "shape": "tiny", "seq": SEQ, "precision": "fp32", "warmup": 0, "steps": 1}
    initial = Path(bench_sft.work_init(spec)["ckpt"])  # out/megaflow: tokenizer + random init, a final checkpoint
    cfg = bench_sft._megaflow_setup(spec, SEQ, 1, out / "run")
    model, _ = build_model(cfg, bench_sft.VOCAB)
    weights.load_weights(initial, model)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for chunk in model:
            for p in chunk.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * NOISE)
    weights.save_final(out / "perturbed", model, stage.final_meta(cfg, bench_sft.VOCAB, 0, 0, [str(initial)]),
                          Tokenizer.load(initial / "tokenizer"))
    result = {"initial": str(initial), "perturbed": str(out / "perturbed")}
    for name in ("initial", "perturbed"):
        report = megaflow_to_hf(result[name], out / f"{name}-hf", verify=True, log=lambda *_: None)
        result[f"{name}_hf"], result[f"{name}_logit_diff"] = report["out"], report["max_abs_logit_diff"]
    return result


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    # TRL is megaflow's `bench` extra, not a `test` one; the subclass below relies on TRL 1.16's internals
    pytest.importorskip("trl", minversion="1.16", reason="needs TRL >= 1.16 (pip install -e '.[bench]')")
    out = tmp_path_factory.mktemp("dpo-vs-trl")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = run_python(__file__, "--init", str(out), cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "models.json").read_text())
    assert result["initial_logit_diff"] <= 1e-4 and result["perturbed_logit_diff"] <= 1e-4, result
    result["root"] = str(out)
    (out / "pairs.jsonl").write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:N_PAIRS]))
    result["pairs"] = str(out / "pairs.jsonl")
    return result


@pytest.fixture(scope="module")
def megaflow_samples(models):
    """The pairs as megaflow's DPO stage tokenizes them (megaflow.data.preference.prepare, the checkpoint's
    tokenizer and its chat template)."""
    from megaflow.data import preference
    from megaflow.data.tokenizer import Tokenizer

    opts = preference.PreferenceDataOptions(seq_length=SEQ, truncation="truncate_left")  # the stage's settings
    prepared = preference.prepare([models["pairs"]], Tokenizer.load(Path(models["initial"]) / "tokenizer"), opts)
    assert prepared.template.source == _bench_sft().TEMPLATE and not prepared.added_tokens
    assert len(prepared.samples) == N_PAIRS and prepared.summary.truncated == 0
    return prepared.samples


def _split(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """(prompt, response, tail) of a megaflow sequence: the tokens before the response mask, the masked
    tokens (one contiguous run), the tokens after them."""
    where = np.flatnonzero(mask)
    start, end = int(where[0]), int(where[-1]) + 1
    assert mask[start:end].all(), "the response mask is not one run"
    return ids[:start].tolist(), ids[start:end].tolist(), ids[end:].tolist()


def _pretokenized_rows(samples) -> list[dict]:
    rows = []
    for s in samples:
        prompt, chosen, _ = _split(s.chosen_ids, s.chosen_mask)
        prompt_r, rejected, _ = _split(s.rejected_ids, s.rejected_mask)
        assert prompt == prompt_r
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def _conversational_rows(path: str) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]


def _trl_trainer(out: Path, policy: str, ref: str | None, rows: list[dict], loss_type: str = "sigmoid",
                 precompute: bool = False):
    """TRL's DPOTrainer on the converted weights: one step of N_PAIRS pairs, fp32 on the CPU. Rows with
    `prompt_ids` are taken as they are (TRL 1.16 would tokenize prompt/chosen/rejected itself)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class PreTokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    args = trl.DPOConfig(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=N_PAIRS, gradient_accumulation_steps=1,
        learning_rate=1e-4, beta=BETA[loss_type], loss_type=[loss_type], precompute_ref_log_probs=precompute,
        max_length=SEQ, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=1234)
    return PreTokenized(model=AutoModelForCausalLM.from_pretrained(policy, **load),
                        ref_model=AutoModelForCausalLM.from_pretrained(ref, **load) if ref else None,
                        args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=AutoTokenizer.from_pretrained(policy))


def _trl_first_step(trainer) -> dict:
    """The loss TRL's compute_loss returned in its first training step, with the step's logged metrics."""
    losses, compute_loss = [], trainer.compute_loss

    def recorded(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    return trainer.state.log_history[0] | {"loss": losses[0]}


def _megaflow_first_step(models: dict, case: str, loss_type: str) -> dict:
    run_dir = Path(models["root"]) / f"mf-{case}-{loss_type}"
    init = models["initial"] if case == "same" else models["perturbed"]
    reference = [] if case == "same" else [f"dpo.reference_from={models['initial']}"]
    proc = run_megaflow(
        "train", "dpo", "--config", str(DPO_CONFIG), f"init_from={init}", *reference,
        f"data.train=[{{path: {models['pairs']}}}]", "data.preference.valid=[]", f"data.seq_length={SEQ}",
        f"run.dir={run_dir}", "train.steps=1", f"train.micro_batch_size={N_PAIRS}",
        f"train.global_batch_size={N_PAIRS}", "train.warmup_steps=0", "eval.final=false", "run.tensorboard=false",
        f"dpo.loss_type={loss_type}", f"dpo.beta={BETA[loss_type]}", f"dpo.reference={MEGAFLOW_REFERENCE[loss_type]}",
        cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == 1 and "split" not in r)


# ---------------------------------------------------------------------------------------------- tests


def test_tokenization_matches_trl(models, megaflow_samples, tmp_path):
    """TRL's own tokenization of the conversational records vs megaflow's ids and response masks."""
    from transformers import AutoTokenizer

    trainer = _trl_trainer(tmp_path, models["initial_hf"], None, _conversational_rows(models["pairs"]))
    theirs = trainer.train_dataset
    tok = AutoTokenizer.from_pretrained(models["initial_hf"])
    assert len(theirs) == N_PAIRS
    for s, t in zip(megaflow_samples, theirs, strict=True):
        for ids, mask, side in ((s.chosen_ids, s.chosen_mask, "chosen"), (s.rejected_ids, s.rejected_mask, "rejected")):
            prompt, response, tail = _split(ids, mask)
            assert t["prompt_ids"] == prompt, s.where
            # TRL's completion = megaflow's response mask (response + <|end_of_turn|>) + the template's "\n"
            assert t[f"{side}_ids"] == response + tail, s.where
            assert tok.decode(response[-1:]) == "<|end_of_turn|>" and tok.decode(tail) == "\n", s.where


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("case", ["same", "perturbed"])
def test_first_step_loss_matches_trl(models, megaflow_samples, tmp_path, case, loss_type):
    ours = _megaflow_first_step(models, case, loss_type)
    policy, ref = (models["initial_hf"], None) if case == "same" else (models["perturbed_hf"], models["initial_hf"])
    theirs = _trl_first_step(_trl_trainer(tmp_path, policy, ref, _pretokenized_rows(megaflow_samples), loss_type,
                                          precompute=TRL_PRECOMPUTE[loss_type]))
    print(f"{case} {loss_type}: megaflow loss {ours['loss']:.6f}, TRL {theirs['loss']:.6f} "
          f"(|diff| {abs(ours['loss'] - theirs['loss']):.1e}; closed form at policy = reference "
          f"{CLOSED_FORM[loss_type]:.6f}); margins {ours['rewards/margins']:.5f} / {theirs['rewards/margins']:.5f}, "
          f"logps/chosen {ours['logps/chosen']:.4f} / {theirs['logps/chosen']:.4f}")
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key
    for key in ("logps/chosen", "logps/rejected"):  # sums over a response (tens of nats)
        assert ours[key] == pytest.approx(theirs[key], abs=1e-3), key
    if case == "same":
        assert ours["loss"] == pytest.approx(CLOSED_FORM[loss_type], abs=1e-5)
        assert theirs["loss"] == pytest.approx(CLOSED_FORM[loss_type], abs=1e-5)
        assert abs(ours["rewards/margins"]) < 1e-6 and abs(theirs["rewards/margins"]) < 1e-6
    else:
        assert abs(ours["loss"] - CLOSED_FORM[loss_type]) > 0.02  # the log-ratios matter


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--init":
        raise SystemExit(f"usage: python {Path(__file__).name} --init DIR   (the test's worker)")
    root = Path(sys.argv[2])
    (root / "models.json").write_text(json.dumps(make_models(root)))
