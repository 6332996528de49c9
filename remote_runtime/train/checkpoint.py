"""Training checkpoints: a Hugging Face model plus what resuming needs, written atomically.

Layout of `<output_dir>/checkpoint-<step>/`:

    config.json, *.safetensors, model.safetensors.index.json, tokenizer files, ...  (HF, rank 0)
    (LoRA runs: adapter_config.json + adapter_model.safetensors instead, a PEFT adapter)
    megatron_state/optimizer/      megatron-core distributed checkpoint of the optimizer
                                   (fp32 master weights and Adam moments; every rank writes
                                   its shard)
    megatron_state/rng/rank_<r>.pt RNG states of each rank
    trainer_state.json             step, data position, LR schedule, layout; written LAST

Everything is written into `.checkpoint-<step>.partial/` and renamed when complete, so a
`checkpoint-<step>` directory with a `trainer_state.json` is always whole; a crash leaves only a
`.partial` directory, removed by the next save. Without a shared filesystem each node keeps the
optimizer shards of its own ranks in its own copy of the directory (rank 0's node has the HF
model), and every node's local leader writes trainer_state.json and prunes its own copy;
resuming needs the same nodes in the same order (remote_runtime.train.resume).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from remote_runtime.spec.layout import (
    STATE_DIR,
    checkpoint_name,
    checkpoint_step,
    partial_checkpoint_name,
)
from remote_runtime.spec.layout import TRAINER_STATE as STATE_FILE
from remote_runtime.train.collectives import cpu_group

# Deprecated-in-name-only, but the only distributed-optimizer format that needs no resharding
# logic: each DP rank's buffer is one tensor (resume with the same parallel layout).
OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class ResumeError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    train_iters: int
    consumed_samples: int
    data: dict  # BatchIterator.state_dict()
    scheduler: dict  # OptimizerParamScheduler.state_dict()
    layout: dict  # world_size, tp, pp, cp, dp
    has_optimizer: bool
    has_rng: bool
    loss: float | None = None
    version: str = ""
    time: float = 0.0


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    out = Path(output_dir)
    found = []
    if out.is_dir():
        for p in out.iterdir():
            step = checkpoint_step(p.name)
            if step is not None and (p / STATE_FILE).is_file():
                found.append((step, p))
    return sorted(found)


def read_state(path: str | Path) -> TrainState:
    data = json.loads((Path(path) / STATE_FILE).read_text())
    return TrainState(**data)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    torch.distributed.barrier()


def _is_local_leader(dist) -> bool:
    return dist.local_rank == 0


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    model,
    optimizer,
    dist,
    source_dir: str | Path,
    save_optim: bool,
    save_rng: bool,
    total_limit: int | None,
) -> Path:
    """Write checkpoint-<state.step> (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    from remote_runtime.bridge import save_hf_checkpoint
    from remote_runtime.bridge.adapter import save_adapter
    from remote_runtime.model.lora import lora_settings

    out = Path(output_dir).resolve()
    final = out / checkpoint_name(state.step)
    stage = out / partial_checkpoint_name(state.step)
    if _is_local_leader(dist):
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
    _barrier()
    if lora_settings(model) is not None:  # a PEFT adapter directory instead of a full model
        save_adapter(model, stage, source_dir, dist)
    else:
        save_hf_checkpoint(model, stage, source_dir, dist)
    if _is_local_leader(dist):
        for sub in ("rng", "optimizer"):
            (stage / STATE_DIR / sub).mkdir(parents=True, exist_ok=True)
    _barrier()
    if save_optim:
        sharded = optimizer.sharded_state_dict(
            _model_sharded_state_dict(model), is_loading=False, metadata=OPTIM_SHARDING
        )
        dist_checkpointing.save({"optimizer": sharded}, str(stage / STATE_DIR / "optimizer"))
    if save_rng:
        torch.save(_rng_state(), stage / STATE_DIR / "rng" / f"rank_{dist.rank:05d}.pt")
    _barrier()
    state.has_optimizer, state.has_rng = save_optim, save_rng
    state.time = time.time()
    if dist.rank == 0:
        _finish(stage, final, state, out, total_limit)
    _barrier()
    # Other nodes finish their own copy; on a shared filesystem rank 0 already moved it.
    if _is_local_leader(dist) and dist.rank != 0 and stage.exists():
        _finish(stage, final, state, out, total_limit)
    _barrier()
    return final


def _finish(
    stage: Path, final: Path, state: TrainState, out: Path, total_limit: int | None
) -> None:
    """trainer_state.json last (it marks the copy complete), publish, prune: on every node,
    so each node's copy resumes and no node keeps more than total_limit checkpoints."""
    tmp = stage / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state.__dict__, indent=2))
    os.replace(tmp, stage / STATE_FILE)
    _publish(stage, final)
    if total_limit:
        prune(out, total_limit, keep=final)


