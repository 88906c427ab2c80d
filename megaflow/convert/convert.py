"""`megaflow convert hf-to-megaflow` and `megaflow convert megaflow-to-hf`.

HF -> megaflow: config.json is mapped to a ModelConfig (unsupported settings refused with one line), the
tensor names and shapes of every shard are checked against the config before any data is read, then a
TP=1 megatron model is filled shard by shard (one shard open at a time) and saved as a megaflow final
checkpoint (weights/ in megatron dist_checkpointing, megaflow.json, tokenizer/ with the HF tokenizer files
as they were). megaflow.json keeps an `hf` block: the architecture, the original config.json and
generation_config.json, the tensor names and their dtypes, so the way back writes the same files.

megaflow -> HF: the checkpoint is loaded into a TP=1 model (from any layout it was saved in), and the HF
tensors are taken out and written in planned shards of at most --max-shard-size, one shard in memory at a
time, with model.safetensors.index.json, config.json (in the installed transformers' own layout),
generation_config.json and the tokenizer files.

Both write into OUT.tmp and rename it into place, so an interrupted or failed (--verify) conversion
leaves nothing behind under OUT.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from megaflow.config.schema import ModelConfig, StageConfig
from megaflow.convert.hf_config import (
    architecture_for, architecture_of, dtype_name, hf_config_for, model_config_from_hf, model_differences,
    read_hf_config,
)
from megaflow.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD_SIZE = "5GB"


class _CopiedTokenizer:
    """What save_final asks of a tokenizer (`save(dir)`): here, the HF files copied byte for byte."""

    def __init__(self, files: list[Path]):
        self.files = files

    def save(self, directory: str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            shutil.copyfile(f, directory / f.name)


def _check_out(out: Path, overwrite: bool, what: str) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{what}: {out} exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what}: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not ((out / "megaflow.json").is_file() or (out / "config.json").is_file()):
        raise UserError(f"{what}: {out} is neither a megaflow checkpoint nor an HF model directory; refusing to replace it")


def _progress() -> bool:
    from megaflow.runtime import distributed as dist

    return dist.is_rank0()


def hf_to_megaflow(hf_dir: str | Path, out: str | Path, verify: bool = False, tolerance: float | None = None,
                   overwrite: bool = False, log=print) -> dict[str, Any]:
    """Convert an HF model directory into a megaflow final checkpoint at `out`; returns a summary."""
    from megaflow.convert.safetensors_io import ShardedReader

    hf_dir, out = Path(hf_dir), Path(out)
    config = read_hf_config(hf_dir)  # config and file checks first: bad input fails before torch is imported
    where = str(hf_dir / "config.json")
    arch, _ = architecture_of(config, where)
    model, notes = model_config_from_hf(config, where)
    _check_out(out, overwrite, "--out")
    reader = ShardedReader(hf_dir)

    from tqdm import tqdm

    from megaflow.convert import mcore
    from megaflow.convert.families import adapter_for
    from megaflow.convert.verify import DEFAULT_TOLERANCE, check, hf_logits, max_abs_diff, sample_tokens
    from megaflow.models.size import padded_vocab_size
    from megaflow.models import weights as final_checkpoint

    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by)
    adapter = adapter_for(arch, model, padded, names=list(reader.tensors))
    adapter.check_names({n: i.shape for n, i in reader.tensors.items()}, str(hf_dir))
    kept = {n: i for n, i in reader.tensors.items() if not adapter.ignored(n)}
    for name, info in kept.items():
        if info.dtype not in FLOAT_DTYPES:
            raise UserError(f"{info.shard}: tensor {name} is {info.dtype}: only {', '.join(FLOAT_DTYPES)} weights "
                            "are supported (no quantized checkpoints)")
    dtype = Counter(i.dtype for i in kept.values()).most_common(1)[0][0]
    tokenizer_files = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not tokenizer_files:
        notes.append(f"no tokenizer files in {hf_dir} (expected tokenizer.json or tokenizer.model): "
                     "the checkpoint has no tokenizer/")
    generation = hf_dir / GENERATION_CONFIG

    mcore.setup_one_process()
    chunk = mcore.build(model, padded)
    params = mcore.parameters(chunk)
    for shard in tqdm(reader.shards, desc="reading shards", unit="shard", disable=not _progress()):
        for name, tensor in reader.iter_shard(shard):
            if not adapter.ignored(name):
                adapter.load(name, tensor, params)
            del tensor
    adapter.pad_rows(params)

    diff = None
    if verify:
        tokens = sample_tokens(model.vocab_size, model.max_position_embeddings)
        diff = max_abs_diff(mcore.logits(chunk, tokens), hf_logits(hf_dir, tokens))
        check(diff, tolerance, f"{arch} in {hf_dir} vs the converted megatron model")

    seq = min(model.max_position_embeddings, 2048)
    meta = {
        "stage": "convert", "step": 0, "tokens_seen": 0,
        "model": model.model_dump(mode="json"),
        "padded_vocab_size": padded,
        "seq_length": seq,
        "precision": "fp32",
        "parents": [str(hf_dir.resolve())],
        "config": StageConfig(stage="convert", model=model, data={"seq_length": seq}).model_dump(mode="json"),
        "hf": {
            "architecture": arch,
            "source": str(hf_dir.resolve()),
            "config": config,
            "generation_config": generation.read_text() if generation.is_file() else None,
            "dtype": dtype,
            "dtype_exceptions": {n: i.dtype for n, i in kept.items() if i.dtype != dtype},
            "tensor_names": list(kept),
        },
        "verify": None if diff is None else {"max_abs_logit_diff": diff, "tolerance": tolerance},
    }
    if tokenizer_files:  # no key without one: readers then find no tokenizer/ rather than a null path
        meta["tokenizer"] = "tokenizer"
    final_checkpoint.save_final(out, [chunk], meta, _CopiedTokenizer(tokenizer_files) if tokenizer_files else None)
    if tokenizer_files:
        from megaflow.data.tokenizer import Tokenizer

        try:
            Tokenizer.load(out / "tokenizer")
        except UserError as e:
            notes.append(f"megaflow cannot use this tokenizer as it is ({e}); the files are kept as they were")
    for note in notes:
        log(f"note: {note}")
    return {"architecture": arch, "out": str(out), "parameters": sum(p.numel() for p in params.values()),
            "shards": len(reader.shards), "max_abs_logit_diff": diff, "notes": notes}


# --- megaflow -> HF ----------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / "megaflow.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_hf_block(ckpt: Path, meta: dict, model: ModelConfig) -> dict | None:
    """The `hf` block of this checkpoint, or of the nearest ancestor (via `parents`) converted from HF
    whose model has the same weights layout; None for a model that never was an HF one."""
    seen = set()
    current: dict | None = meta
    for _ in range(16):
        if current is None:
            return None
        hf = current.get("hf")
        if hf:
            theirs, _ = model_config_from_hf(hf["config"])
            return hf if not model_differences(model, theirs, scope="shapes") else None
        parents = current.get("parents") or []
        parent = Path(parents[0]) if parents else None
        if parent is None or str(parent) in seen:
            return None
        seen.add(str(parent))
        current = _read_meta(parent)
    return None


def _token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids for the config of a model that never was an HF one (transformers' defaults would
    name other tokens)."""
    from megaflow.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer.load(tokenizer_dir)
    except UserError:
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eod_id,
            "pad_token_id": tok.pad_id if "pad" in tok.special_tokens else None}


