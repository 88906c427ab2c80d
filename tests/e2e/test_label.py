"""`megaflow label` with the tiny pretrained and SFT models, driven over HTTP as the page's script does;
the labels file then feeds a pipeline whose rm stage trains on it. Bad input (prompts that are not JSON, a
checkpoint that does not load, a port in use) is one line each.

A browser test of the page itself (headless Chromium) needs a Chromium on the machine, which these
machines do not have: tests/unit/test_label.py checks the page's escaping, buttons and keys as HTML."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import REPO, run_megaflow

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_label_two_models_then_train_a_reward_model_on_the_labels(workdir, tiny_pretrain, tiny_sft, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    heldout = (REPO / "data/sample/sft-words/heldout.jsonl").read_text().splitlines()[:8]
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n" for line in heldout))
    out = tmp_path / "prefs.jsonl"
    models = [str(tiny_pretrain / "final"), str(tiny_sft / "final")]
    cmd = [sys.executable, "-m", "megaflow", "label", "--models", *models, "--prompts", str(prompts), "--out", str(out),
           "--port", "0", "--max-new-tokens", "8", "--batch", "4"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+/)", line).group(1)
        state = json.loads(urllib.request.urlopen(url + "api/next", timeout=300).read())
        assert state["progress"] == {"done": 0, "total": 8}
        for pick in ["left", "right", "left", "tie", "right", "left", "right", "left"]:
            state = _post(url + "api/choose", {"item": state["item"], "pick": pick})["next"]
        assert state["done"] and state["progress"] == {"done": 8, "total": 8}
    finally:
        # SIGTERM, not SIGINT: a shell starting pytest in the background leaves SIGINT ignored in its children
        proc.send_signal(signal.SIGTERM)
        try:
            rest, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and "8 of 8 labelled" in rest, err[-2000:]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 8 and sum(r["tie"] for r in records) == 1
    assert {r["model_a"] for r in records} == {models[0]} and {r["left"] for r in records} == {"A", "B"}
    # the labels feed a pipeline: a reward model trained on them (the tie skipped and counted)
    pipeline = tmp_path / "labels.yaml"
    pipeline.write_text(f"""
run: {{name: labels, dir: {tmp_path / 'run'}}}
stages:
  rm:
    config: {REPO / 'configs/stages/rm-tiny.yaml'}
    init_from: {models[1]}
    data: {{train: [{{path: {out}}}], preference: {{valid: []}}}}
    train: {{steps: 3, warmup_steps: 1, micro_batch_size: 4, global_batch_size: 4}}
    eval: {{final: false}}
""")
    proc = run_megaflow("run", str(pipeline), cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "skipped 1: 1 tie" in proc.stdout + proc.stderr  # the tie, skipped and counted in the data summary
    assert (tmp_path / "run" / "rm" / "final").is_dir()


def test_label_bad_input_is_one_line(workdir, tiny_sft, tmp_path):
    ckpt = str(tiny_sft / "final")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{oops\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine"}\n')
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    try:
        cases = [(["--models", ckpt, ckpt, "--prompts", str(bad)], f"{bad}:2: not valid JSON"),
                 (["--models", ckpt, str(tmp_path / "nowhere"), "--prompts", str(good)], "not a megaflow final checkpoint"),
                 (["--models", ckpt, ckpt, "--prompts", str(good), "--port", port], f"--port {port}: cannot listen")]
        for args, needle in cases:
            proc = run_megaflow("label", *args, "--out", str(tmp_path / "out.jsonl"), cwd=workdir, timeout=300)
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megaflow:")]
            assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        taken.close()
