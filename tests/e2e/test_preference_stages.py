"""The reward-model and DPO stages end to end, from the session's tiny SFT model, on megaflow's synthetic
preference pairs (data/sample/pref-words: the exact answer chosen, a wrong answer made of the prompt's
own words rejected; held-out prompts never seen by SFT, RM or DPO).

- RM: held-out accuracy after training (printed; asserted >= MIN_RM_ACCURACY), reproduced from the saved
  checkpoint by `megaflow eval --metrics reward_acc`; `megaflow score` gives the same rewards.
- DPO: before training the policy is the reference, so the held-out loss is log 2 exactly and every
  implicit reward 0 (this also shows the cached reference log-probs equal the policy's own forward);
  after training, held-out reward accuracy and margin rise. Cached and live reference give the same
  losses; IPO and RPO start at their closed forms.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tests.conftest import REPO, run_megaflow, run_python

pytestmark = pytest.mark.slow

PAIRS = REPO / "data" / "sample" / "pref-words"
RM_CONFIG = REPO / "configs" / "stages" / "rm-tiny.yaml"
DPO_CONFIG = REPO / "configs" / "stages" / "dpo-tiny.yaml"
MIN_RM_ACCURACY = 0.7


def _data(sft) -> list[str]:
    return [f"init_from={sft / 'final'}", f"data.train=[{{path: {PAIRS / 'train.jsonl'}}}]",
            f"data.preference.valid=[{PAIRS / 'heldout.jsonl'}]"]


def _rows(stage) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_rm(workdir, tiny_sft):
    proc = run_megaflow("train", "rm", "--config", str(RM_CONFIG), *_data(tiny_sft), "run.dir=runs/pref", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / "pref" / "rm"


@pytest.fixture(scope="module")
def tiny_dpo(workdir, tiny_sft):
    proc = run_megaflow("train", "dpo", "--config", str(DPO_CONFIG), *_data(tiny_sft), "run.dir=runs/pref", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference log-probs computed" in proc.stdout
    return workdir / "runs" / "pref" / "dpo"


def test_reward_model_learns_the_preferences(workdir, tiny_rm):
    result = json.loads((tiny_rm / "eval.json").read_text())
    print(f"RM held-out accuracy {result['valid_accuracy']:.1%}, margin {result['valid_margin']:.3f} on "
          f"{result['valid_pairs']} pairs; rewards chosen {result['valid_reward/chosen_mean']:.3f} rejected "
          f"{result['valid_reward/rejected_mean']:.3f} (std {result['valid_reward/std']:.3f})")
    assert result["valid_accuracy"] >= MIN_RM_ACCURACY and result["valid_margin"] > 0
    meta = json.loads((tiny_rm / "final" / "megaflow.json").read_text())
    assert meta["head"] == "scalar" and meta["stage"] == "rm"

    # the saved reward model gives the stage's numbers again (all 200 held-out pairs vs its 192)
    proc = run_megaflow("eval", str(tiny_rm / "final"), "--metrics", "reward_acc", "--data",
                        str(PAIRS / "heldout.jsonl"), "--limit", str(result["valid_pairs"]), "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert again["reward_pairs"] == result["valid_pairs"]
    assert again["reward_accuracy"] == pytest.approx(result["valid_accuracy"], abs=1e-6)  # float32 vs float64
    assert again["reward_margin"] == pytest.approx(result["valid_margin"], abs=1e-4)


def test_score_gives_the_rewards_of_the_evaluation(workdir, tiny_rm):
    record = json.loads((PAIRS / "heldout.jsonl").read_text().splitlines()[1])
    proc = run_megaflow("score", str(tiny_rm / "final"), "--prompt", record["prompt"], "--response", record["chosen"],
                        "--response", record["rejected"], "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = json.loads(proc.stdout)["rewards"]
    one = tiny_rm.parent / "one.jsonl"
    one.write_text(json.dumps(record) + "\n")
    proc = run_megaflow("eval", str(tiny_rm / "final"), "--metrics", "reward_acc", "--data", str(one), "--json", cwd=workdir)
    got = json.loads(proc.stdout)
    assert got["reward_chosen_mean"] == pytest.approx(rewards[0], abs=1e-5)
    assert got["reward_rejected_mean"] == pytest.approx(rewards[1], abs=1e-5)


def test_dpo_raises_held_out_preference_accuracy_and_margin(tiny_dpo):
    result = json.loads((tiny_dpo / "eval.json").read_text())
    print(f"DPO held-out: loss {result['before_loss']:.4f} -> {result['valid_loss']:.4f}, reward accuracy "
          f"{result['before_rewards_accuracies']:.1%} -> {result['valid_rewards_accuracies']:.1%}, margin "
          f"{result['before_rewards_margins']:.4f} -> {result['valid_rewards_margins']:.4f}, kl/chosen "
          f"{result['valid_kl_chosen']:.4f}")
    # the policy is the reference before training: cached reference log-probs equal its own forward
    assert result["before_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["before_rewards_margins"] == pytest.approx(0.0, abs=1e-5)
    assert result["valid_rewards_accuracies"] >= 0.8
    assert result["valid_rewards_margins"] > 0.1
    assert result["valid_loss"] < result["before_loss"] - 0.05


def _short_dpo(workdir, sft, name: str, *overrides: str) -> list[float]:
    proc = run_megaflow("train", "dpo", "--config", str(DPO_CONFIG), *_data(sft), f"run.dir=runs/{name}",
                        "train.steps=3", "train.warmup_steps=0", "eval.final=false", *overrides, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in _rows(workdir / "runs" / name / "dpo") if "split" not in r]


@pytest.fixture(scope="module")
def short_cached(workdir, tiny_sft) -> list[float]:
    """Three DPO steps with the defaults: cached reference, pair rows cut after the longest (data.padding)."""
    return _short_dpo(workdir, tiny_sft, "dpo-cached", "dpo.reference=cached")


def test_cached_and_live_reference_give_the_same_losses(workdir, tiny_sft, short_cached):
    cached = short_cached
    live = _short_dpo(workdir, tiny_sft, "dpo-live", "dpo.reference=live")
    print(f"cached {cached} vs live {live}")
    assert cached[0] == pytest.approx(math.log(2), abs=1e-6)
    assert cached == pytest.approx(live, abs=1e-5)


def test_rows_cut_after_the_longest_give_the_losses_of_full_rows(workdir, tiny_sft, short_cached):
    """`data.padding: longest` (the default) computes only up to the micro-batch's longest sequence; the
    losses are those of rows padded to seq_length, and the metrics count the positions that ran."""
    full = _short_dpo(workdir, tiny_sft, "dpo-full-rows", "data.padding=max_length")
    print(f"cut rows {short_cached} vs full rows {full}")
    assert short_cached == pytest.approx(full, abs=1e-5)
    positions = {name: [r["tokens_seen"] for r in _rows(workdir / "runs" / name / "dpo") if "split" not in r]
                 for name in ("dpo-cached", "dpo-full-rows")}
    assert positions["dpo-full-rows"] == [32 * 64 * (k + 1) for k in range(3)]  # 16 pairs x 2 rows of 64
    assert all(0 < cut < full for cut, full in zip(positions["dpo-cached"], positions["dpo-full-rows"]))


def test_ipo_and_rpo_start_at_their_closed_forms(workdir, tiny_sft):
    """Step 1 (policy = reference): IPO's (0 - 1/(2 beta))^2; RPO's log 2 + alpha * NLL of the chosen."""
    ipo = _short_dpo(workdir, tiny_sft, "ipo", "dpo.loss_type=ipo", "dpo.beta=0.5")
    assert ipo[0] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-5)
    rpo = _short_dpo(workdir, tiny_sft, "rpo", "dpo.rpo_alpha=0.5")
    first = [r for r in _rows(workdir / "runs" / "rpo" / "dpo") if "split" not in r][0]
    assert first["nll_loss"] > 0
    assert rpo[0] == pytest.approx(math.log(2) + 0.5 * first["nll_loss"], rel=1e-3)


def test_preference_stage_bad_inputs_are_one_line(workdir, tmp_path, tiny_sft):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "ho", "rejected": "hey"}\n{"prompt": "hi", "chosen": "same", "rejected": "same"}\n')
    init = f"init_from={tiny_sft / 'final'}"
    cases = [
        ("rm", ["init_from=null"], "init_from: the rm stage starts from a trained model"),
        ("dpo", [init, f"data.train=[{{path: {bad}}}]", "data.preference.valid=[]"], f"{bad}:2:"),
        ("rm", [init, "data.train=[{path: nope.jsonl}]"], "data.train[0].path: file not found"),
        ("dpo", [init, "dpo.reference=live", "parallel.pp=2"], "dpo.reference=live"),
        ("dpo", [init, "dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing applies to"),
    ]
    for stage, overrides, needle in cases:
        config = RM_CONFIG if stage == "rm" else DPO_CONFIG
        proc = run_megaflow("train", stage, "--config", str(config), f"run.dir={tmp_path / 'run'}", *overrides, cwd=REPO)
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (needle, proc.stderr[-2000:])
        assert not (tmp_path / "run" / stage / "final").exists()


def test_a_reward_model_is_refused_where_a_language_model_is_needed(workdir, tmp_path, tiny_sft, tiny_rm):
    """Its scalar head has no vocabulary: generation, HF conversion and a DPO policy from it used to run on
    with a meaningless (or freshly initialised) output layer."""
    rm = str(tiny_rm / "final")
    cases = [
        (["generate", rm, "--prompt", "hi"], "a reward model (a scalar head, no vocabulary) cannot generate"),
        (["convert", "megaflow-to-hf", "--ckpt", rm, "--out", str(tmp_path / "hf")], "has no Hugging Face causal-LM form"),
        (["train", "dpo", "--config", str(DPO_CONFIG), f"init_from={rm}", f"run.dir={tmp_path / 'run'}"],
         "init_from: " + rm + " is a reward model"),
        (["train", "dpo", "--config", str(DPO_CONFIG), f"init_from={tiny_sft / 'final'}",
          f"dpo.reference_from={tmp_path / 'nope'}", f"run.dir={tmp_path / 'run'}"], "dpo.reference_from: not a megaflow"),
    ]
    for args, needle in cases:
        proc = run_megaflow(*args, cwd=REPO)  # the config's relative data paths
        errors = [line for line in proc.stderr.splitlines() if line.startswith("megaflow: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and not (tmp_path / "hf").exists() and not (tmp_path / "run").exists()


CHECK_LOGPS = """
import json, sys
import numpy as np
from megaflow.data.chat import ChatTemplate, chat_tokenizer
from megaflow.data.preference import PreferenceDataOptions, load_pairs, tokenize_pairs
from megaflow.inference import load_for_inference
from megaflow.inference.scoring import logprobs_of

