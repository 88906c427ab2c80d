"""Sharded safetensors in and out, one shard at a time.

Reading follows `model.safetensors.index.json` (or a single `model.safetensors`): tensor names and shapes
come from the shard headers without reading any data, then each shard is opened in turn and its tensors
are handed out one by one. Writing plans the shards from the tensor sizes first (so every file gets its
final `model-0000i-of-0000N` name), then fills and writes one shard at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from megaflow.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# safetensors header dtype -> torch dtype name
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: float32, bfloat16, ...
    shard: Path


def _read_header(path: Path) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


class ShardedReader:
    """The tensors of an HF model directory: names, shapes and dtypes up front; data shard by shard."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index (no weight_map: {e})") from None
            shards = list(dict.fromkeys(weight_map.values()))
        elif single.is_file():
            weight_map, shards = None, [SINGLE]
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = (f" (found {', '.join(found[:3])}: only safetensors weights are read; re-save with "
                    "transformers' save_pretrained)") if found else ""
            raise UserError(f"{self.dir}: no weights: expected {SINGLE} or {INDEX} with its shards{hint}")
        missing = [s for s in shards if not (self.dir / s).is_file()]
        if missing:
            raise UserError(f"{index}: missing shard file(s) {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(shards)})")
        self.shards = [self.dir / s for s in shards]
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for name, entry in _read_header(shard).items():
                if name in self.tensors:
                    raise UserError(f"{shard}: tensor {name} is also in {self.tensors[name].shard.name}")
                self.tensors[name] = TensorInfo(name, tuple(entry["shape"]), TORCH_DTYPES.get(entry["dtype"], entry["dtype"]), shard)
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.shard.name != shard:
                    raise UserError(f"{index}: tensor {name} is not in {shard}")

    def shard_tensors(self, shard: Path) -> list[str]:
        return [n for n, info in self.tensors.items() if info.shard == shard]

    def iter_shard(self, shard: Path) -> Iterator[tuple[str, "object"]]:
        """(name, tensor) for every tensor of one shard; only one shard is open at a time."""
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            for name in self.shard_tensors(shard):
                yield name, f.get_tensor(name)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '20KB' or a number of bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size: not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise UserError(f"--max-shard-size: must be more than 0 bytes, got {text!r}")
    return size


def plan_shards(specs: list[tuple[str, tuple[int, ...], int]], max_bytes: int) -> list[list[str]]:
    """Group (name, shape, bytes per element) in order into shards of at most `max_bytes` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape, itemsize in specs:
        n = itemsize
        for d in shape:
            n *= d
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_sharded(out_dir: Path, specs: list[tuple[str, tuple[int, ...], int]], produce: Callable[[str], "object"],
                  max_bytes: int, progress: bool = True) -> list[str]:
    """Write the tensors `produce(name)` returns, shard by shard, plus the index when there are several
    shards (one shard: model.safetensors and no index, as transformers does). Returns the file names."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    groups = plan_shards(specs, max_bytes)
    n = len(groups)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total_size, total_params = {}, 0, 0
    for file_name, group in tqdm(list(zip(names, groups)), desc="writing shards", unit="shard", disable=not progress):
        tensors = {}
        for name in group:
            t = produce(name)
            tensors[name] = t.detach().to("cpu").contiguous()
            total_size += t.numel() * t.element_size()
            total_params += t.numel()
            weight_map[name] = file_name
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
