"""The SDPA core attention (megaflow.models.attention) equals megatron's unfused DotProductAttention to
1e-5 in fp32, in loss and in every gradient: MHA and GQA, causal rows, packed SFT rows and packed DPO
pairs, a non-default softmax scale, on one process, TP2 and TP2 + SP. One 2-rank launch; worker:
tests/distributed/attention_worker.py. (Cached generation against uncached runs on the SDPA default in
tests/e2e/test_generate.py.)"""

from __future__ import annotations

import json

import pytest

from tests.distributed.test_layouts import launch
from tests.conftest import REPO

pytestmark = [pytest.mark.distributed]

WORKER = REPO / "tests" / "distributed" / "attention_worker.py"
LAYOUTS = ("tp1", "tp2", "tp2-sp")
CASES = ("mha-causal", "mha-packed-sft", "mha-packed-dpo", "gqa-causal", "gqa-packed-sft", "gqa-packed-dpo",
         "gqa-causal-scale0.3")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    launch(out, 2, worker=WORKER)
    return json.loads((out / "attention.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_equals_unfused_in_loss_and_gradients(results, layout):
    cases = results[layout]
    assert set(cases) == set(CASES)
    for name, r in cases.items():
        assert r["params"] >= 10 and r["grad_norm"] > 1.0, name  # real gradients of every weight
        assert r["loss_rel_diff"] < 1e-5, (name, r)
        assert r["grad_rel_diff"] < 1e-5, (name, r)
        # the result is the layout's own, and equals one process (the layout tests' property, here per case)
        assert abs(r["loss_unfused"] - results["tp1"][name]["loss_unfused"]) < 1e-5 * r["loss_unfused"], name


def test_the_masks_matter(results):
    """Control: the packed rows attended causally across their samples give another loss, so the equality
    above includes the block-diagonal and pair masks."""
    for layout in LAYOUTS:
        for name, r in results[layout].items():
            if "packed" in name:
                assert r["control_no_mask_rel_diff"] > 1e-4, (layout, name, r)


def test_attention_dropout_follows_the_config(results):
    assert results["dropout"] == {"train_runs_differ": True, "eval_runs_equal": True, "train_differs_from_eval": True}
