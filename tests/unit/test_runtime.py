"""Launch environments: torchrun's variables, SLURM's (srun, one task per GPU), or one process."""

from __future__ import annotations

import pytest
import torch

from megaflow.runtime.distributed import _first_slurm_host, read_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_torchrun_variables_win(clean_env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node1", "MASTER_PORT": "1234",
                 "SLURM_PROCID": "5", "SLURM_NTASKS": "16"}.items():
        clean_env.setenv(k, v)
    env = read_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 3, "node1", 1234)


def test_srun_one_task_per_gpu(clean_env):
    for k, v in {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                 "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}.items():
        clean_env.setenv(k, v)
    env = read_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu007")
    assert env.master_port == 20000 + 4242  # the same on every task of the job


def test_single_process(clean_env):
    env = read_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0) and env.master_port > 0


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[001-004,010]", "gpu001"), ("a[3,5],b7", "a3"), ("login2,gpu[1-2]", "login2"),
    ("gpu[001-002]-ib", "gpu001-ib"), ("rack[1-2]-node[01-04],x9", "rack1-node01"), ("n[07,09-12]", "n07"),
])
def test_first_host_of_a_nodelist(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_the_cpu_peak_is_measured_again_when_the_machine_is_quieter(tmp_path, monkeypatch):
    """The cached matmul peak: reused under the same or more load, measured again (and the higher value
    kept) on a quieter machine, so one measurement taken under load does not stay for good."""
    import json

    from megaflow.training import metrics

    monkeypatch.setenv("MEGAFLOW_CACHE", str(tmp_path))
    measured = iter([5e10, 2e11])
    monkeypatch.setattr(metrics, "measured_matmul_flops", lambda dtype: next(measured))
    load = [3.0]
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    assert metrics._cpu_peak(torch.float32) == 5e10  # measured under load 3
    assert metrics._cpu_peak(torch.float32) == 5e10  # cached: no quieter now
    load[0] = 0.2
    assert metrics._cpu_peak(torch.float32) == 2e11  # quieter: measured again
    assert metrics._cpu_peak(torch.float32) == 2e11  # cached at load 0.2
    (entry,) = json.loads((tmp_path / "cpu-peak-flops.json").read_text()).values()
    assert entry == {"flops": 2e11, "load": 0.2}
