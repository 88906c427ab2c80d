"""Resume across parallel layouts: a checkpoint saved in one layout continues in another with the same
loss (1e-5) at the first resumed step as the run that kept its layout."""

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


@pytest.mark.parametrize("name, saved, saved_nproc, resumed, resumed_nproc", [
    ("tp1-to-tp2", [], 1, ["parallel.tp=2"], 2),
    ("tp2pp2-to-tp1", ["parallel.tp=2", "parallel.pp=2"], 4, [], 1),
    ("dp2-to-dp1", [], 2, [], 1),
    # the distributed optimizer's state, kept in the same layout (CPU format dp_reshardable): exact
    ("dp2-distopt-same-layout", ["parallel.distributed_optimizer=true"], 2, ["parallel.distributed_optimizer=true"], 2),
])
def test_resume_in_another_layout(workdir, tiny_pretrain, name, saved, saved_nproc, resumed, resumed_nproc):
    source = f"runs/layout-{name}-a"
    _, original = _train(workdir, tiny_pretrain, source, saved, saved_nproc)  # checkpoint at step 4, runs on to 6
    target = workdir / f"runs/layout-{name}-b"
    shutil.copytree(workdir / source, target)
    shutil.rmtree(target / "pretrain" / "final")
    proc, continued = _train(workdir, tiny_pretrain, str(target.relative_to(workdir)), resumed, resumed_nproc)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    print(f"{name}: step 5 loss {original[5]:.7f} (kept layout) vs {continued[5]:.7f} (resumed in the new one)")
    assert continued[5] == pytest.approx(original[5], abs=1e-5)
    assert continued[6] == pytest.approx(original[6], abs=1e-5)
    if saved == resumed:  # nothing changed: the optimizer state came back, and with it the exact trajectory
        assert "optimizer starts fresh" not in proc.stdout
        assert (continued[5], continued[6]) == (original[5], original[6])
