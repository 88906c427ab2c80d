"""DCP `.metadata` is a pickle: a real checkpoint must still load through the restricted unpickler, and a
planted payload must be refused before it runs."""

from __future__ import annotations

import io
import os
import pickle
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import WriteItemType

from megaflow.models import safe_pickle


@pytest.fixture
def installed(monkeypatch):
    """`safe_pickle.install()`, undone after the test (install itself is permanent)."""
    monkeypatch.setattr(filesystem, "pickle", filesystem.pickle)
    safe_pickle.install()
    safe_pickle.install()  # idempotent
    assert isinstance(filesystem.pickle, safe_pickle._PickleShim)


def _state():
    return {"w": torch.randn(4, 3), "half": torch.arange(6, dtype=torch.bfloat16).view(2, 3),
            "ids": torch.tensor([1, 2, 3]), "extra": {"step": 7, "name": "run"}, "raw": io.BytesIO(b"bytes")}


def _local_plans(state):
    """The savers' local plans, which megatron adds to the metadata as `all_local_plans`."""
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    return [planner.create_local_plan()]


def test_real_checkpoint_loads_through_restricted_unpickler(tmp_path, installed, monkeypatch):
    saved = _state()
    dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)  # the writer's pickle.dump goes through the shim
    used = []
    real_find = safe_pickle.RestrictedUnpickler.find_class
    monkeypatch.setattr(safe_pickle.RestrictedUnpickler, "find_class", lambda s, m, n: used.append(m) or real_find(s, m, n))

    loaded = {"w": torch.zeros(4, 3), "half": torch.zeros(2, 3, dtype=torch.bfloat16),
              "ids": torch.zeros(3, dtype=torch.int64), "extra": {"step": 0, "name": ""}, "raw": io.BytesIO()}
    dcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert used, "the metadata was not read by RestrictedUnpickler"
    for key in ("w", "half", "ids"):
        assert torch.equal(loaded[key], saved[key])
    assert loaded["extra"] == {"step": 7, "name": "run"}


def test_load_metadata_matches_plain_pickle_with_megatron_plans(tmp_path):
    state = _state()
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    with open(tmp_path / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file: trusted
    md.all_local_plans = _local_plans(state)
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(md, f)

    safe = safe_pickle.load_metadata(tmp_path)
    assert isinstance(safe, Metadata) and safe == md and safe.all_local_plans == md.all_local_plans
    assert safe_pickle.load_metadata(tmp_path / ".metadata") == md


class _Reduce:
    """Pickles as `func(*args)`: the classic payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker) -> dict[str, bytes]:
    touch = f"open({str(marker)!r}, 'w').close()"
    nested = Metadata(state_dict_metadata={}, storage_data={"x": _Reduce(os.system, f"touch {marker}")})
    return {
        "os.system": pickle.dumps(_Reduce(os.system, f"touch {marker}")),
        "builtins.eval": pickle.dumps(_Reduce(eval, touch)),
        "builtins.exec": pickle.dumps(_Reduce(exec, touch)),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)])),
        # getattr(__import__("os"), "system")("touch ..."), written by hand: a module can't be pickled
        "getattr chain": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR"
                          + f"(S'touch {marker}'\ntR.".encode()),
        "inside a real Metadata": pickle.dumps(nested),
    }


@pytest.mark.parametrize("variant", list(_payloads("m")))
def test_planted_payload_is_refused(tmp_path, installed, variant):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()
    dcp.save({"w": torch.ones(2)}, checkpoint_id=ckpt, no_dist=True)
    payload = _payloads(marker)[variant]
    (ckpt / ".metadata").write_bytes(payload)

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        safe_pickle.load_metadata(ckpt)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        filesystem.FileSystemReader(ckpt).read_metadata()
    with pytest.raises(BaseException):  # a CheckpointException; torch 2.11 drops the reader's message
        dcp.load({"w": torch.zeros(2)}, checkpoint_id=ckpt, no_dist=True)
    assert not marker.exists()

    result = pickle.loads(payload)  # the payload is live: plain pickle runs it
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


def test_allowed_classes_cannot_be_patched(tmp_path):
    """BUILD on an allowed class or enum member would `setattr` on it for the whole process."""
    md = tmp_path / ".metadata"
    init = Metadata.__init__
    md.write_bytes(b"ctorch.distributed.checkpoint.metadata\nMetadata\n"
                   b"(N}S'__init__'\nctorch\nSize\nsS'pwned'\nI1\nstb.")
    with pytest.raises(pickle.UnpicklingError, match="modify Metadata"):
        safe_pickle.load_metadata(md)
    assert Metadata.__init__ is init and not hasattr(Metadata, "pwned")

    md.write_bytes(b"ctorch.distributed.checkpoint.planner\nWriteItemType\n(I1\ntR(N}S'_name_'\nS'X'\nstb.")
    with pytest.raises(pickle.UnpicklingError, match="modify"):
        safe_pickle.load_metadata(md)
    assert WriteItemType(1).name == "TENSOR"


def test_not_a_metadata_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(pickle.UnpicklingError, match="not a Metadata"):
        safe_pickle.load_metadata(tmp_path)
