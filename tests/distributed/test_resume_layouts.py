"""Resume across parallel layouts: a checkpoint saved in one layout continues in another with the same
loss (1e-5) at the first resumed step as the run that kept its layout. Each saved layout trains once
(`saved_run`); every resume starts from a copy of it."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import TEST_CONFIG, run_megaflow

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train(workdir, tiny_pretrain, run_dir, layout: list[str], nproc: int):
    args = ["train", "pretrain", "--config", str(TEST_CONFIG), "train.steps=6", "train.warmup_steps=1",
            "eval.every=0", "eval.final=false", "checkpoint.every=4", f"run.dir={run_dir}",
            f"tokenizer.path={tiny_pretrain / 'final' / 'tokenizer'}", f"data.cache_dir={tiny_pretrain.parent / 'data'}",
            *layout, *(["--nproc-per-node", str(nproc)] if nproc > 1 else [])]
    proc = run_megaflow(*args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return proc, {r["step"]: r["loss"] for r in rows if "split" not in r}


@pytest.fixture(scope="module")
def saved_run(workdir, tiny_pretrain):
    """(run dir, step -> loss) of the run in a saved layout: checkpoint at step 4, on to step 6; trained
    once per layout and module."""
    runs = {}

    def get(layout: list[str], nproc: int):
        key = (tuple(layout), nproc)
        if key not in runs:
            source = f"runs/layout-saved-{len(runs)}"
            runs[key] = source, _train(workdir, tiny_pretrain, source, layout, nproc)[1]
        return runs[key]

    return get


def _resume_copy(workdir, tiny_pretrain, source: str, name: str, layout: list[str], nproc: int):
    """A copy of the saved run without its final checkpoint, trained on from its step-4 checkpoint."""
    target = workdir / f"runs/layout-{name}"
    shutil.copytree(workdir / source, target)
    shutil.rmtree(target / "pretrain" / "final")
    return _train(workdir, tiny_pretrain, str(target.relative_to(workdir)), layout, nproc)


DISTOPT = ["parallel.distributed_optimizer=true"]
DP_RESHARDABLE = [*DISTOPT, "checkpoint.optimizer_format=dp_reshardable"]


@pytest.mark.parametrize("name, saved, saved_nproc, resumed, resumed_nproc", [
    ("tp1-to-tp2", [], 1, ["parallel.tp=2"], 2),
    ("tp2pp2-to-tp1", ["parallel.tp=2", "parallel.pp=2"], 4, [], 1),
    ("dp2-to-dp1", [], 2, [], 1),
    # the distributed optimizer's state, saved fully_reshardable (the default): carried into other DP and
    # TP sizes (megatron's torch-Adam fallback needs megaflow.runtime.cpu's load fix for this on a CPU)
    ("dp2-distopt-to-dp1", DISTOPT, 2, DISTOPT, 1),
    ("dp2-distopt-to-tp2", DISTOPT, 2, [*DISTOPT, "parallel.tp=2"], 2),
    # kept in the same layout: exact, in both formats
    ("dp2-distopt-same-layout", DISTOPT, 2, DISTOPT, 2),
    ("dp2-dp-reshardable-same-layout", DP_RESHARDABLE, 2, DP_RESHARDABLE, 2),
])
def test_resume_in_another_layout(workdir, tiny_pretrain, saved_run, name, saved, saved_nproc, resumed, resumed_nproc):
    source, original = saved_run(saved, saved_nproc)
    proc, continued = _resume_copy(workdir, tiny_pretrain, source, name, resumed, resumed_nproc)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    print(f"{name}: step 5 loss {original[5]:.7f} (kept layout) vs {continued[5]:.7f} (resumed in the new one)")
    assert "optimizer starts fresh" not in proc.stdout  # its state came back (step 6 depends on it)
    assert continued[5] == pytest.approx(original[5], abs=1e-5)
    assert continued[6] == pytest.approx(original[6], abs=1e-5)
    # the same layout gives the exact trajectory; so does the plain optimizer from DP2 to DP1 (the
    # distributed optimizer's reduce-scatter sums the gradients in another order: 1e-7)
    if saved == resumed and (saved_nproc == resumed_nproc or not saved):
        assert (continued[5], continued[6]) == (original[5], original[6])


def test_dp_reshardable_optimizer_starts_fresh_in_another_layout(workdir, tiny_pretrain, saved_run):
    """A dp_reshardable optimizer state cannot follow a layout change: one warning, the weights load, and
    the optimizer starts fresh (so step 5, which depends only on the weights, still matches)."""
    source, original = saved_run(DP_RESHARDABLE, 2)
    proc, continued = _resume_copy(workdir, tiny_pretrain, source, "dp-reshardable-to-dp1", DP_RESHARDABLE, 1)
    assert "at step 4" in proc.stdout and "the optimizer starts fresh" in proc.stdout
    assert continued[5] == pytest.approx(original[5], abs=1e-5)
