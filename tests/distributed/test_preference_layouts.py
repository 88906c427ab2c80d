"""The preference stages' tasks in parallel layouts equal one process: the reward model (scalar head,
Bradley-Terry loss with margin and centering) and DPO (one forward of chosen and rejected rows, cached
reference log-probs) give the same loss and grad norm over 3 optimizer steps (fp32, gloo) to 1e-5, and
the DPO reference pass (megatron's forward-only schedule, each data-parallel replica its share of the
pairs, gathered) gives the same log-probs. TP2 with sequence parallelism exercises the scalar head's
gather; PP2 the pipeline's [2m, seq] micro-batch shapes, and of packed pairs, [m, 2 seq]. Worker: tests/distributed/preference_worker.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import REPO
from tests.distributed.test_layouts import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = REPO / "tests" / "distributed" / "preference_worker.py"
ENV = {"OMP_NUM_THREADS": "1"}
TWO_RANKS = ["tp2-sp", "pp2", "dp2"]  # the engine's other layouts are tests/distributed/test_layouts.py's


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("preference-layouts")
    launch(out, None, "--reference", worker=WORKER, env=ENV, timeout=900)
    launch(out, 2, "--layouts", *TWO_RANKS, worker=WORKER, env=ENV, timeout=900)
    merged = {}
    for name in ("reference", "world2"):
        merged |= json.loads((out / f"results-{name}.json").read_text())
    return merged


@pytest.mark.parametrize("task", ["rm", "dpo", "dpo-packed"])
@pytest.mark.parametrize("layout", TWO_RANKS)
def test_preference_task_equals_one_process(results, task, layout):
    ref, run = results[f"{task}/reference"], results[f"{task}/{layout}"]
    for step, (l1, l2, g1, g2) in enumerate(zip(ref["loss"], run["loss"], ref["grad_norm"], run["grad_norm"]), 1):
        print(f"{task} {layout} step {step}: loss {l1:.7f} vs {l2:.7f}, grad norm {g1:.7f} vs {g2:.7f}")
        assert l2 == pytest.approx(l1, abs=1e-5)
        assert g2 == pytest.approx(g1, abs=1e-5)
    assert run["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
    assert ref["loss"][-1] != ref["loss"][0] and min(ref["grad_norm"]) > 0  # the updates move the model
    tp, pp = {"tp2-sp": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}[layout]
    assert all((r["tp"], r["pp"]) == (tp, pp) for r in run["ranks"])
    if task.startswith("dpo"):
        assert np.asarray(run["ref_logps"]) == pytest.approx(np.asarray(ref["ref_logps"]), rel=1e-6, abs=1e-5)
        assert ref["loss"][0] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at step 1


def test_packed_pairs_give_the_unpacked_reference_log_probs(results):
    """Pairs packed with shared prompts (rows of 2 x seq, the local attention's pair mask, RoPE at each
    branch's positions) give every pair's summed response log-probs of the unpacked layout."""
    packed, unpacked = (np.asarray(results[f"{t}/reference"]["ref_logps"]) for t in ("dpo-packed", "dpo"))
    assert packed == pytest.approx(unpacked, rel=1e-6, abs=1e-5)  # sums of ~-80 in float32
