"""Two data-parallel ranks on gloo (with and without the distributed optimizer) give the single-process
loss and grad norm."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TEST_CONFIG, run_megaflow

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(workdir, tiny_pretrain, name, *extra):
    common = [
        "train.steps=4", "train.warmup_steps=1", "eval.every=0", "eval.final=false", "checkpoint.every=0", f"run.dir=runs/{name}",
        f"tokenizer.path={tiny_pretrain / 'final' / 'tokenizer'}", f"data.cache_dir={tiny_pretrain.parent / 'data'}",
    ]
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), *common, *extra, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "runs" / name / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows]


def test_dp2_equals_single_process(workdir, tiny_pretrain):
    single = _run(workdir, tiny_pretrain, "dp1")
    layouts = {
        "dp2": _run(workdir, tiny_pretrain, "dp2", "--nproc-per-node", "2"),
        "dp2 + distributed optimizer": _run(workdir, tiny_pretrain, "dp2-dopt", "--nproc-per-node", "2",
                                            "parallel.distributed_optimizer=true"),
    }
    for name, run in layouts.items():
        assert len(run) == len(single) == 4
        for step, ((l1, g1), (l2, g2)) in enumerate(zip(single, run), 1):
            print(f"{name} step {step}: loss {l1:.7f} vs {l2:.7f}, grad norm {g1:.6f} vs {g2:.6f}")
            assert l2 == pytest.approx(l1, abs=1e-5)
            assert g2 == pytest.approx(g1, rel=1e-5)
    assert single[-1][0] < single[0][0]  # and it trains