ckpt, pairs, cache, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = load_for_inference(ckpt)
tokenizer, source, _ = chat_tokenizer(model.tokenizer, "auto")
opts = PreferenceDataOptions(seq_length=64, truncation="truncate_left")
samples = tokenize_pairs(load_pairs([pairs], opts)[:n], ChatTemplate(tokenizer, source), opts)
direct = []
for s in samples:
    sides = []
    for ids, mask in ((s.chosen_ids, s.chosen_mask), (s.rejected_ids, s.rejected_mask)):
        per_token = logprobs_of(model, [ids])[0].numpy()  # log p(ids[t+1] | ids[:t+1])
        sides.append(float((per_token * mask[1:]).sum()))  # response tokens only: the prompt carries no loss
    direct.append(sides)
print(json.dumps({"direct": direct, "cached": np.load(cache)[:n].tolist()}))
"""


def test_reference_log_probs_equal_a_direct_per_token_computation(workdir, tiny_sft, tiny_dpo):
    """The cached reference log-probs (training forward, masked sums over [2m, seq] rows) equal a direct
    computation: each sequence scored alone by inference's `logprobs_of`, summed over its response
    tokens (the prompt and the chat template's header carry no loss)."""
    (cache,) = [p for p in (tiny_dpo.parent / "cache").glob("reference-logps-*.npy") if len(np.load(p)) == 2000]
    proc = run_python("-c", CHECK_LOGPS, str(tiny_sft / "final"), str(PAIRS / "train.jsonl"), str(cache), "24",
                      cwd=workdir, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.asarray(got["direct"]) == pytest.approx(np.asarray(got["cached"]), abs=1e-4)
    assert all(c != r for c, r in got["direct"])


def test_packed_pairs_give_the_unpacked_log_probs_and_learn(workdir, tiny_sft, tiny_dpo):
    """`data.preference.packing`: pairs packed into rows of 2 x seq_length with shared prompts (local
    attention) give the reference log-probs of the unpacked layout, start at log 2 and learn."""
    proc = run_megaflow("train", "dpo", "--config", str(DPO_CONFIG), *_data(tiny_sft), "run.dir=runs/dpo-packed",
                        "data.preference.packing=true", "train.steps=20", "train.micro_batch_size=4",
                        "train.global_batch_size=4", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompts shared: True" in proc.stdout
    caches = {}
    for name in ("pref", "dpo-packed"):
        (caches[name],) = [np.load(p) for p in (workdir / "runs" / name / "cache").glob("reference-logps-*.npy")
                           if len(np.load(p)) == 2000]
    print(f"packed vs unpacked reference log-probs: max |diff| {np.abs(caches['pref'] - caches['dpo-packed']).max():.2e}")
    assert caches["dpo-packed"] == pytest.approx(caches["pref"], abs=1e-4)
    result = json.loads((workdir / "runs" / "dpo-packed" / "dpo" / "eval.json").read_text())
    assert result["before_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["valid_loss"] < result["before_loss"] and result["valid_rewards_accuracies"] > 0.5
