"""Resolve a job against config.json and a world size, without weights, torch or a GPU.

`resolve_job` is the single place where a job meets its model: the family is found, the parallel
arithmetic checked (`layout_problems`: world = TP·PP·CP·DP, heads and query groups divisible by TP,
layers by PP; the planner enumerates layouts with the same function), batch sizes checked against
the data-parallel size; for MoE models the expert layout (`experts.py`). The runtime calls it at
every start, `--dry_run true` prints its result, and the operator calls it before launching, so a
bad job fails on the laptop, not on the cluster.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from remote_runtime.spec.config import ConfigError, JobConfig, normalize, validate
from remote_runtime.spec.errors import Problem
from remote_runtime.spec.experts import check_moe, moe_settings
from remote_runtime.spec.shape import ModelShape
from remote_runtime.spec.tuner import resolve_lora

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


def padded_vocab_size(
    vocab_size: int, tensor_parallel: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY
) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible_by × TP."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


def world_size_from_env(env: dict | None = None) -> int:
    """WORLD_SIZE as torchrun sets it, else NPROC_PER_NODE × NNODES as ms-swift users set them."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"])
    return int(env.get("NPROC_PER_NODE") or 1) * int(env.get("NNODES") or 1)


def read_hf_config(model_dir: str) -> dict:
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        hint = (
            "it looks like a hub id; download it first (huggingface-cli download "
            f"{model_dir} --local-dir DIR) and pass DIR"
            if "/" in model_dir and not Path(model_dir).expanduser().exists()
            else "pass a Hugging Face checkpoint directory"
        )
        raise ConfigError([("model.model", f"{path} not found: {hint}")])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [("model.model", f"{path}:{exc.lineno}: invalid JSON ({exc.msg})")]
        ) from None


def layout_problems(
    shape: ModelShape, world_size: int, tp: int, pp: int, cp: int = 1
) -> list[Problem]:
    """Why a TP × PP × CP layout cannot run this model on `world_size` ranks (empty: it can)."""
    problems = []
    if world_size % (tp * pp * cp):
        problems.append(
            Problem(
                "parallel.tensor_model_parallel_size",
                f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}"
                f" × pipeline_model_parallel_size={pp} × context_parallel_size={cp}",
            )
        )
    if shape.num_attention_heads % tp:
        problems.append(
            Problem(
                "parallel.tensor_model_parallel_size",
                f"{tp} does not divide num_attention_heads={shape.num_attention_heads}",
            )
        )
    if shape.num_query_groups % tp:
        problems.append(
            Problem(
                "parallel.tensor_model_parallel_size",
                f"{tp} does not divide num_query_groups={shape.num_query_groups} (key/value heads)",
            )
        )
    if shape.num_layers % pp:
        problems.append(
            Problem(
                "parallel.pipeline_model_parallel_size",
                f"{pp} does not divide num_layers={shape.num_layers}",
            )
        )
    return problems


def resolve_job(job: JobConfig, world_size: int, hf_config: dict | None = None) -> dict:
    """Validate everything checkable before loading weights; return the resolved configuration
    (the job as it will run: `normalize`d, with the warnings that says). `job` is not changed.

    Raises ConfigError naming every bad field.
    """
    from remote_runtime.spec.families import family_for_hf_config

    warnings = validate(job)
    job = normalize(job)
    hf = hf_config if hf_config is not None else read_hf_config(job.model.model)
    family = family_for_hf_config(hf)  # raises ConfigError listing the supported architectures
    tc = family.transformer_config_kwargs(hf)
    shape = ModelShape.from_transformer_config(tc, family.name)
    par = job.parallel
    tp, pp, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
    )
    problems = layout_problems(shape, world_size, tp, pp, cp)
    if job.model.model_type and job.model.model_type != family.name:
        problems.append(
            Problem(
                "model.model_type",
                f"{job.model.model_type!r} does not match the "
                f"checkpoint's family {family.name!r} (from config.json)",
            )
        )
    dp = max(world_size // (tp * pp * cp), 1)
    mbs, gbs = job.train.micro_batch_size, job.train.global_batch_size
    if gbs % (mbs * dp):
        problems.append(
            Problem(
                "train.global_batch_size",
                f"{gbs} is not divisible by micro_batch_size={mbs} × data parallel size={dp}",
                f"use a multiple of {mbs * dp}",
            )
        )
    rc = job.recompute
    if rc.recompute_num_layers and rc.recompute_num_layers > shape.num_layers // pp:
        problems.append(
            Problem(
                "recompute.recompute_num_layers",
                f"{rc.recompute_num_layers} is more than the "
                f"{shape.num_layers // pp} layers per stage",
            )
        )
    lora = None
    try:
        lora = resolve_lora(job.tuner, family, hf, job.model.transformer_impl)
    except ConfigError as exc:
        problems.extend(exc.problems)
    moe_problems, moe_warnings, experts = check_moe(job, tc, world_size, family.name)
    problems += moe_problems
    warnings = warnings + moe_warnings
    if problems:
        raise ConfigError(problems)
    tc = {**tc, **moe_settings(job, tc)}
    vocab = int(hf["vocab_size"])
    return {
        "task": job.task,
        "world_size": world_size,
        "parallel": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "context_parallel_size": cp,
            "data_parallel_size": dp,
            "sequence_parallel": par.sequence_parallel,
            "use_distributed_optimizer": par.use_distributed_optimizer,
        },
        "batch": {
            "micro_batch_size": mbs,
            "global_batch_size": gbs,
            "num_microbatches": gbs // (mbs * dp),
            "max_length": job.data.max_length,
            "tokens_per_step_max": gbs * job.data.max_length,
        },
        "model": {
            "family": family.name,
            "architecture": (hf.get("architectures") or ["?"])[0],
            "vocab_size": vocab,
            "padded_vocab_size": padded_vocab_size(vocab, tp),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            **{k: v for k, v in shape.to_dict().items() if k in ("params", "active_params")},
        },
        "experts": experts,
        "transformer_config": tc,
        "tuner": {"train_type": "lora", **lora.summary()} if lora else {"train_type": "full"},
        "warnings": warnings,
        "job": job.to_dict(),
    }


def print_dry_run(job: JobConfig) -> int:
    """`--dry_run true`: print the resolved configuration as JSON on stdout and exit 0; or the
    problems as JSON (`{"error": "ConfigError", "problems": [{field, message, hint, kind}]}`)
    on stdout, a readable line on stderr, and exit 2."""
    try:
        resolved = resolve_job(job, world_size_from_env())
    except ConfigError as exc:
        print(json.dumps(exc.to_dict(), indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(resolved, indent=2, default=str))
    return 0
