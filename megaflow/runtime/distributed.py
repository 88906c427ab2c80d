"""Process setup: device, torch.distributed from torchrun / SLURM / a single process, megatron's
parallel_state, and seeds.

Everything megatron-core needs before a model can be built happens in `setup()`; `teardown()` undoes it
so tests can build several layouts in one process.
"""

from __future__ import annotations

import os
import re
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from megaflow.runtime import cpu


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as `gpu[001-004,010],login1` or `rack[1-2]-node[01-04]`
    (no scontrol needed): the first top-level item, each bracket replaced by its first value."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def read_env() -> DistEnv:
    """torchrun's variables win, then SLURM's (`srun`, one task per GPU), else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr, port)
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port())


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not cpu.is_enabled() else torch.device("cpu")


def init_process_group(env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU); a single process gets a world of one."""
    env = env or read_env()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu.enable()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
        )
    return env


def set_seeds(seed: int) -> None:
    """Python, numpy and torch seeds, plus megatron's tracked (tensor-parallel) RNG states."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def check_machine(precision: str, cp: int = 1) -> None:
    """What this machine cannot run, as one ValueError naming the key: before anything is written."""
    import importlib.util

    if precision == "fp8" and not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")):
        raise ValueError("precision=fp8 needs Transformer Engine on a GPU (this machine has "
                         f"{'no GPU' if not torch.cuda.is_available() else 'no transformer_engine'}): use bf16 or fp32")
    if cp > 1 and not torch.cuda.is_available():
        raise ValueError("parallel.cp > 1 needs GPUs: megatron's local (CPU) attention has no context parallelism")


def setup(tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1, seed: int = 1234) -> DistEnv:
    """Everything before model construction: process group, megatron parallel_state, seeds."""
    from megatron.core import parallel_state

    env = init_process_group()
    if env.world_size % (tp * pp * cp):
        raise ValueError(f"world size {env.world_size} is not divisible by tp*pp*cp = {tp * pp * cp}")
    if cp > 1 and cpu.is_enabled():
        raise ValueError("parallel.cp > 1 needs GPUs: megatron's local (CPU) attention has no context parallelism")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            context_parallel_size=cp,
        )
    set_seeds(seed)
    return env


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sum_over_data_parallel(values: torch.Tensor) -> None:
    """Sum a small tensor over the data-parallel replicas, in place (through this rank's device: NCCL
    reduces only GPU tensors)."""
    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    on_device = values.to(device())
    torch.distributed.all_reduce(on_device, group=parallel_state.get_data_parallel_group())
    values.copy_(on_device.cpu())


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def gather_over_data_parallel(obj) -> list:
    """Every data-parallel replica's `obj` (picklable), in replica order, on every rank."""
    if not torch.distributed.is_initialized():
        return [obj]
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def broadcast_from_rank0(obj):
    """Rank 0's `obj` (picklable) on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
