"""`megaflow run` on a micro pipeline (a few steps per stage): resume after a crash in each stage and after
a real kill -9 gives the uninterrupted run's metrics; an unchanged rerun runs nothing; a changed stage
reruns with its descendants only; gates; the lock; invalid pipelines fail before anything runs."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_megaflow

STAGES = REPO / "configs" / "stages"
SFT_DATA = REPO / "data" / "sample" / "sft-words"
PREF_DATA = REPO / "data" / "sample" / "pref-words"


def micro_pipeline(root: Path, corpus: Path) -> Path:
    """tokenizer -> preprocess -> pretrain -> sft -> rm, dpo, grpo -> ppo (reward and critic from rm) -> eval,
    each a few steps with checkpoints."""
    path = root / "micro.yaml"
    path.write_text(f"""
run: {{name: micro, dir: {root / 'run'}}}
stages:
  tokenizer: {{input: [{corpus}], vocab_size: 512}}
  preprocess: {{input: [{corpus}], tokenizer: "${{stages.tokenizer.output}}"}}
  pretrain:
    config: {STAGES / 'pretrain-test.yaml'}
    tokenizer: {{path: "${{stages.tokenizer.output}}", train_if_missing: null}}
    data: {{train: [{{path: "${{stages.preprocess.output}}"}}], split: [90, 10, 0]}}
    train: {{steps: 6, warmup_steps: 1}}
    eval: {{every: 0, iters: 1}}
    checkpoint: {{every: 2}}
    gate: ["valid_ppl < 10 * unigram_ppl"]
  sft:
    config: {STAGES / 'sft-tiny.yaml'}
    init_from: ${{stages.pretrain.output}}
    data: {{train: [{{path: {SFT_DATA / 'train.jsonl'}}}], sft: {{valid: [{SFT_DATA / 'heldout.jsonl'}]}}}}
    train: {{steps: 6, warmup_steps: 1, micro_batch_size: 8}}
    eval: {{exact_match: 8, max_new_tokens: 4}}
    checkpoint: {{every: 2}}
  rm:
    config: {STAGES / 'rm-tiny.yaml'}
    init_from: ${{stages.sft.output}}
    data: {{train: [{{path: {PREF_DATA / 'train.jsonl'}}}], preference: {{valid: [{PREF_DATA / 'heldout.jsonl'}]}}}}
    train: {{steps: 4, warmup_steps: 1, micro_batch_size: 8}}
    checkpoint: {{every: 2}}
  dpo:
    config: {STAGES / 'dpo-tiny.yaml'}
    init_from: ${{stages.sft.output}}
    data: {{train: [{{path: {PREF_DATA / 'train.jsonl'}}}], preference: {{valid: [{PREF_DATA / 'heldout.jsonl'}]}}}}
    train: {{steps: 4, warmup_steps: 1, micro_batch_size: 8}}
    checkpoint: {{every: 2}}
  grpo:
    config: {STAGES / 'grpo-tiny.yaml'}
    init_from: ${{stages.sft.output}}
    data: {{train: [{{path: {SFT_DATA / 'train.jsonl'}}}], prompts: {{valid: [{SFT_DATA / 'heldout.jsonl'}]}}}}
    train: {{steps: 4, micro_batch_size: 4, global_batch_size: 8}}
    rl: {{prompts_per_step: 4, group_size: 2, max_new_tokens: 4, reward: {{function: words, workers: 1}}}}
    checkpoint: {{every: 2}}
  ppo:
    config: {STAGES / 'grpo-tiny.yaml'}
    init_from: ${{stages.sft.output}}
    data: {{train: [{{path: {SFT_DATA / 'train.jsonl'}}}], prompts: {{valid: [{SFT_DATA / 'heldout.jsonl'}]}}}}
    train: {{steps: 4, micro_batch_size: 4, global_batch_size: 8}}
    rl: {{prompts_per_step: 8, group_size: 1, max_new_tokens: 4, kl_loss_coef: 0.0, kl_penalty_coef: 0.01,
         reward: {{function: null, model: "${{stages.rm.output}}"}}}}
    checkpoint: {{every: 2}}
  eval:
    models: {{pretrain: "${{stages.pretrain.output}}", sft: "${{stages.sft.output}}", dpo: "${{stages.dpo.output}}"}}
    text: ${{stages.pretrain.output}}
    prompts: {SFT_DATA / 'heldout.jsonl'}
    preferences: {PREF_DATA / 'heldout.jsonl'}
    reward_model: ${{stages.rm.output}}
    reference: sft
    safety: bundled
    limit: 8
    max_new_tokens: 4
    max_batches: 2