def _publish(stage: Path, final: Path) -> None:
    if final.exists():  # an earlier run's checkpoint of the same step is replaced whole
        shutil.rmtree(final)
    os.replace(stage, final)


def prune(output_dir: Path, total_limit: int, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints beyond total_limit (never `keep`)."""
    removed = []
    ckpts = complete_checkpoints(output_dir)
    for _, path in ckpts[: max(len(ckpts) - total_limit, 0)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _model_sharded_state_dict(model) -> dict:
    sd = {}
    for i, chunk in enumerate(model):
        prefix = f"model{i}." if len(model) > 1 else ""
        sd.update(chunk.sharded_state_dict(prefix=prefix))
    return sd


def load_training_state(path: Path, model, optimizer, dist, layout: dict) -> TrainState:
    """Restore optimizer, RNG and return the trainer state (model weights are loaded by the
    caller through the bridge before the optimizer is built)."""
    from megatron.core import dist_checkpointing

    state = _broadcast_state(path, dist)
    if state.layout != layout:
        raise ResumeError(
            f"checkpoint {path} was written with layout {state.layout}; this run "
            f"has {layout}. Resume with the same parallel sizes and world size."
        )
    optim_dir = path / STATE_DIR / "optimizer"
    if state.has_optimizer:
        visible = torch.tensor([1 if (optim_dir / "metadata.json").is_file() else 0])
        torch.distributed.all_reduce(visible, op=torch.distributed.ReduceOp.MIN, group=cpu_group())
        if not visible.item():
            raise ResumeError(
                f"{optim_dir} is not visible on every node: resuming the optimizer across "
                "nodes needs checkpoint.output_dir on a shared filesystem (or resume with "
                "checkpoint.no_save_optim, which restarts the optimizer state)"
            )
        _materialize_optimizer_state(optimizer)
        template = optimizer.sharded_state_dict(
            _model_sharded_state_dict(model), is_loading=True, metadata=OPTIM_SHARDING
        )
        loaded = dist_checkpointing.load({"optimizer": template}, str(optim_dir))
        # fp32 runs keep no separate master copy: the optimizer writes into the parameters.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    rng_file = path / STATE_DIR / "rng" / f"rank_{dist.rank:05d}.pt"
    if state.has_rng and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state at the first step, and megatron's distributed optimizer
    can only describe (and so load into) state that exists. Megatron's own remedy is a dummy
    step on zero gradients; every value it touches is then overwritten by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16's distributed optimizer assumes Adam keeps its step count in the param
    group (as TE/Apex FusedAdam do). torch's Adam keeps one per parameter, which megatron then
    (a) restores as ONE tensor shared by all parameters, which torch increments once per
    parameter, and (b) overwrites from its bucket-shaped parameter state, which does not hold it.
    The param groups do carry the right count: give every parameter its own copy of it."""
    from remote_runtime.train.optim import inner_optimizers

    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            on_device = group.get("fused") or group.get("capturable")  # torch keeps step there
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(
                        float(group["step"]),
                        dtype=torch.float32,
                        device=param.device if on_device else "cpu",
                    )


def _broadcast_state(path: Path, dist) -> TrainState:
    box = [read_state(path).__dict__ if dist.rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return TrainState(**box[0])
