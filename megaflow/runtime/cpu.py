"""Run megatron-core on a machine without CUDA.

megatron-core assumes a GPU in a few dozen places on the model, optimizer, schedule and checkpoint paths:
`torch.cuda.current_device()`, streams, events, `device="cuda"` tensors, `.cuda()` calls and
`param.type() == "torch.cuda.FloatTensor"` checks. `enable()` patches those to CPU stand-ins and installs a
`TorchFunctionMode` that maps CUDA devices to the CPU. It is applied once, before any model is built, and
only when `torch.cuda.is_available()` is false (DESIGN §3 lists the measured facts behind each piece).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device):
    return _CPU if _is_cuda(device) else device


_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _type_name(func, args, kwargs):
    if len(args) == 1 and not kwargs:
        name = func(*args)
        return _TYPE_NAMES.get(name, name)
    return func(*args, **kwargs)


def _to(func, args, kwargs):
    if len(args) > 1 and _is_cuda(args[1]):
        args = (args[0], _CPU, *args[2:])
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _map_device(kwargs["device"])}
    return func(*args, **kwargs)


_SPECIAL = {
    torch.Tensor.cuda: lambda func, args, kwargs: args[0],
    torch.Tensor.pin_memory: lambda func, args, kwargs: args[0],
    torch.Tensor.type: _type_name,
    torch.Tensor.to: _to,
}


class CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument to the CPU; `.cuda()` is a no-op; `tensor.type()` answers with the
    CUDA type name that megatron's optimizer and grad-clipping asserts expect. It sees every torch call
    of the process, so the common case (no device argument) is a dictionary lookup and the call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs or {})
        if kwargs:
            if "device" in kwargs:
                kwargs = {**kwargs, "device": _map_device(kwargs["device"])}
            return func(*args, **kwargs)
        return func(*args)


class _Stream:
    """Stand-in for torch.cuda.Stream: everything on a CPU is already synchronous."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """Stand-in for torch.cuda.Event, timing with the wall clock when asked to."""

    def __init__(self, enable_timing=False, **kwargs):
        self._t = None

    def record(self, stream=None):
        import time

        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return 1000.0 * ((end._t or 0.0) - (self._t or 0.0))


class CpuRNGStatesTracker:
    """megatron's tensor-parallel RNG tracker, over the CPU generator instead of CUDA generators."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _stub(value=None):
    """A fresh do-nothing function per patched name (torch.compile's rule table rejects one shared object)."""

    def stub(*args, **kwargs):
        return value

    return stub


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = _stub()
    cuda.synchronize = _stub()
    cuda.empty_cache = _stub()
    cuda.Stream = _Stream
    cuda.Event = _Event
    _default = _Stream()
    cuda.current_stream = lambda device=None: _default
    cuda.default_stream = lambda device=None: _default
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    cuda.set_stream = _stub()
    cuda.memory_allocated = _stub(0)
    cuda.max_memory_allocated = _stub(0)
    cuda.memory_reserved = _stub(0)
    cuda.reset_peak_memory_stats = _stub()
    cuda.memory_stats = _stub({})
    cuda.manual_seed = _stub()
    cuda.manual_seed_all = _stub()
    # RNG state of a CUDA generator: the CPU generator plays its part (checkpoints save it either way).
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    nvtx = cuda.nvtx
    nvtx.range_push = _stub()
    nvtx.range_pop = _stub()
    nvtx.mark = _stub()
    nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # `initialize_rng_tracker(force_reset=True)` would replace the tracker with a CUDA one.
    original = mp_random.initialize_rng_tracker

    @functools.wraps(original)
    def initialize_rng_tracker(*args, **kwargs):
        if kwargs.get("force_reset"):
            mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mp_random.initialize_rng_tracker = initialize_rng_tracker
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Activation recomputation saves and restores "CUDA" RNG states around the recomputed forward.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _patch_fully_reshardable_load()


def _patch_fully_reshardable_load() -> None:
    """Without apex/TE megatron's distributed optimizer runs torch's Adam, whose per-parameter state holds
    a `step` tensor. Loading the `fully_reshardable` format skips `step` (not in the checkpoint) but then
    copies every tensor of the live state, `step` included: a KeyError. Hand it the live `step` (a no-op
    copy); megaflow restores each parameter's step count after loading (training/checkpoint.py)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" not in tensors and isinstance(state.get("step"), torch.Tensor):
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def enable() -> bool:
    """Install the CPU stand-ins once; returns True when they are active (no CUDA device)."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    # megatron's jit_fuser is torch.compile; on a CPU compiling its small fusions costs ~20 s per process
    # and buys nothing measurable.
    from torch._dynamo import config as dynamo_config

    dynamo_config.disable = True
    _patch_cuda_module()
    _patch_megatron()
    CudaToCpuMode().__enter__()  # stays active for the life of the process
    _ENABLED = True
    return True


def is_enabled() -> bool:
    return _ENABLED


def in_this_thread():
    """The CUDA-to-CPU mapping for a thread other than the main one (torch keeps function modes per
    thread, so one started after `enable()` runs without it); a no-op on a GPU machine."""
    return CudaToCpuMode() if _ENABLED else contextlib.nullcontext()
