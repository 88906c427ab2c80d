"""Every parallel layout equals one process: loss and grad norm over 3 optimizer steps (fp32, gloo) match
the single-process run of the same weights and batches to 1e-5, and each layout is checked to be real
(process-group sizes, layers and parameter shards per rank). Three launches in all: the reference (and
full and selective recomputation), a 2-rank world (TP2, PP2, PP2xVPP2, DP2, TP2+SP, DP2 + distributed
optimizer, also with overlapped grad reduce and param gather, and the context-parallel split) and a
4-rank world (TP2xPP2, TP2xDP2, PP2xDP2). Worker: tests/distributed/layout_worker.py."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, run_python

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = REPO / "tests" / "distributed" / "layout_worker.py"
ONE_RANK = ["recompute-full", "recompute-selective"]
TWO_RANKS = ["tp2", "pp2", "pp2-vpp2", "dp2", "tp2-sp", "dp2-distopt", "dp2-distopt-overlap"]
FOUR_RANKS = ["tp2-pp2", "tp2-dp2", "pp2-dp2"]
# (tp, pp, dp, model chunks per rank, sequence parallel, distributed optimizer)
EXPECTED = {
    "tp2": (2, 1, 1, 1, False, False),
    "pp2": (1, 2, 1, 1, False, False),
    "pp2-vpp2": (1, 2, 1, 2, False, False),
    "dp2": (1, 1, 2, 1, False, False),
    "tp2-sp": (2, 1, 1, 1, True, False),
    "dp2-distopt": (1, 1, 2, 1, False, True),
    "dp2-distopt-overlap": (1, 1, 2, 1, False, True),
    "recompute-full": (1, 1, 1, 1, False, False),
    "recompute-selective": (1, 1, 1, 1, False, False),
    "tp2-pp2": (2, 2, 1, 1, False, False),
    "tp2-dp2": (2, 1, 2, 1, False, False),
    "pp2-dp2": (1, 2, 2, 1, False, False),
}


def launch(out, nproc: int | None, *args: str, worker=WORKER, env: dict | None = None, timeout: int = 600) -> None:
    """Run a worker script in one process (nproc None) or under torchrun with nproc ranks."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), **(env or {})}
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = run_python(*launcher, str(worker), "--out", str(out), *args, cwd=REPO, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    launch(out, None, "--reference", "--layouts", *ONE_RANK)
    launch(out, 2, "--layouts", *TWO_RANKS, "--cp-check")
    launch(out, 4, "--layouts", *FOUR_RANKS)
    merged = {}
    for name in ("reference", "world2", "world4"):
        merged |= json.loads((out / f"results-{name}.json").read_text())
    assert set(merged) >= set(EXPECTED)
    return merged


@pytest.mark.parametrize("layout", ONE_RANK + TWO_RANKS + FOUR_RANKS)
def test_layout_equals_one_process(results, layout):
    ref, run = results["reference"], results[layout]
    for step, (l1, l2, g1, g2) in enumerate(zip(ref["loss"], run["loss"], ref["grad_norm"], run["grad_norm"]), 1):
        print(f"{layout} step {step}: loss {l1:.7f} vs {l2:.7f}, grad norm {g1:.7f} vs {g2:.7f}")
        assert l2 == pytest.approx(l1, abs=1e-5)
        assert g2 == pytest.approx(g1, abs=1e-5)
    assert len(run["loss"]) == 3
    assert ref["loss"][-1] < ref["loss"][0]  # the reference does learn


@pytest.mark.parametrize("layout", ONE_RANK + TWO_RANKS + FOUR_RANKS)
def test_layout_is_real(results, layout):
    """Group sizes, layers and parameter shards per rank are those of the layout, not of one process."""
    tp, pp, dp, chunks, sp, distopt = EXPECTED[layout]
    full = results["reference"]["ranks"][0]
    ranks = results[layout]["ranks"]
    assert len(ranks) == tp * pp * dp
    for r in ranks:
        assert (r["tp"], r["pp"], r["dp"], r["chunks"]) == (tp, pp, dp, chunks), r
        assert r["layers"] == full["layers"] // pp  # layers over this rank's chunks
        assert r["qkv_rows"] == full["qkv_rows"] // tp  # the attention projection is sharded over TP
        assert r["sequence_parallel"] is sp
    # the embedding lives on the first pipeline stage only, the output layer on the last only
    assert sum(r["has_embedding"] for r in ranks) == tp * dp
    assert sum(r["has_output"] for r in ranks) == tp * dp
    if tp == 1:  # without TP sharding, the stages of one replica hold the whole model exactly once
        assert sum(r["params_here"] for r in ranks) == full["params_here"] * dp
    if distopt:  # each DP rank's optimizer updates only its shard of the parameters
        assert all(r["optimizer_numel"] < r["params_here"] for r in ranks)
        assert sum(r["optimizer_numel"] for r in ranks) == full["params_here"]
    else:
        assert all(r["optimizer_numel"] == r["params_here"] for r in ranks)
    recompute = layout.removeprefix("recompute-") if layout.startswith("recompute-") else None
    overlap = layout.endswith("-overlap")
    assert all(r["recompute"] == recompute and r["overlap"] == [overlap, overlap] for r in ranks)


def test_context_parallel_split_and_loss_reduction(results):
    """Context parallelism runs only with TE attention (GPU); its batch split and the engine's loss
    reduction are checked here on a CP group of 2: every position on exactly one rank, in the balanced
    zigzag (rank 0: chunks 0 and 3), and the reduced loss and token count equal the full sequence's."""
    cp = results["cp2-split"]
    assert cp["cp"] == 2
    rank0, rank1 = cp["positions_per_rank"]
    seq = len(rank0) + len(rank1)
    quarter = seq // 4
    assert sorted(rank0 + rank1) == list(range(seq))
    assert rank0 == list(range(quarter)) + list(range(3 * quarter, seq))
    assert rank1 == list(range(quarter, 3 * quarter))
    assert cp["tokens_match"] and cp["labels_match"]
    assert cp["reduced_tokens"] == cp["full_tokens"]
    assert cp["reduced_loss"] == pytest.approx(cp["full_loss"], abs=1e-6)
