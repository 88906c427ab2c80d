"""The tests' warm start (tests/zygote.py) stands in for a cold interpreter: the same probe, started both
ways, sees the same argv, working directory, environment, sys.path, stdin, warning filters and torch
threads, and ends with the same status; processes it starts through sys.executable do too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import tests.conftest as conftest
from tests.conftest import REPO, run_python

PROBE = r"""
import json, os, subprocess, sys, warnings
seen = {"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
        "var": os.environ.get("PROBE_VAR"), "stdin": sys.stdin.read(), "filter": list(warnings.filters[0][:1]),
        "repo_on_path": any(os.path.abspath(p or ".") == os.environ["REPO"] for p in sys.path)}
if os.environ.get("OMP_NUM_THREADS"):
    import torch
    seen["threads"] = torch.get_num_threads()
if sys.argv[1] == "nested":
    inner = subprocess.run([sys.executable, "-u", "-c", "import sys; print(sys.argv[1:]); sys.exit(5)", "x"],
                           capture_output=True, text=True)
    seen["inner"] = [inner.stdout, inner.returncode]
print(json.dumps(seen))
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


@pytest.fixture(scope="module")
def warm():
    run_python("-c", "pass", env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
    if not conftest._zygote:
        pytest.skip("the warm start is off (MEGAFLOW_TEST_ZYGOTE=0) or refused")
    return conftest._zygote


def _both(warm, *argv, extra: dict | None = None, input: str = "") -> tuple:
    env = {**warm.env, "PROBE_VAR": "v", "REPO": str(REPO), **(extra or {})}
    hot = warm.run(list(argv), REPO / "tests", env, 120, input)
    cold = subprocess.run([sys.executable, *argv], cwd=REPO / "tests", env=env, capture_output=True, text=True,
                          input=input, timeout=120)
    return hot, cold


@pytest.mark.parametrize("extra", [{}, {"PROBE_EXIT": "3"}, {"OMP_NUM_THREADS": "1"}, {"PYTHONPATH": str(REPO)}],
                         ids=["plain", "exit-3", "omp-1", "pythonpath"])
def test_a_warm_child_sees_what_a_cold_interpreter_sees(warm, extra):
    hot, cold = _both(warm, "-c", PROBE, "nested", extra=extra, input="some input")
    assert hot.returncode == cold.returncode == int(extra.get("PROBE_EXIT", 0))
    assert json.loads(hot.stdout) == json.loads(cold.stdout)
    assert json.loads(hot.stdout)["inner"] == ["['x']\n", 5]


def test_modules_and_scripts_start_as_with_python(warm, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    for argv in (["-m", "megaflow", "--help"], [str(script), "flat"]):
        hot, cold = _both(warm, *argv)
        assert (hot.returncode, hot.stdout) == (cold.returncode, cold.stdout), argv


def test_a_signal_ends_a_warm_child_as_it_ends_a_cold_one(warm):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    hot, cold = _both(warm, "-c", code)
    assert hot.returncode == cold.returncode == -signal.SIGTERM


def test_a_start_up_variable_it_cannot_reproduce_starts_cold(warm):
    assert conftest.can_stand_in(dict(warm.env), warm.env)
    assert not conftest.can_stand_in({**warm.env, "PYTHONHASHSEED": "7"}, warm.env)


def test_the_process_of_a_killed_shim_dies_with_it(warm, tmp_path):
    """A shim killed with SIGKILL (as PR_SET_PDEATHSIG does when a pipeline's runner dies) takes its
    warm process along, as the kernel would take a cold one."""
    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    code = f"""
import os, signal, subprocess, sys, time
shim = subprocess.Popen([sys.executable, "-c", {sleeper!r}])
while not os.path.exists({str(pid_file)!r}) or not open({str(pid_file)!r}).read():
    time.sleep(0.05)
shim.kill()
shim.wait()
pid, deadline = int(open({str(pid_file)!r}).read()), time.time() + 5
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print("gone", pid != shim.pid)
        sys.exit(0)
    time.sleep(0.05)
sys.exit("the warm process outlived its shim")
"""
    proc = warm.run(["-c", code], tmp_path, dict(warm.env), 60)
    assert (proc.returncode, proc.stdout) == (0, "gone True\n"), proc.stderr
