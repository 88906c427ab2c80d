"""Restricted unpickling of torch distributed-checkpoint (DCP) `.metadata` files.

A DCP checkpoint's `.metadata` is a plain pickle that torch reads with `pickle.load`
(`FileSystemReader.read_metadata`), so opening a checkpoint someone else made could run arbitrary code.
`RestrictedUnpickler` admits only what DCP metadata is made of; `install()` routes torch's read through it;
`load_metadata()` reads one file directly (for `megaflow inspect`).

The allowlist was derived by tracing every `find_class` call while unpickling the `.metadata` of a megaflow
training checkpoint (megatron `torch_dist`: adds `all_local_plans`, a list of `SavePlan`s), a final weights
checkpoint and a plain `torch.distributed.checkpoint.save`, plus the siblings of the same dataclass families.

The checkpoint's *objects* (megatron ShardedObjects such as `rng_state`, `common_state`, layers'
`_extra_state`) are byte blobs that torch's `DefaultLoadPlanner.load_bytes` reads with
`torch.load(weights_only=False)`; `install()` makes that `weights_only=True`, with megatron's allowlist of
numpy types (`register_safe_globals`) for the RNG states.
"""

from __future__ import annotations

import enum
import pickle
import types
from pathlib import Path

import torch

_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    f"{_DCP}.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                         "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.filesystem": {"_StorageInfo", "_StoragePrefix"},
    # megatron stores the savers' local plans in the metadata to reuse them on the next save
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch": {"Size"} | {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
    # torch.layout pickles as `_get_layout("torch.strided")`, a lookup among torch's layout objects
    "torch.serialization": {"_get_layout"},
    # StorageMeta.checkpoint_id is the writer's path (pathlib._local from Python 3.13)
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray", "range"},
    "datetime": {"datetime", "date", "time", "timedelta", "timezone"},
}


class RestrictedUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` whose `find_class` admits only the allowlist; anything else (os.system, eval,
    getattr, ...) raises `pickle.UnpicklingError` before it is imported or called."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.shared: dict = {}  # id -> (object, its attributes) for every process-wide object handed out

    def find_class(self, module: str, name: str):
        if name not in _ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"checkpoint metadata refers to '{module}.{name}', which is not allowed "
                                         "(only torch.distributed.checkpoint metadata types may be unpickled)")
        obj = super().find_class(module, name)
        # enum members are singletons the pickle can reach too (`WriteItemType(1)`)
        for shared in [obj, *(obj if isinstance(obj, type) and issubclass(obj, enum.Enum) else ())]:
            if id(shared) not in self.shared:
                self.shared[id(shared)] = (shared, _attrs(shared))
        return obj

    def load(self):
        """pickle's BUILD opcode can `setattr` on any object on its stack, including the allowed classes and
        enum members, which would patch them for the rest of the process. Their attributes are compared after
        the load; any change is undone and the load refused."""
        try:
            return super().load()
        finally:
            changed = [_restore(obj, attrs) for obj, attrs in self.shared.values() if not _same(_attrs(obj), attrs)]
            if changed:
                raise pickle.UnpicklingError(f"checkpoint metadata tried to modify {', '.join(changed)}")


def _attrs(obj) -> dict:
    """A shallow copy of an object's attributes (None for objects without a `__dict__`, which BUILD can't touch)."""
    return dict(vars(obj)) if hasattr(obj, "__dict__") else None


def _same(a: dict | None, b: dict | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and a.keys() == b.keys()
                                       and all(a[k] is b[k] for k in a))


def _restore(obj, attrs: dict) -> str:
    """Put `obj`'s attributes back as they were at the snapshot; returns its name for the message."""
    for k in _attrs(obj).keys() - attrs.keys():
        delattr(obj, k)
    for k, v in attrs.items():
        if vars(obj).get(k) is not v:
            setattr(obj, k, v)
    return getattr(obj, "__qualname__", repr(obj))


def _load_metadata_pickle(file, **kwargs):
    """`pickle.load` for a `.metadata` stream: restricted, and the result must be a DCP `Metadata`."""
    from torch.distributed.checkpoint.metadata import Metadata

    md = RestrictedUnpickler(file, **kwargs).load()
    if not isinstance(md, Metadata):
        raise pickle.UnpicklingError(f"checkpoint metadata holds a {type(md).__name__}, not a Metadata")
    return md


def load_metadata(path) -> "torch.distributed.checkpoint.metadata.Metadata":
    """The DCP `Metadata` of a checkpoint directory (or of a `.metadata` file), read safely."""
    path = Path(path)
    if path.is_dir():
        path = path / ".metadata"
    with open(path, "rb") as f:
        return _load_metadata_pickle(f)


class _PickleShim(types.ModuleType):
    """Stands in for the `pickle` module inside torch's filesystem.py: `load` is restricted, everything else
    (`dump` for the writer, constants) is the real module's."""

    def __init__(self):
        super().__init__("pickle")
        self.load = _load_metadata_pickle

    def __getattr__(self, name):
        return getattr(pickle, name)


def install() -> None:
    """Make every DCP `.metadata` read in this process go through `RestrictedUnpickler`. Idempotent.

    Rather than re-implementing `FileSystemReader.read_metadata` (its body differs between torch releases:
    rank-local `__N.metadata`, `storage_meta` defaults), we replace the `pickle` name in the module it lives
    in, so its only `pickle.load` call becomes ours and the rest of the method stays torch's own. Subclasses
    (megatron's `CachedMetadataFileSystemReader`, fsspec's reader) call this method and are covered. If a torch
    upgrade stops reading metadata with `pickle.load` there, this raises instead of silently not protecting.
    """
    from torch.distributed.checkpoint import filesystem

    if isinstance(filesystem.pickle, _PickleShim):
        return
    names = filesystem.FileSystemReader.read_metadata.__code__.co_names
    if filesystem.pickle is not pickle or "pickle" not in names or "load" not in names:
        raise RuntimeError("torch.distributed.checkpoint.filesystem no longer reads .metadata with pickle.load; "
                           "update megaflow/models/safe_pickle.py::install")
    filesystem.pickle = _PickleShim()
    _install_weights_only_objects()


class _TorchShim(types.ModuleType):
    """Stands in for `torch` inside torch's default_planner.py: `torch.load` there always runs with
    `weights_only=True`; every other attribute is the real module's."""

    def __init__(self):
        super().__init__("torch")

    @staticmethod
    def load(*args, **kwargs):
        return torch.load(*args, **{**kwargs, "weights_only": True})

    def __getattr__(self, name):
        return getattr(torch, name)


def _install_weights_only_objects() -> None:
    from megatron.core.safe_globals import register_safe_globals
    from torch.distributed.checkpoint import default_planner

    if isinstance(default_planner.torch, _TorchShim):
        return
    if "load" not in default_planner.DefaultLoadPlanner.load_bytes.__code__.co_names:
        raise RuntimeError("torch's DefaultLoadPlanner.load_bytes no longer uses torch.load; "
                           "update megaflow/models/safe_pickle.py::install")
    register_safe_globals()
    default_planner.torch = _TorchShim()
