"""lm-evaluation-harness through megaflow: a local task (no hub download) scored by `megaflow eval
--lm-eval`, and the adapter's log-likelihoods equal transformers' (lm-eval's own HF model) on the same
weights, converted with `megaflow convert megaflow-to-hf`."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, run_megaflow, run_python

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

QUESTIONS = [  # the right choice at every position, so that the accuracy checks the harness' bookkeeping
    ("To be, or not to be, that is the", ["question", "answer", "window"], 0),
    ("Now is the winter of our", ["summer", "discontent", "garden"], 1),
    ("O Romeo, Romeo, wherefore art thou", ["here", "gone", "Romeo"], 2),
    ("Friends, Romans, countrymen, lend me your", ["ears", "hands", "eyes"], 0),
    ("All the world's a", ["house", "stage", "ship"], 1),
    ("A horse! a horse! my kingdom for a", ["crown", "sword", "horse"], 2),
]


def _write_task(d, name: str, answers: list[int]) -> None:
    rows = [{"question": q, "choices": c, "answer": a} for (q, c, _), a in zip(QUESTIONS, answers)]
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / f'{name}.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_task(d, "megaflow_tiny_choice", [a for _, _, a in QUESTIONS])
    return d


@pytest.fixture(scope="module")
def adapter_vs_hf(tiny_pretrain, workdir, tmp_path_factory) -> dict:
    """The adapter's and lm-eval's HF model's answers to the same requests, on the same weights."""
    hf_dir = tmp_path_factory.mktemp("lm_eval_hf") / "hf"
    proc = run_megaflow("convert", "megaflow-to-hf", "--ckpt", str(tiny_pretrain / "final"), "--out", str(hf_dir),
                        cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = f"""
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from megaflow.eval.lm_eval_adapter import MegaflowLM
pairs = {[(q, " " + c) for q, cs, _ in QUESTIONS for c in cs]!r}
reqs = [Instance("loglikelihood", {{}}, p, i) for i, p in enumerate(pairs)]
rolling = [Instance("loglikelihood_rolling", {{}}, (q,), i) for i, (q, _) in enumerate(pairs[::3])]
until = [Instance("generate_until", {{}}, (q, {{"until": ["."], "max_gen_toks": 12, "do_sample": False}}), i)
         for i, (q, _) in enumerate(pairs[::3])]
ours = MegaflowLM(ckpt={str(tiny_pretrain / 'final')!r})
# megaflow documents end with the end-of-document token, so that (not a BOS) is megaflow's prefix
hf = HFLM(pretrained={str(hf_dir)!r}, device="cpu", dtype="float32", batch_size=4, add_bos_token=False,
          prefix_token_id=ours.model.tokenizer.eod_id)
print(json.dumps({{"ours": ours.loglikelihood(reqs), "hf": hf.loglikelihood(reqs),
                  "ours_rolling": ours.loglikelihood_rolling(rolling), "hf_rolling": hf.loglikelihood_rolling(rolling),
                  "ours_gen": ours.generate_until(until), "hf_gen": hf.generate_until(until)}}))
"""
    out = run_python("-c", code, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_task_through_the_cli(tiny_pretrain, task_dir, workdir, adapter_vs_hf):
    """lm-eval's accuracy through the CLI is the share of questions whose key is the choice with the highest
    log-likelihood under the adapter (" " + choice after the question): on the real key, and on a key that
    names the adapter's own pick for the first four questions and another choice for the last two (4/6)."""
    lls = [ll for ll, _ in adapter_vs_hf["ours"]]
    picks = [max(range(3), key=lls[i:i + 3].__getitem__) for i in range(0, len(lls), 3)]
    _write_task(task_dir, "megaflow_tiny_keyed", picks[:4] + [(p + 1) % 3 for p in picks[4:]])
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--lm-eval", "megaflow_tiny_choice,megaflow_tiny_keyed",
                        "--lm-eval-include", str(task_dir), "--json", cwd=workdir, env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)["lm_eval"]
    expected = sum(p == a for p, (_, _, a) in zip(picks, QUESTIONS)) / len(QUESTIONS)
    print(result, "picks", picks)
    assert result["megaflow_tiny_choice"]["acc,none"] == pytest.approx(expected)
    assert result["megaflow_tiny_keyed"]["acc,none"] == pytest.approx(4 / 6)


def test_unknown_task_is_one_line(tiny_pretrain, task_dir, workdir):
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--lm-eval", "no_such_task",
                        "--lm-eval-include", str(task_dir), cwd=workdir)
    assert proc.returncode == 2 and "unknown task(s) no_such_task" in proc.stderr


def test_loglikelihoods_equal_transformers(adapter_vs_hf):
    r = adapter_vs_hf
    diffs = [abs(a[0] - b[0]) for a, b in zip(r["ours"], r["hf"])]
    print(f"max |loglikelihood difference| {max(diffs):.2e} over {len(diffs)} requests; "
          f"rolling {max(abs(a - b) for a, b in zip(r['ours_rolling'], r['hf_rolling'])):.2e}")
    assert max(diffs) < 1e-4
    assert [a[1] for a in r["ours"]] == [b[1] for b in r["hf"]]  # is_greedy
    assert all(abs(a - b) < 1e-4 for a, b in zip(r["ours_rolling"], r["hf_rolling"]))
    print("greedy generations:", r["ours_gen"])
    assert r["ours_gen"] == r["hf_gen"]
