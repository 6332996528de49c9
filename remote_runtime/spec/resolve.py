"""Resolve a job against config.json and a world size, without weights, torch or a GPU.

`resolve_job` is the single place where the parallel arithmetic is checked
(world = TP·PP·CP·DP, global batch divisible by micro batch × DP, heads and query groups divisible
by TP, layers by PP). The runtime calls it at start-up, `--dry_run true` prints its result, and the
operator calls it before launching, so a bad job fails on the laptop, not on the cluster.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from remote_runtime.spec.config import ConfigError, JobConfig, validate

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int,
                      divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
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
        hint = ("it looks like a hub id; download it first (huggingface-cli download "
                f"{model_dir} --local-dir DIR) and pass DIR" if "/" in model_dir
                and not Path(model_dir).expanduser().exists() else "pass a Hugging Face checkpoint directory")
        raise ConfigError([("model.model", f"{path} not found: {hint}")])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([("model.model", f"{path}:{exc.lineno}: invalid JSON ({exc.msg})")]) from None


def resolve_job(job: JobConfig, world_size: int, hf_config: dict | None = None) -> dict:
    """Validate everything checkable before loading weights; return the resolved configuration.

    Raises ConfigError naming every bad field.
    """
    from remote_runtime.spec.families import family_for_hf_config

    warnings = validate(job)
    hf = hf_config if hf_config is not None else read_hf_config(job.model.model)
    family = family_for_hf_config(hf)  # raises ConfigError listing the supported architectures
    tc = family.transformer_config_kwargs(hf)
    par = job.parallel
    tp, pp, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.context_parallel_size)
    problems: list[tuple[str, str]] = []
    if job.model.model_type and job.model.model_type != family.name:
        problems.append(("model.model_type", f"{job.model.model_type!r} does not match the "
                         f"checkpoint's family {family.name!r} (from config.json)"))
    if world_size % (tp * pp * cp):
        problems.append(("parallel.tensor_model_parallel_size",
                         f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}"
                         f" × pipeline_model_parallel_size={pp} × context_parallel_size={cp}"))
    dp = max(world_size // (tp * pp * cp), 1)
    heads, groups = tc["num_attention_heads"], tc.get("num_query_groups") or tc["num_attention_heads"]
    if heads % tp:
        problems.append(("parallel.tensor_model_parallel_size",
                         f"{tp} does not divide num_attention_heads={heads}"))
    if groups % tp:
        problems.append(("parallel.tensor_model_parallel_size",
                         f"{tp} does not divide num_query_groups={groups} (key/value heads)"))
    if tc["num_layers"] % pp:
        problems.append(("parallel.pipeline_model_parallel_size",
                         f"{pp} does not divide num_layers={tc['num_layers']}"))
    mbs, gbs = job.train.micro_batch_size, job.train.global_batch_size
    if gbs % (mbs * dp):
        problems.append(("train.global_batch_size",
                         f"{gbs} is not divisible by micro_batch_size={mbs} × data parallel size={dp}"))
    rc = job.recompute
    if rc.recompute_num_layers and rc.recompute_num_layers > tc["num_layers"] // pp:
        problems.append(("recompute.recompute_num_layers",
                         f"{rc.recompute_num_layers} is more than the {tc['num_layers'] // pp} layers per stage"))
    if problems:
        raise ConfigError(problems)
    vocab = int(hf["vocab_size"])
    return {
        "task": job.task,
        "world_size": world_size,
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "context_parallel_size": cp, "data_parallel_size": dp,
                     "sequence_parallel": par.sequence_parallel,
                     "use_distributed_optimizer": par.use_distributed_optimizer},
        "batch": {"micro_batch_size": mbs, "global_batch_size": gbs,
                  "num_microbatches": gbs // (mbs * dp), "max_length": job.data.max_length,
                  "tokens_per_step_max": gbs * job.data.max_length},
        "model": {"family": family.name, "architecture": (hf.get("architectures") or ["?"])[0],
                  "vocab_size": vocab, "padded_vocab_size": padded_vocab_size(vocab, tp),
                  "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))},
        "transformer_config": tc,
        "warnings": warnings,
        "job": job.to_dict(),
    }


def print_dry_run(job: JobConfig) -> int:
    """`--dry_run true`: print the resolved configuration as JSON; exit 0, or 2 with the errors."""
    try:
        resolved = resolve_job(job, world_size_from_env())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(resolved, indent=2, default=str))
    return 0