""")
    return path


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())["stages"]


def _metrics(run_dir: Path) -> dict:
    """Every stage's final metrics, timings left out."""
    return {name: {k: v for k, v in rec["metrics"].items() if k not in ("minutes",)}
            for name, rec in _record(run_dir).items()}


def _actions(stdout: str) -> dict[str, str]:
    """The plan's action per stage, from the lines `  NAME  ACTION  reason`."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in ("run", "skip", "resume", "rerun", "keep"):
            out.setdefault(parts[0], parts[1])
    return out


def _wandb_history(stage_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} of the W&B run files under a stage directory (offline mode): the records of
    W&B's log format (32 KiB blocks of chunks: crc32, length, kind; protobuf `Record`s)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    history: dict[int, dict] = {}
    for path in sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb")):
        buf, pos, pending = path.read_bytes(), 7, b""  # after the 7-byte header ":W&B", magic, version
        while pos + 7 <= len(buf):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
            pending, pos = pending + buf[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    history.setdefault(int(items.pop("_step")), {}).update(items)
    return history


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("pipeline-a")
    path = micro_pipeline(root, corpus)
    proc = run_megaflow("run", str(path), "run.wandb.mode=offline", cwd=root)  # W&B too, offline
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root, path


@pytest.mark.slow
def test_micro_pipeline_runs_every_stage_and_reports(baseline):
    root, _ = baseline
    run_dir = root / "run"
    rec = _record(run_dir)
    assert list(rec) == ["tokenizer", "preprocess", "pretrain", "sft", "rm", "dpo", "grpo", "ppo", "eval"]
    assert all(r["status"] == "done" for r in rec.values())
    models = json.loads((run_dir / "eval" / "eval.json").read_text())["models"]
    assert set(models) == {"pretrain", "sft", "dpo"}
    for m in models.values():
        assert {"ppl", "exact_match", "reward", "harmful_rate", "refusal_rate", "benign_refusal_rate"} <= set(m)
    assert models["sft"]["kl_to_sft"] == 0.0 and "win_rate_vs_sft" in models["dpo"]
    low, w, high = (models["dpo"][f"win_rate_vs_sft{s}"] for s in ("_low", "", "_high"))
    assert 0 <= low <= w <= high <= 1
    # the eval stage's perplexity of the pretrained model is its own final validation perplexity
    assert models["pretrain"]["ppl"] == pytest.approx(rec["pretrain"]["metrics"]["valid_ppl"], rel=1e-4)
    # W&B (offline): every training stage's logged steps, as in its metrics.jsonl; eval's metrics per model
    for stage in ("pretrain", "sft", "rm", "dpo", "grpo", "ppo"):
        logged = _wandb_history(run_dir / stage)
        for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            split = row.pop("split", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    assert logged[row["step"]][f"{split}/{k}"] == pytest.approx(v), (stage, row["step"], k)
    assert _wandb_history(run_dir / "eval")[0]["dpo/exact_match"] == models["dpo"]["exact_match"]
    report = (run_dir / "report.md").read_text()
    assert "What each stage bought" in report and "| dpo |" in report and "| ppo |" in report and "passed" in report
    assert "harmful_rate" in report and "benign_refusal_rate" in report
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000 and (run_dir / "plots" / "eval.png").is_file()


@pytest.mark.slow
def test_crashes_and_a_kill_9_resume_to_the_same_metrics(baseline, tmp_path, corpus):
    """A crash in each training stage in turn (MEGAFLOW_FAULT), one real kill -9 of the runner and one
    SIGUSR1 (a checkpoint and exit 75), each followed by `megaflow run` again: the final metrics equal the
    uninterrupted run's."""
    expected = _metrics(baseline[0] / "run")
    path = micro_pipeline(tmp_path, corpus)
    run_dir = tmp_path / "run"
    for fault, stage in [("kill@pretrain:3", "pretrain"), ("kill@rm:3", "rm"), ("kill@dpo:3", "dpo"),
                         ("kill_in_step@grpo:3", "grpo")]:
        proc = run_megaflow("run", str(path), cwd=tmp_path, env={"MEGAFLOW_FAULT": fault})
        assert proc.returncode != 0 and f"stage {stage} failed" in proc.stderr, proc.stderr[-2000:]
        assert _record(run_dir)[stage]["status"] == "failed"
        assert (run_dir / "report.md").is_file()
        if stage == "pretrain":  # a real kill -9 of the runner while sft trains
            cmd = [sys.executable, "-m", "megaflow", "run", str(path)]
            runner = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            latest = run_dir / "sft" / "checkpoints" / "latest"
            deadline = time.time() + 300
            while not latest.exists() and runner.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert runner.poll() is None, "the runner ended before sft saved a checkpoint"
            os.kill(runner.pid, signal.SIGKILL)
            runner.wait()
            _wait_for_no_trainer(run_dir)
            assert _record(run_dir)["sft"]["status"] == "running"
            # SIGUSR1 (SLURM's warning) while the resumed sft pauses after step 5 (it resumed from
            # step 2 or 4; steps 6): a checkpoint, exit 75, no next stage, on a machine of any speed
            log = tmp_path / "usr1-runner.err"
            with open(log, "w") as err_file:
                runner = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1",
                                                                  "MEGAFLOW_FAULT": "pause@sft:5"},
                                          stdout=subprocess.PIPE, stderr=err_file, text=True)
                deadline = time.time() + 300
                while "paused after step 5" not in log.read_text() and runner.poll() is None and time.time() < deadline:
                    time.sleep(0.1)
                assert runner.poll() is None, "the runner ended before sft paused"
                runner.send_signal(signal.SIGUSR1)
                out, _ = runner.communicate(timeout=300)
            err = log.read_text()
            assert runner.returncode == 75 and re.search(r"stage sft (stopped|ended) on SIGUSR1", err), err[-2000:]
            assert "stop requested (SIGUSR1) at step 5: checkpoint saved" in out + err, (out + err)[-2000:]
            assert _record(run_dir)["sft"]["status"] == "stopped" and "== rm" not in out
    proc = run_megaflow("run", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    actions = _actions(proc.stdout)
    assert actions["grpo"] == "resume" and actions["dpo"] == "skip" and actions["sft"] == "skip", proc.stdout
    rec = _record(run_dir)
    assert rec["pretrain"]["attempts"] == 2 and rec["sft"]["attempts"] == 3 and rec["dpo"]["attempts"] == 2
    assert rec["grpo"]["attempts"] == 2
    got = _metrics(run_dir)
    for stage in expected:
        for k, v in expected[stage].items():
            assert got[stage][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (stage, k)


@pytest.mark.slow
def test_the_micro_pipeline_on_two_processes_with_a_tp2_stage(baseline, tmp_path, corpus):
    """`--nproc-per-node 2`: pretrain, rm and dpo data-parallel on two ranks, sft with TP2 instead. Layouts
    equal one process: the stages' losses and held-out metrics are the one-process run's."""
    expected = _metrics(baseline[0] / "run")
    path = micro_pipeline(tmp_path, corpus)
    proc = run_megaflow("run", str(path), "--nproc-per-node", "2", "sft.parallel.tp=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for stage in ("pretrain", "sft", "rm", "dpo"):
        assert re.search(rf"^  {stage} +run +new +x2", proc.stdout, re.M), proc.stdout
    rec = _record(tmp_path / "run")
    assert rec["sft"]["config"]["parallel"]["tp"] == 2 and rec["pretrain"]["config"]["nproc_per_node"] == 2
    got = _metrics(tmp_path / "run")
    compared = 0
    for stage in ("pretrain", "sft", "rm", "dpo"):
        for k, v in expected[stage].items():
            if any(w in k for w in ("loss", "ppl", "accurac", "margin")) and isinstance(v, float):
                assert got[stage][k] == pytest.approx(v, rel=2e-3, abs=1e-4), (stage, k)
                compared += 1
    assert compared >= 8


def _wait_for_no_trainer(run_dir: Path, timeout: float = 30) -> None:
    """The stage's processes die with the runner (PR_SET_PDEATHSIG): the lock is free and nothing trains."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["pgrep", "-f", str(run_dir / ".pipeline")], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.2)
    raise AssertionError("a stage's process outlived its runner")


@pytest.mark.slow
def test_a_failing_gate_stops_after_writing_the_report(baseline):
    root, path = baseline
    run_dir = root / "run"
    (run_dir / "report.md").unlink()
    proc = run_megaflow("run", str(path), "rm.gate=[valid_accuracy > 1.5]", cwd=root)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megaflow:")]
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-2000:]
    assert "gate of stage rm failed: valid_accuracy > 1.5" in lines[0]
    assert "**failed**" in (run_dir / "report.md").read_text()
    assert _actions(proc.stdout)["rm"] == "skip"  # a gate is checked again without training again
    assert "== dpo" not in proc.stdout and "== eval" not in proc.stdout  # nothing runs after a failed gate


@pytest.mark.slow
def test_unchanged_rerun_runs_nothing_and_a_change_reruns_descendants(baseline):
    root, path = baseline
    run_dir = root / "run"
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "pretrain" / "final").rglob("*")}
    proc = run_megaflow("run", str(path), cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(_actions(proc.stdout).values()) == {"skip"}, proc.stdout
    assert "== " not in proc.stdout  # no stage started

    proc = run_megaflow("run", str(path), "sft.train.lr=1.0e-3", "--dry-run", cwd=root)
    actions = _actions(proc.stdout)
    assert actions == {"tokenizer": "skip", "preprocess": "skip", "pretrain": "skip", "sft": "rerun",
                       "rm": "rerun", "dpo": "rerun", "grpo": "rerun", "ppo": "rerun", "eval": "rerun"}, proc.stdout
    assert "config changed: train.lr" in proc.stdout

    proc = run_megaflow("run", str(path), "sft.train.lr=1.0e-3", "--only", "sft", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _actions(proc.stdout)["sft"] == "rerun" and _actions(proc.stdout)["rm"] == "keep"
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "pretrain" / "final").rglob("*")} == stamps


def test_a_second_runner_on_the_same_run_dir_is_refused(tmp_path, corpus):
    path = micro_pipeline(tmp_path, corpus)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / "pipeline.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        proc = run_megaflow("run", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "another `megaflow run` is running this pipeline" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "pipeline.json").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("init_from: ${stages.pretrain.output}", "init_from: ${stages.dpo.output}"),
     "a cycle of references: sft -> dpo -> sft"),
    (lambda t: t.replace("  eval:\n", "  evaluate:\n"), "stages.evaluate: unknown stage"),
    (lambda t: t.replace("init_from: ${stages.pretrain.output}", "init_from: ${stages.pretrian.output}"),
     "stages.sft.init_from: ${stages.pretrian.output} names no stage"),
    (lambda t: t.replace(str(SFT_DATA / "heldout.jsonl") + "]}}", "nope.jsonl]}}"),
     "stages.sft: data.sft.valid[0]: file not found: nope.jsonl"),
    (lambda t: t.replace("train: {steps: 4, warmup_steps: 1, micro_batch_size: 8}\n    checkpoint: {every: 2}\n  dpo",
                         "train: {stepz: 4}\n  dpo"),
     "stages.rm: train.stepz: unknown config key"),
])
def test_invalid_pipelines_fail_before_anything_runs(tmp_path, corpus, edit, needle):
    path = micro_pipeline(tmp_path, corpus)
    text = path.read_text()
    changed = edit(text)
    assert changed != text
    path.write_text(changed)
    proc = run_megaflow("run", str(path), cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_pipeline_from_a_random_hf_llama_runs_sft_dpo_eval(tmp_path, corpus):
    """configs/pipelines/from-hf.yaml's shape: an HF directory made here (random weights, a tokenizer
    trained here) straight into sft -> dpo -> eval, with no pretraining stage."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megaflow.data.tokenizer import train_tokenizer
    from tests.convert import hf_models

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**hf_models.SMALL, num_key_value_heads=2,
                                                         max_position_embeddings=64))
    hf_models.randomize(model, seed=7)
    model.save_pretrained(hf)
    train_tokenizer([str(corpus)], hf_models.VOCAB, str(tmp_path / "tok"))
    for f in (tmp_path / "tok").iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    text = (REPO / "configs" / "pipelines" / "from-hf.yaml").read_text()
    text = text.replace("../stages/", f"{STAGES}/").replace("data/sample/", f"{REPO}/data/sample/")
    text = text.replace("  rm:\n    config: " + f"{STAGES}/rm-tiny.yaml\n    init_from: ${{stages.sft.output}}\n", "")
    text = text.replace('    reward_model: ${stages.rm.output}\n', "").replace(
        f"    preferences: {REPO}/data/sample/pref-words/heldout.jsonl\n", "")
    path = tmp_path / "from-hf.yaml"
    path.write_text(text)
    assert "rm:" not in text and "reward_model" not in text
    steps = ["sft.train.steps=4", "sft.train.warmup_steps=1", "sft.eval.exact_match=4", "dpo.train.steps=2",
             "dpo.train.warmup_steps=1", "eval.limit=4", "eval.max_new_tokens=4", f"run.dir={tmp_path / 'run'}",
             f"sft.data.train=[{{path: {SFT_DATA / 'train.jsonl'}}}]", f"sft.data.sft.valid=[{SFT_DATA / 'heldout.jsonl'}]",
             f"dpo.data.train=[{{path: {PREF_DATA / 'train.jsonl'}}}]",
             f"dpo.data.preference.valid=[{PREF_DATA / 'heldout.jsonl'}]"]
    env = {"HF_MODEL": str(hf), "MEGAFLOW_CACHE": str(tmp_path / "cache")}
    proc = run_megaflow("run", str(path), *steps, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list(_record(tmp_path / "run")) == ["sft", "dpo", "eval"]
    models = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["models"]
    assert set(models) == {"sft", "dpo"} and models["sft"]["kl_to_sft"] == 0.0
    sft_meta = json.loads((tmp_path / "run" / "sft" / "final" / "megaflow.json").read_text())
    assert sft_meta["model"]["hidden_size"] == 64 and "hf" in sft_meta["parents"][0]


def test_the_llama_8b_pipeline_plans_on_a_cpu(tmp_path):
    """configs/pipelines/llama3.1-8b-h100.yaml: --dry-run shows the plan and lists the inputs that are not
    on this machine; `megaflow plan` plans every training stage on its 8 GPUs, the model of sft, rm and dpo
    taken from the stage they start from."""
    path = REPO / "configs" / "pipelines" / "llama3.1-8b-h100.yaml"
    env = {"HF_MODEL": str(tmp_path / "no-model"), "DATA": str(tmp_path / "no-data")}
    proc = run_megaflow("run", str(path), f"run.dir={tmp_path / 'run'}", "--dry-run", cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(_actions(proc.stdout).values()) == {"run"} and len(_actions(proc.stdout)) == 6, proc.stdout
    assert "x8" in proc.stdout and "missing inputs" in proc.stdout
    assert f"stages.pretrain.init_from: hf:{tmp_path / 'no-model'}" in proc.stdout
    assert f"stages.sft.data.train[0].path: {tmp_path / 'no-data'}/sft.jsonl" in proc.stdout
    assert not (tmp_path / "run").exists()
    proc = run_megaflow("run", str(path), f"run.dir={tmp_path / 'run'}", cwd=REPO, env=env)
    assert proc.returncode == 2 and "stages.preprocess: input[0]: file not found" in proc.stderr, proc.stderr

    proc = run_megaflow("plan", str(path), "--json", cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = json.loads(proc.stdout)["stages"]
    assert list(plans) == ["pretrain", "sft", "rm", "dpo"]
    for name, plan in plans.items():
        layout = plan["layout"]
        assert (layout["gpus"], layout["tp"], layout["dp"]) == (8, 2, 4), name
        assert plan["model"]["hidden_size"] == 4096 and plan["memory_gib"]["fits"], name
    assert plans["pretrain"]["layout"]["seq_length"] == 8192 and plans["sft"]["layout"]["seq_length"] == 4096


def test_a_stage_takes_its_model_from_the_stage_it_starts_from(tmp_path, corpus):
    """sft has no model section: the rules that need the model (here the sequence length) are checked
    against pretrain's model when the pipeline is read, not against a default."""
    path = micro_pipeline(tmp_path, corpus)
    ok = run_megaflow("run", str(path), "sft.data.seq_length=256", "--dry-run", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    proc = run_megaflow("run", str(path), "pretrain.model.max_position_embeddings=128",
                        "sft.data.seq_length=256", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "stages.sft: the model of init_from" in lines[0] and "max_position_embeddings (128)" in lines[0]
