"""Everything megatron-core needs to run on a CPU, in one place (`--device cpu`).

megatron-core assumes CUDA in a handful of spots that have nothing to do with the maths. On a
CPU run we make "the current CUDA device" mean the CPU, which keeps the model, the bridge and the
pipeline schedules on exactly the code path a GPU run takes:

1. `torch.cuda.current_device()` answers "cpu": megatron allocates every parameter and buffer on
   `torch.cuda.current_device()`.
2. Tensors asked for on "cuda" (`device="cuda"` literals in the pipeline schedules and the
   optimizer, `.cuda()` on the tied output layer for its first/last-stage all-reduce) are made on
   the CPU instead, by a torch function mode that rewrites only the device; the same mode makes
   `tensor.type()` report CUDA type names, which the optimizer uses to group parameters.
3. `torch.cuda.synchronize()` is a no-op (there is no stream to wait for).
4. The model-parallel RNG tracker forks the CPU generator instead of CUDA generators, so
   dropout in tensor-parallel regions and activation recomputation replay the same random
   numbers, as on GPU.
5. CUDA streams and events (the MoE all-to-all token dispatcher copies its split sizes to the
   host on a side stream; the shared expert can overlap on one) are no-op stand-ins: on CPU
   every operation is already in program order. The dispatcher's split sizes, which it turns
   into numpy arrays only when copying them off a GPU, become numpy arrays here too (the
   all-to-all binding refuses tensors).

`install()` is idempotent and only ever called for `--device cpu`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a CUDA ordinal


class _CudaMeansCpu(TorchFunctionMode):
    """Shim 2: device="cuda" -> "cpu" in factory calls and .to(); .cuda() returns the tensor;
    `tensor.type()` names CPU tensors as their CUDA twins ("torch.cuda.FloatTensor"), because
    megatron's (distributed) optimizer sorts parameters into fp32/bf16 groups by that name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return (
                name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            )
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Shim 4: megatron's CudaRNGStatesTracker API over the CPU generator."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_, self.seeds_ = {}, set()
        self._initialized = False

    def is_initialized(self):
        return self._initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"rng state {name} / seed {seed} already exists")
        self._initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


class _NullStream:
    """Shim 5: a CUDA stream / event where there is none."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    __hash__ = object.__hash__


_NULL_STREAM = _NullStream()


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Shim 5: megatron's maybe_move_tensor_to_cpu for tensors that are on the CPU already."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def install() -> None:
    global _installed
    if _installed:
        return
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"  # shim 1
    torch.cuda.synchronize = lambda *args, **kwargs: None  # shim 3
    torch.cuda.Stream = _NullStream  # shim 5
    torch.cuda.current_stream = lambda *args, **kwargs: _NULL_STREAM
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    mode = _CudaMeansCpu()
    mode.__enter__()  # shim 2: stays active for the life of the process
    # Shim 4: the tracker, and the "CUDA" state that activation recomputation saves and restores
    # next to the CPU state (on CPU both are the CPU generator, which it already restores).
    tracker = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.initialize_rng_tracker = lambda *args, **kwargs: None
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: None
    _installed = True


def model_parallel_seed(seed: int, tp_rank: int) -> None:
    """The CPU counterpart of megatron's model_parallel_cuda_manual_seed (same seed offsets)."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
