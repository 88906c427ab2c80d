"""Repository hygiene: shell scripts parse, the Dockerfile keeps the container's torch, pyproject pins
what DESIGN.md promises, the LICENSE is the full Apache-2.0 text and the CLI's help works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SHELL_SCRIPTS = sorted(
    [*REPO.glob("scripts/*.sh"), REPO / ".ci" / "run", *REPO.glob("examples/slurm/*.sbatch")]
)


def test_shell_scripts_exist():
    names = {p.relative_to(REPO).as_posix() for p in SHELL_SCRIPTS}
    for expected in ("scripts/setup.sh", "scripts/demo.sh", "scripts/test.sh", ".ci/run",
                     "examples/slurm/pretrain-single-node.sbatch"):
        assert expected in names


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shell_script_parses(script: Path):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().startswith("#!"), f"{script} has no shebang"


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/demo.sh", "scripts/test.sh", ".ci/run"])
def test_scripts_are_executable(script: str):
    assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


def _dockerfile_instructions() -> list[str]:
    """Dockerfile instructions with comments dropped and backslash continuations joined."""
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [ln.strip() for ln in joined.splitlines() if ln.strip()]


def test_dockerfile_base_image_is_pinned_nvidia_pytorch():
    froms = [ln for ln in _dockerfile_instructions() if ln.upper().startswith("FROM ")]
    assert len(froms) == 1, froms
    image = froms[0].split()[1]
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:([A-Za-z0-9._-]+)(@sha256:[0-9a-f]{64})?", image)
    assert m, f"FROM must name nvcr.io/nvidia/pytorch with a tag, got {image!r}"
    assert m.group(1) != "latest"


def test_dockerfile_keeps_the_containers_torch():
    runs = [ln for ln in _dockerfile_instructions() if ln.upper().startswith("RUN ")]
    assert runs
    for ln in runs:
        for cmd in re.split(r"&&|;|\|\|", ln):
            if re.search(r"\bpip3?\s+install\b", cmd):
                pkgs = [t.strip("'\"") for t in cmd.split() if not t.startswith("-")]
                assert not any(re.match(r"torch(\b|[<>=!~\[])", p) for p in pkgs), \
                    f"the Dockerfile must not pip install torch: {cmd.strip()}"
    text = " ".join(runs)
    assert re.search(r"megatron-core==0\.19\.2", text)
    assert "--no-deps" in text


def test_pyproject_pins():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = data["project"]
    assert project["requires-python"].replace(" ", "") == ">=3.12"
    deps = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower(): d.replace(" ", "") for d in project["dependencies"]}
    assert deps["megatron-core"] == "megatron-core==0.19.2"
    torch = deps["torch"]
    assert ">=2.6" in torch
    assert not re.search(r"<|==|~=", torch), f"torch must have no upper bound, got {torch!r}"
    assert "test" in project["optional-dependencies"]


def test_license_is_full_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional Liability."):
        assert section in text
    assert "[yyyy]" not in text


def _megaflow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "megaflow", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_lists_commands():
    proc = _megaflow("--help")
    assert proc.returncode == 0, proc.stderr
    for cmd in ("train", "tokenizer", "preprocess", "eval"):
        assert re.search(rf"^\s+{cmd}\b", proc.stdout, re.M), f"`megaflow --help` does not list {cmd}"


def test_cli_train_help_lists_stages_and_options():
    proc = _megaflow("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "pretrain" in proc.stdout
    assert "--config" in proc.stdout and "--nproc-per-node" in proc.stdout


@pytest.mark.parametrize("tool", ["bench_sft.py", "bench_checkpoint.py", "bench_pretrain.py", "profile_step.py"])
def test_benchmark_tools_explain_themselves(tool):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_imports_follow_the_layers_and_have_no_circles():
    """docs/design.md §1, checked by import-linter over the code's imports (pyproject's [tool.importlinter]):
    each package imports only the layers below it, and no modules of a package import each other in a
    circle. Deliberately breaking it (an import of megaflow.pipeline in megaflow/models) fails here."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is in the test extra (scripts/setup.sh installs it)")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_the_registry_is_what_the_cli_offers():
    """Every stage is one module with STAGE and one registry line; `megaflow train` offers the training
    stages, the pipeline all of them."""
    from megaflow.algorithms import registry
    from megaflow.algorithms.runner import TrainingStage

    for name in registry.names():
        stage = registry.get(name)
        assert stage.name == name
        assert isinstance(stage, TrainingStage) == (name in registry.TRAINING), name
    out = subprocess.run([sys.executable, "-m", "megaflow", "train", "--help"], capture_output=True, text=True).stdout
    assert "{" + ",".join(registry.TRAINING) + "}" in out
