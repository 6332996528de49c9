"""Device choice, torch.distributed start-up, megatron's parallel state and RNG seeding.

One code path for CPU and GPU: on `--device cpu` the process group is gloo and
`remote_runtime.cpu_shims` makes megatron's "current CUDA device" the CPU; on `--device cuda` it
is NCCL with one GPU per local rank. Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and as a single plain process (no environment needed).
"""

from __future__ import annotations

import os
import random
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from remote_runtime.spec.config import ConfigError

# megatron-core announces at import that Apex / Transformer Engine are missing and that it falls
# back to torch implementations. That is this runtime's normal configuration, not news.
for _msg in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)
# torch >= 2.12 deprecates collectives megatron-core 0.16 uses (TP gathers, distributed optimizer).
warnings.filterwarnings(
    "ignore",
    message=".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)


@dataclass(frozen=True)
class DistInfo:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1  # expert model parallel size
    ep_rank: int = 0
    etp: int = 1  # expert tensor parallel size
    etp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def resolve_device(requested: str = "auto") -> str:
    """'cuda' or 'cpu'. `auto` takes the GPU when there is one; `cuda` without one is an error."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ConfigError([("model.device", f"{requested!r} is not one of: auto, cuda, cpu")])
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise ConfigError(
            [
                (
                    "model.device",
                    "cuda was asked for but torch sees no GPU "
                    f"(torch {torch.__version__}); use --device cpu or check the driver",
                )
            ]
        )
    return "cuda" if (requested == "cuda" or (requested == "auto" and has_gpu)) else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    device: str = "auto",
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 42,
    timeout_minutes: int = 30,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> DistInfo:
    """Start torch.distributed (if needed), megatron's parallel groups and the RNG streams.
    Expert parallelism (MoE) splits the data-parallel ranks of each expert layer:
    EP x expert-TP must divide the world / PP; expert TP defaults to TP (megatron's default)."""
    from megatron.core import parallel_state

    kind = resolve_device(device)
    if kind == "cpu":
        from remote_runtime import cpu_shims

        cpu_shims.install()
        # A CUDA stream-ordering hint (set CUDA_DEVICE_MAX_CONNECTIONS=1), meaningless on CPU.
        warnings.filterwarnings("ignore", message="When using async grad allreduce")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain single process: no launcher, no environment to read
            torch.distributed.init_process_group(
                backend=backend,
                timeout=timeout,
                rank=0,
                world_size=1,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
            )
    world = torch.distributed.get_world_size()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if world % (tp * pp * cp):
        raise ConfigError(
            [
                (
                    "parallel.tensor_model_parallel_size",
                    f"world size {world} is not divisible by TP={tp} × PP={pp} × CP={cp}",
                )
            ]
        )
    ep, etp = expert_model_parallel_size, expert_tensor_parallel_size or tp
    if (world // pp) % (ep * etp):
        raise ConfigError(
            [
                (
                    "parallel.expert_model_parallel_size",
                    f"EP={ep} × expert TP={etp} does not divide world size {world} / "
                    f"PP={pp}; choose EP so that EP × expert TP divides the GPUs of one "
                    "pipeline stage",
                )
            ]
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            create_gloo_process_groups=kind == "cuda",
        )
    info = DistInfo(
        device=torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu"),
        rank=torch.distributed.get_rank(),
        world_size=world,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        cp=cp,
        dp=world // (tp * pp * cp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep=ep,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp=etp,
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
    )
    seed_everything(seed, info)
    return info


def seed_everything(seed: int, info: DistInfo) -> None:
    """Megatron's seeding: one stream per pipeline stage for the default generators, plus the
    tracked data-parallel / tensor-parallel streams used for dropout inside parallel regions."""
    import numpy as np
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * info.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    if info.device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    else:
        from remote_runtime import cpu_shims

        cpu_shims.model_parallel_seed(stage_seed, info.tp_rank)


def shutdown() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
