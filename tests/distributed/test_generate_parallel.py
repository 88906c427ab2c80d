"""Generation and scoring under tensor and pipeline parallelism equal one process: greedy tokens (KV
cache and recomputed), seeded samples, the decode's and the scorer's log-probs (to 1e-5, fp32), on the
tiny pretrained checkpoint. One torchrun launch of 2 ranks runs every layout (tests/distributed/
generate_worker.py): the reference (tp=1, pp=1: each rank alone, as a single process), TP2, PP2, and TP2
chunks built with sequence parallelism and wrapped by InferenceModel.from_chunks (PPO's case)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, run_python

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = REPO / "tests" / "distributed" / "generate_worker.py"
PARALLEL = ["tp2", "pp2", "tp2-sp-chunks"]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tiny_pretrain, tmp_path_factory):
    out = tmp_path_factory.mktemp("generate-parallel") / "results.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
                      "--ckpt", str(tiny_pretrain / "final"), "--out", str(out), cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def test_reference_is_consistent(results):
    """The reference itself: KV cache == recomputation, decode log-probs == training-forward log-probs."""
    ref = results["single"][0]
    assert ref["greedy"] == ref["uncached"]
    assert all(len(t) == 16 for t in ref["greedy"])
    assert all(ref["is_greedy"])
    assert _max_diff(ref["decode_logprobs"], ref["score_logprobs"]) < TOL
    assert _max_diff(ref["sampled_logprobs"], ref["sampled_full"]) < TOL
    assert ref["sampled"] != ref["greedy"]  # temperature sampling really sampled
    assert results["single"][1] == ref  # the other rank ran the same single-process model


@pytest.mark.parametrize("layout", PARALLEL)
def test_parallel_generation_equals_one_process(results, layout):
    ref = results["single"][0]
    for rank, run in enumerate(results[layout]):
        print(f"{layout} rank {rank}: {run['greedy'][0][:8]} vs {ref['greedy'][0][:8]}")
        assert run["greedy"] == ref["greedy"]
        assert run["uncached"] == ref["greedy"]
        assert run["sampled"] == ref["sampled"]
        assert run["is_greedy"] == ref["is_greedy"]
        for key in ("decode_logprobs", "score_logprobs", "full_logprobs", "sampled_logprobs", "sampled_full"):
            assert _max_diff(run[key], ref[key]) < TOL, key
    # every rank of the replica returns the same completions (broadcast from the last stage)
    first, second = results[layout]
    assert {k: v for k, v in first.items() if k != "facts"} == {k: v for k, v in second.items() if k != "facts"}


@pytest.mark.parametrize("layout", PARALLEL)
def test_layout_is_real(results, layout):
    full = results["single"][0]["facts"]
    facts = [r["facts"] for r in results[layout]]
    tp = 2 if layout.startswith("tp2") else 1
    pp = 2 if layout.startswith("pp2") else 1
    assert all((f["tp"], f["pp"]) == (tp, pp) for f in facts)
    assert sum(f["layers"] for f in facts) == full["layers"] * tp  # pp2: half the layers each
    assert sum(f["first"] for f in facts) == tp and sum(f["last"] for f in facts) == tp
    if tp == 2:  # the output layer (vocab) is split over TP ranks
        assert all(f["output_rows"] == full["output_rows"] // 2 for f in facts)


def test_sequence_parallel_chunks_restored(results):
    """from_chunks switched SP off (a decode step has one token) and training mode, and back after."""
    assert all(r["restored"] for r in results["tp2-sp-chunks"])
