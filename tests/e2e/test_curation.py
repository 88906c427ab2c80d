"""Curation as a pipeline stage: the bundled raw corpus (data/sample/curate-raw: the sample's speeches plus
planted duplicates and junk) through `curate`, then `pretrain` on the curated shards, with
configs/pipelines/curate-tiny.yaml as the README runs it (a few pretraining steps here)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from tests.conftest import REPO, run_megaflow

pytestmark = pytest.mark.slow
RAW = REPO / "data" / "sample" / "curate-raw" / "train.jsonl.gz"


def test_curate_then_pretrain_is_a_two_stage_pipeline(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_megaflow("run", str(REPO / "configs" / "pipelines" / "curate-tiny.yaml"), f"run.dir={run_dir}",
                        f"pretrain.tokenizer.path={tmp_path / 'tokenizer'}", "pretrain.train.steps=6",
                        "pretrain.train.warmup_steps=1", "pretrain.eval.every=0", "pretrain.checkpoint.every=0",
                        "pretrain.gate=[]", cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert list(stages) == ["curate", "pretrain"] and all(s["status"] == "done" for s in stages.values())
    m = stages["curate"]["metrics"]
    print({k: v for k, v in m.items() if isinstance(v, (int, float))})
    # what was planted (`kind` in the raw records) against what survived
    kinds = [json.loads(line)["kind"] for line in gzip.open(RAW, "rt")]
    kept = Counter()
    for shard in (run_dir / "curate" / "data").glob("*.jsonl.gz"):
        for line in gzip.open(shard, "rt"):
            kept[kinds[int(json.loads(line)["id"].rsplit("#", 1)[1])]] += 1
    total = Counter(kinds)
    print("kept of each kind:", {k: f"{kept[k]}/{total[k]}" for k in total})
    assert kept["junk"] <= 0.01 * total["junk"] and kept["original"] >= 0.7 * total["original"]
    assert m["exact_duplicates"] >= 0.8 * total["exact"] and m["near_duplicates"] > 0
    assert m["documents_in"] == len(kinds) and m["documents_out"] == sum(kept.values())
    # pretrain read the curated shards, all of them and nothing else, through one preprocess
    (meta,) = [json.loads(p.read_text()) for p in (run_dir / "data").glob("*.json") if "stats" in p.read_text()]
    assert meta["stats"]["documents"] == m["documents_out"] and meta["stats"]["files"] == 2
    assert (run_dir / "pretrain" / "final").is_dir()
    report = (run_dir / "report.md").read_text()
    assert "| curate |" in report


FAKE_SBATCH = """#!/bin/bash
# sbatch stand-in: keeps the script and its options, answers with a job id
n=$(printf %03d $(( $(ls "$FAKE_SLURM"/*.sbatch 2>/dev/null | wc -l) + 1 )))
cp "${@: -1}" "$FAKE_SLURM/$n.sbatch"
printf '%s\\n' "${@:1:$#-1}" > "$FAKE_SLURM/$n.args"
echo "Submitted batch job $n"
"""
FAKE_SRUN = """#!/bin/bash
while [ "${1#-}" != "$1" ]; do [ "$1" = -n ] && shift; shift; done
exec "$@"
"""
FAKE_SCONTROL = "#!/bin/bash\necho localhost\n"


def test_the_slurm_executor_submits_the_same_steps_and_its_jobs_write_what_a_local_run_does(tmp_path):
    """`executor=slurm` with stand-ins for sbatch, srun and scontrol: six job arrays (and datatrove's stats
    merges) chained by afterok dependencies; running each array's tasks in order, as SLURM would, gives the
    local run's shards."""
    import os
    import re
    import subprocess
    import sys

    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    raw = tmp_path / "raw.jsonl.gz"
    with gzip.open(RAW, "rt") as src, gzip.open(raw, "wt") as dst:
        dst.writelines(line for i, line in zip(range(600), src))
    env = {"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "FAKE_SLURM": str(jobs),
           "SLURM_NODELIST": "localhost"}
    common = ["--config", str(REPO / "configs/stages/curate-tiny.yaml"), "--input", str(raw), "minhash.bands=4",
              "minhash.threshold=0.7"]
    proc = run_megaflow("curate", *common, "--output", str(tmp_path / "slurm"), "executor=slurm",
                        "slurm.partition=test", "slurm.tasks=2", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "submitted 6 SLURM job arrays" in proc.stdout, proc.stderr[-3000:]
    scripts = sorted(jobs.glob("*.sbatch"))
    steps = [s for s in scripts if "launch_pickled_pipeline" in s.read_text()]
    assert len(steps) == 6 and len(scripts) == 12  # each array, then its stats merge
    for before, after in zip(steps, steps[1:]):  # every array waits for the one before it
        assert f"--dependency=afterok:{before.stem}" in (jobs / f"{after.stem}.args").read_text()
    assert "#SBATCH --partition=test" in steps[0].read_text() and "#SBATCH --array=0-1" in steps[0].read_text()
    assert not (tmp_path / "slurm" / "00000.jsonl.gz").exists()  # submitted, not run
    for script in scripts:  # the cluster: every task of every array, in submission order
        last = int(re.search(r"#SBATCH --array=0-(\d+)", script.read_text()).group(1))
        for task in range(last + 1):
            done = subprocess.run(["bash", str(script)], env={**os.environ, **env, "SLURM_ARRAY_TASK_ID": str(task),
                                                               "RUN_OFFSET": "0"}, capture_output=True, text=True)
            assert done.returncode == 0, f"{script.name} task {task}: {done.stderr[-2000:]}"
    proc = run_megaflow("curate", *common, "--output", str(tmp_path / "local"), "workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("00000.jsonl.gz", "00001.jsonl.gz"):
        assert gzip.decompress((tmp_path / "slurm" / name).read_bytes()) == gzip.decompress((tmp_path / "local" / name).read_bytes())
