"""Shared fixtures. Runs happen in a temporary directory; the repository's sample corpus is read from
REPO; CPU tests never need CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.zygote import Zygote, can_stand_in

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"


def run_megaflow(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, nproc: int | None = None):
    """Run the CLI in a subprocess (the way users do); returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", **(env or {})}
    return run_python("-m", "megaflow", *args, cwd=cwd, env=full_env, timeout=timeout)


_zygote = None


def run_python(*argv: str, cwd=None, env: dict | None = None, timeout: float = 600,
               input: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run([python, *argv], capture_output=True, text=True) through the session's warm start
    (tests/zygote.py) when it can stand in for a cold one, else a cold subprocess."""
    global _zygote
    cwd, env = cwd or os.getcwd(), dict(os.environ if env is None else env)
    if _zygote is None:
        _zygote = False
        if os.environ.get("MEGAFLOW_TEST_ZYGOTE", "1") != "0":
            import atexit
            import tempfile

            server_env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
            zygote = Zygote(os.path.join(tempfile.mkdtemp(prefix="megaflow-zygote-"), "socket"), server_env)
            atexit.register(zygote.close)
            if zygote.ready:
                _zygote = zygote
            else:
                print(f"tests: cold starts only (the warm start answered {zygote.answer!r})", file=sys.stderr)
    if _zygote and can_stand_in(env, _zygote.env):
        try:
            return _zygote.run(list(argv), cwd, env, timeout, input)
        except (ConnectionRefusedError, FileNotFoundError):  # the server is gone: cold from here on
            print("tests: the warm start is gone; cold starts from here on", file=sys.stderr)
            _zygote = False
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input)


# Modules that share the expensive session fixtures after tiny_pretrain (tiny_sft) run on one xdist worker.
SFT_GROUP = {"tests.e2e.test_sft", "tests.e2e.test_preference_stages", "tests.e2e.test_bad_input",
             "tests.e2e.test_degenerate_inputs", "tests.e2e.test_safety"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without a GPU; with xdist workers (`MEGAFLOW_TEST_WORKERS=N`), keep each module on
    one worker (its module-scoped fixtures are built once) and the tiny_sft modules together."""
    for item in items:
        module = item.module.__name__ if item.module is not None else item.nodeid
        item.add_marker(pytest.mark.xdist_group("tiny_sft" if module in SFT_GROUP else module))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 50 kB of the sample corpus: enough text for a small tokenizer, fast to process."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_bytes(SAMPLE.read_bytes()[:50_000])
    return path


TEST_CONFIG = REPO / "configs" / "stages" / "pretrain-test.yaml"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A scratch project directory holding the sample corpus at the path the stage configs name."""
    root = tmp_path_factory.mktemp("work")
    (root / "data" / "sample").mkdir(parents=True)
    (root / "data" / "sample" / "tinyshakespeare.txt").symlink_to(SAMPLE)
    return root


@pytest.fixture(scope="session")
def tiny_pretrain(workdir) -> Path:
    """The test variant of the embedded sample, trained once per session: returns its stage directory."""
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / "tiny-test" / "pretrain"


SFT_CONFIG = REPO / "configs" / "stages" / "sft-tiny.yaml"
HELD_OUT = REPO / "data" / "sample" / "sft-words" / "heldout.jsonl"
SFT_STEPS = 300


@pytest.fixture(scope="session")
def tiny_sft(workdir, tiny_pretrain) -> Path:
    """The test pretrain fine-tuned on the synthetic instruction set, once per session (SFT, RM and DPO
    tests start from it): returns its stage directory."""
    proc = run_megaflow("train", "sft", "--config", str(SFT_CONFIG), f"init_from={tiny_pretrain / 'final'}",
                        f"data.train=[{{path: {REPO / 'data/sample/sft-words/train.jsonl'}}}]",
                        f"data.sft.valid=[{HELD_OUT}]", "run.dir=runs/tiny-sft", f"train.steps={SFT_STEPS}",
                        "eval.exact_match=200", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing efficiency" in proc.stdout
    return workdir / "runs" / "tiny-sft" / "sft"