def _normalize_config(out_dir: Path) -> None:
    """Let the installed transformers write config.json in its own layout (e.g. 5.x `rope_parameters`)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return
    AutoConfig.from_pretrained(str(out_dir), local_files_only=True).save_pretrained(str(out_dir))


def megaflow_to_hf(ckpt: str | Path, out: str | Path, verify: bool = False, tolerance: float | None = None,
                   dtype: str | None = None, max_shard_size: str | int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                   log=print) -> dict[str, Any]:
    """Write the weights of a megaflow checkpoint as an HF model directory at `out`; returns a summary."""
    import torch

    from megaflow.convert import mcore
    from megaflow.convert.families import adapter_for
    from megaflow.convert.safetensors_io import parse_size, write_sharded
    from megaflow.convert.verify import DEFAULT_TOLERANCE, check, hf_logits, max_abs_diff, sample_tokens
    from megaflow.models import weights as final_checkpoint

    ckpt, out = Path(ckpt), Path(out)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if not ckpt.is_dir():
        raise UserError(f"--ckpt: not a directory: {ckpt}")
    meta = final_checkpoint.read_meta(ckpt)
    if meta.get("head", "lm") != "lm":
        raise UserError(f"--ckpt {ckpt}: a reward model (a scalar head) has no Hugging Face causal-LM form; "
                        "only language models convert")
    try:
        model = ModelConfig(**meta["model"])
        padded = int(meta["padded_vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt}/megaflow.json: no usable model config ({str(e).splitlines()[0]})") from None
    forced = dtype_name(dtype) if dtype else None
    if forced is not None and forced not in FLOAT_DTYPES:
        raise UserError(f"--dtype: {dtype} is not one of {', '.join(FLOAT_DTYPES)}")
    hf = find_hf_block(ckpt, meta, model)
    arch = architecture_for(model, hf["architecture"] if hf else None)
    config = hf_config_for(model, hf["config"] if hf else None, arch, forced or (None if hf else "float32"))
    adapter = adapter_for(arch, model, padded, names=hf.get("tensor_names") if hf else None)
    default_dtype = forced or (hf["dtype"] if hf else "float32")
    exceptions = {} if forced or not hf else hf.get("dtype_exceptions", {})
    dtypes = {name: getattr(torch, exceptions.get(name, default_dtype)) for name in adapter.slots}
    max_bytes = parse_size(max_shard_size)
    tokenizer_dir = ckpt / meta["tokenizer"] if meta.get("tokenizer") else None
    if hf is None and tokenizer_dir is not None:
        config.update(_token_ids(tokenizer_dir))
    _check_out(out, overwrite, "--out")

    mcore.setup_one_process()
    chunk = mcore.build(model, padded)
    final_checkpoint.load_weights(ckpt, [chunk])
    params = mcore.parameters(chunk)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        specs = [(name, shape, dtypes[name].itemsize) for name, shape in adapter.specs()]
        files = write_sharded(tmp, specs, lambda name: adapter.export(name, params).to(dtypes[name]), max_bytes,
                              progress=_progress())
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _normalize_config(tmp)
        if hf and hf.get("generation_config"):
            (tmp / GENERATION_CONFIG).write_text(hf["generation_config"])
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in sorted(tokenizer_dir.iterdir()):
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
        diff = None
        if verify:
            # compare like with like: the megatron model with its weights rounded as they were written
            for name in adapter.slots:
                if dtypes[name] != torch.float32:
                    adapter.load(name, adapter.export(name, params).to(dtypes[name]).float(), params)
            tokens = sample_tokens(model.vocab_size, model.max_position_embeddings)
            diff = max_abs_diff(mcore.logits(chunk, tokens), hf_logits(tmp, tokens))
            check(diff, tolerance, f"megaflow checkpoint {ckpt} vs the written {arch}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"architecture": arch, "out": str(out), "shards": len(files), "dtype": default_dtype,
            "max_abs_logit_diff": diff, "from_hf_config": hf is not None}
