"""PPO and GRPO end to end on the tiny verifiable task, from an SFT model that has stopped improving.

The task: megaflow's synthetic instructions (copy, first and last word) whose training demonstrations
are 40% wrong (megaflow.data.synthetic, `noise=0.4`; each record keeps the right `answer`). SFT imitates
the demonstrations and plateaus (shown: its held-out exact match after N and after N + more steps);
RL with the exact-match reward against the right answers sees through them. Also: a reward function that
raises or hangs is counted and shown (and past the allowed rate stops the stage); a kill -9 in the middle
of an iteration resumes onto the same trajectory bitwise.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests.conftest import REPO, SFT_CONFIG, run_megaflow

pytestmark = [pytest.mark.slow]

GRPO_CONFIG = REPO / "configs" / "stages" / "grpo-tiny.yaml"
RM_CONFIG = REPO / "configs" / "stages" / "rm-tiny.yaml"
PAIRS = REPO / "data" / "sample" / "pref-words"
HELD_OUT = REPO / "data" / "sample" / "sft-words" / "heldout.jsonl"


def _rows(stage_dir) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _eval(stage_dir) -> dict:
    return json.loads((stage_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def noisy():
    """The bundled 40%-wrong demonstrations (tools/make_sft_data.py --noise 0.4), the right answers kept."""
    return REPO / "data" / "sample" / "sft-words-noisy" / "train.jsonl"


def _sft(workdir, init, data, run_dir, steps, *extra):
    proc = run_megaflow("train", "sft", "--config", str(SFT_CONFIG), f"init_from={init}", f"data.train=[{{path: {data}}}]",
                        f"data.sft.valid=[{HELD_OUT}]", f"run.dir={run_dir}", f"train.steps={steps}",
                        "checkpoint.every=0", *extra, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / run_dir / "sft"


@pytest.fixture(scope="module")
def plateau_sft(workdir, tiny_pretrain, noisy):
    """SFT on the noisy demonstrations to its plateau: 600 steps (cosine to min_lr), then 300 more from
    there at that rate; the held-out exact match no longer rises."""
    first = _sft(workdir, tiny_pretrain / "final", noisy, "runs/rl-sft-a", 600)
    second = _sft(workdir, first / "final", noisy, "runs/rl-sft-b", 300, "train.lr=3e-4", "train.schedule=constant",
                  "train.warmup_steps=0")
    a, b = _eval(first)["exact_match"], _eval(second)["exact_match"]
    print(f"SFT on 40%-wrong demonstrations: held-out exact match {a:.3f} after 600 steps, {b:.3f} after 300 more")
    assert b - a <= 0.08, "the SFT model is not at its plateau"  # 200 examples: one standard error is ~0.035
    return second, b - a


@pytest.fixture(scope="module")
def plateau_rm(workdir, plateau_sft):
    proc = run_megaflow("train", "rm", "--config", str(RM_CONFIG), f"init_from={plateau_sft[0] / 'final'}",
                        f"data.train=[{{path: {PAIRS / 'train.jsonl'}}}]", f"data.preference.valid=[{PAIRS / 'heldout.jsonl'}]",
                        "run.dir=runs/rl-rm-plateau", "train.steps=150", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / "rl-rm-plateau" / "rm"


def _rl(workdir, algo, sft, noisy, run_dir, *extra, env=None):
    args = ["train", algo, "--config", str(GRPO_CONFIG), f"init_from={sft / 'final'}", f"data.train=[{{path: {noisy}}}]",
            f"data.prompts.valid=[{HELD_OUT}]", f"run.dir={run_dir}", "rl.reward.function=exact_match", *extra]
    return run_megaflow(*args, cwd=workdir, env=env, timeout=1200)  # 150 iterations: ~1.3 min on 2 quiet cores


def _learning(algo, stage_dir, minutes, sft_gain):
    rows, result = _rows(stage_dir), _eval(stage_dir)
    first = sum(r["reward/mean"] for r in rows[:20]) / 20
    last = sum(r["reward/mean"] for r in rows[-20:]) / 20
    print(f"{algo}: {len(rows)} iterations in {minutes:.2f} min; mean training reward {first:.3f} (first 20) -> "
          f"{last:.3f} (last 20); held-out exact match {result['before_exact_match']:.3f} -> "
          f"{result['valid_exact_match']:.3f}, reward {result['before_reward']:.3f} -> {result['valid_reward']:.3f} "
          f"(300 more SFT steps had bought {sft_gain:+.3f})")
    gain = result["valid_exact_match"] - result["before_exact_match"]
    assert last >= first + 0.1
    assert gain >= 0.1 and gain >= 2 * sft_gain


def test_grpo_raises_reward_and_exact_match_past_the_sft_plateau(workdir, plateau_sft, noisy):
    sft, sft_gain = plateau_sft
    t0 = time.time()
    proc = _rl(workdir, "grpo", sft, noisy, "runs/rl-grpo", "train.steps=150", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _learning("grpo", workdir / "runs" / "rl-grpo" / "grpo", (time.time() - t0) / 60, sft_gain)


def test_ppo_raises_reward_and_exact_match_past_the_sft_plateau(workdir, plateau_sft, plateau_rm, noisy):
    sft, sft_gain = plateau_sft
    t0 = time.time()
    proc = _rl(workdir, "ppo", sft, noisy, "runs/rl-ppo", "train.steps=150", "checkpoint.every=0",
               f"rl.critic_from={plateau_rm / 'final'}", "rl.group_size=1", "rl.prompts_per_step=32",
               "rl.kl_penalty_coef=0.01", "rl.kl_loss_coef=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _learning("ppo", workdir / "runs" / "rl-ppo" / "ppo", (time.time() - t0) / 60, sft_gain)


BAD_REWARD = '''
import time

def reward(prompt, response, answer=None, task=None, **fields):
    if task == "copy":
        raise ValueError("no copies today")
    if task == "first":
        time.sleep(60)
    return float(response.strip() == answer.strip())
'''


def test_a_reward_that_raises_or_hangs_is_counted_shown_and_gated(workdir, plateau_sft, noisy, tmp_path):
    (tmp_path / "bad.py").write_text(BAD_REWARD)
    common = [f"rl.reward.function={tmp_path / 'bad.py'}:reward", "rl.reward.timeout=1", "train.steps=1",
              "rl.prompts_per_step=6", "rl.group_size=2", "train.global_batch_size=12", "train.micro_batch_size=6",
              "data.prompts.valid=[]"]
    proc = _rl(workdir, "grpo", plateau_sft[0], noisy, tmp_path / "run", *common, "rl.reward.max_failure_rate=1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _rows(tmp_path / "run" / "grpo")[0]
    print({k: v for k, v in row.items() if k.startswith("reward")})
    assert row["reward/failed_error"] > 0 and row["reward/failed_timeout"] > 0
    assert row["reward/failure_rate"] == pytest.approx((row["reward/failed_error"] + row["reward/failed_timeout"]) / 12)
    shown = proc.stdout + proc.stderr
    assert "calls failed at iteration 1" in shown and "ValueError: no copies today" in shown and "no result within 1 s" in shown
    proc = _rl(workdir, "grpo", plateau_sft[0], noisy, tmp_path / "run2", *common)
    assert proc.returncode != 0
    assert any("rl.reward" in line and "max_failure_rate" in line for line in proc.stderr.splitlines()), proc.stderr
    assert "Traceback" not in proc.stderr


def _weights_digest(final) -> str:
    """The tensors' bytes (dist-checkpointing's .distcp files; its .metadata pickle holds run-specific ids)."""
    h = hashlib.sha256()
    for p in sorted((final / "weights").rglob("*.distcp")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_kill_9_mid_iteration_resumes_bitwise(workdir, plateau_sft, plateau_rm, noisy, tmp_path):
    """PPO with an adaptive KL controller, checkpoints every 2 iterations: killed in the middle of
    iteration 3, then rerun; iterations 3-4 and the final weights equal an uninterrupted run's exactly."""
    common = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "data.prompts.valid=[]",
              f"rl.critic_from={plateau_rm / 'final'}", "rl.kl_penalty_coef=0.05", "rl.kl_target=0.01",
              "rl.kl_horizon=100", "rl.epochs=2", "train.global_batch_size=16", "rl.prompts_per_step=8"]
    whole = tmp_path / "whole"
    proc = _rl(workdir, "ppo", plateau_sft[0], noisy, whole, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = tmp_path / "broken"
    proc = _rl(workdir, "ppo", plateau_sft[0], noisy, broken, *common, env={"MEGAFLOW_FAULT": "kill_in_step@ppo:3"})
    assert proc.returncode == -9
    proc = _rl(workdir, "ppo", plateau_sft[0], noisy, broken, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "resumed critic from" in proc.stdout
    a, b = _rows(whole / "ppo"), _rows(broken / "ppo")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    skip = ("step_time", "tok_per_s", "mfu", "gen_tok_per_s")
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in skip and not k.startswith("time/")} == \
               {k: v for k, v in y.items() if k not in skip and not k.startswith("time/")}
    assert a[-1]["kl/coef"] != 0.05  # the controller moved, and resumed where it was
    assert _weights_digest(whole / "ppo" / "final") == _weights_digest(broken / "ppo" / "final")


@pytest.mark.parametrize("overrides, message", [
    (["rl.reward=null"], "rl.reward: the grpo stage needs a reward"),
    (["rl.reward.function=nofile.py:fn"], "rl.reward.function: file not found: nofile.py"),
    (["rl.reward.function=words.txt"], "rl.reward.function: expected FILE.py:FUNCTION"),
    (["rl.reward.model=x"], "rl.reward: set exactly one of"),
    (["rl.group_size=1"], "rl.group_size=1: group advantages (grpo) need at least 2"),
    (["train.global_batch_size=24", "train.micro_batch_size=8"], "train.global_batch_size (24) must divide the rollouts"),
    (["rl.max_new_tokens=64"], "data.seq_length (64) must exceed rl.max_new_tokens (64)"),
    (["rl.advantage=gae"], "rl.advantage=gae needs a critic"),
    (["eval.every=5"], "eval.every: the grpo stage evaluates"),
])
def test_grpo_bad_config_is_one_line_before_anything_runs(tmp_path, overrides, message):
    proc = run_megaflow("train", "grpo", "--config", str(GRPO_CONFIG), f"run.dir={tmp_path / 'run'}", *overrides,
                        cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_ppo_without_a_critic_start_is_one_line(tmp_path):
    proc = run_megaflow("train", "ppo", "--config", str(GRPO_CONFIG), f"run.dir={tmp_path / 'run'}", cwd=REPO)
    assert proc.returncode == 2 and "rl.critic_from: PPO's critic starts from a reward model" in proc.stderr


def test_a_prompt_file_that_is_not_json_names_its_line(workdir, plateau_sft, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "What is the first word?\\nthou\\nart", "answer": "thou"}\n{"prompt": oops}\n')
    proc = _rl(workdir, "grpo", plateau_sft[0], bad, tmp_path / "run", "train.steps=1", "data.prompts.valid=[]")
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
