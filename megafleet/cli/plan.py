"""`megafleet plan`: parallel sizes, recompute and batch sizes that fit the GPUs, and why."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click
import yaml
from rich.markup import escape

from megafleet import ui
from megafleet.cli import json_option, yes_option
from megafleet.errors import EXIT_FAILED, MegafleetError, UsageError
from megafleet.memory import Assumptions, Lora
from megafleet.model_shape import NAMED_CONFIGS, load_model_config
from megafleet.planner import (
    Candidate,
    Plan,
    apply_plan,
    estimate_job,
    job_assumptions,
    job_lora,
    layouts,
    plan,
)
from megafleet.templates import job_file_text, validation_error, write_text_file
from remote_runtime.spec.config import TASKS, ConfigError, JobConfig
from remote_runtime.spec.flags import load_job_file

SHOWN_ROWS = 8


@click.command("plan")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_ref",
    metavar="DIR",
    help="Hugging Face checkpoint directory, its config.json, or a known shape "
    f"({', '.join(NAMED_CONFIGS)}). Default: the job file's model.",
)
@click.option("--gpus", type=int, required=True, help="Total number of GPUs.")
@click.option(
    "--gpu-mem",
    "gpu_mem",
    type=float,
    required=True,
    metavar="GB",
    help="Memory of one GPU in GiB: nvidia-smi's MiB / 1024 (79.6 for an H100 80GB, "
    "140 for an H200).",
)
@click.option("--nodes", type=int, help="Number of nodes (the GPUs are split evenly).")
@click.option("--gpus-per-node", type=int, help="GPUs per node (default: all GPUs in one node).")
@click.option(
    "--seq-len",
    type=int,
    help="Tokens per training row (default: the job's max_length, else 4096).",
)
@click.option(
    "--task", type=click.Choice(TASKS), help="sft, pt or rlhf (default: the job's, else sft)."
)
@click.option("--micro-batch", type=int, help="Fix the micro batch size (default: chosen).")
@click.option(
    "--global-batch", type=int, help="Target rows per step (default: the job's, else 16)."
)
@click.option(
    "--lora",
    is_flag=True,
    help="Plan LoRA training (frozen bf16 base, r=16 adapters on every linear layer); "
    "default: the job's train_type, else full fine-tuning.",
)
@click.option(
    "--margin",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of GPU memory kept free beyond the estimate.",
)
@click.option(
    "--assume",
    "assume",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a memory-model assumption (e.g. optimizer_impl=foreach). Repeatable.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the job (the job file, or a new one) with the plan's settings to FILE.",
)
@yes_option
@json_option
@click.pass_context
def plan_command(
    ctx: click.Context,
    job_file,
    model_ref,
    gpus,
    gpu_mem,
    nodes,
    gpus_per_node,
    seq_len,
    task,
    micro_batch,
    global_batch,
    lora,
    margin,
    assume,
    output,
    yes,
    as_json,
):
    """Propose TP/PP/DP, recompute and batch sizes for full (or LoRA) training that fit in GPU
    memory; when full fine-tuning does not fit but LoRA does, say so.

    \b
    megafleet plan --model /data/Qwen3-8B --gpus 16 --gpus-per-node 8 --gpu-mem 80
    megafleet plan job.yaml --gpus 2 --gpu-mem 141 -o job.yaml --yes
    """
    job = _load_job(job_file)
    ref = model_ref or (job.model.model if job else None)
    if not ref:
        raise UsageError("no model: pass --model DIR (or a job file with model set)")
    per_node = _gpus_per_node(gpus, nodes, gpus_per_node)
    try:
        hf = load_model_config(ref)
        seq_len = seq_len or (job.data.max_length if job else 4096)
        result = plan(
            hf,
            gpus,
            gpu_mem,
            per_node,
            seq_len,
            task or (job.task if job else "sft"),
            micro_batch,
            global_batch or (job.train.global_batch_size if job else None),
            margin,
            _assumptions(assume, job),
            suggest=True,
            lora=_lora(lora, job),
        )
    except ConfigError as exc:
        raise validation_error(exc) from None
    current = _current(job, gpus, hf, result) if job else None
    refined = apply_plan(job or JobConfig(), result) if result.feasible else None
    if refined is not None and not job:
        # A bare shape name (qwen3-8b) is no model to train; a path or hub id is kept.
        bare_name = ref.strip().lower() in NAMED_CONFIGS and not Path(ref).exists()
        refined.model.model = "" if bare_name else ref
    if output and refined is not None:
        write_text_file(Path(output), job_file_text(refined), yes)
    if as_json:
        payload = result.to_dict()
        payload["model"]["source"] = ref
        payload["current"] = current
        payload["refined_job"] = refined.to_dict() if refined else None
        payload["output"] = output if refined is not None else None
        ui.emit_json(payload)
    else:
        show_plan(result, ref, current)
        if output and refined is not None:
            ui.check_row("ok", f"wrote {output}")
    if not result.feasible:
        if not as_json:
            ui.print_error(MegafleetError(result.reason, hint=_refusal_hint(result)))
        ctx.exit(EXIT_FAILED)


def _lora(flag: bool, job: JobConfig | None) -> Lora | None:
    if flag:
        return Lora(rank=job.tuner.lora_rank) if job and job.tuner.train_type == "lora" else Lora()
    return job_lora(job) if job else None


def _load_job(path: str | None) -> JobConfig | None:
    if not path:
        return None
    try:
        return load_job_file(path)
    except ConfigError as exc:
        raise validation_error(exc, path) from None


def _gpus_per_node(gpus: int, nodes: int | None, per_node: int | None) -> int | None:
    if nodes and per_node:
        raise UsageError("give --nodes or --gpus-per-node, not both")
    if nodes:
        if nodes < 1 or gpus % nodes:
            raise UsageError(f"--nodes {nodes} does not divide --gpus {gpus} evenly")
        return gpus // nodes
    return per_node


def _assumptions(items: tuple[str, ...], job: JobConfig | None) -> Assumptions:
    base = job_assumptions(job)
    hints = typing.get_type_hints(Assumptions)
    changes = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise UsageError(
                f"--assume {item}: expected KEY=VALUE with KEY one of {', '.join(hints)}"
            )
        kind = hints[key]
        try:
            changes[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        except ValueError:
            raise UsageError(f"--assume {item}: {raw!r} is not a {kind.__name__}") from None
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise UsageError(f"--assume: {exc}") from None


def _current(job: JobConfig, gpus: int, hf: dict, result: Plan) -> dict:
    """How the job file's own settings fare on these GPUs."""
    par = job.parallel
    tp, pp, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
    )
    valid = {(p.tp, p.pp) for p in layouts(result.model, gpus, result.request.gpus_per_node)}
    if cp != 1 or (tp, pp) not in valid:
        return {
            "valid": False,
            "reason": f"TP={tp} PP={pp} CP={cp} is not a layout the runtime "
            "can run on these GPUs (TP must divide heads and query groups and fit in a node, "
            "PP must divide the layers, TP×PP must divide the GPUs)",
        }
    est = estimate_job(job, gpus, hf, result.assumptions)
    limit = result.request.gpu_mem_gb * (1 - result.request.margin)
    return {"valid": True, "fits": est.total_gib <= limit, "memory": est.to_dict()}


# ---- terminal view -------------------------------------------------------------------------


def _recompute_text(c: Candidate, num_layers: int) -> str:
    rc = c.recompute
    if rc.granularity != "full":
        return rc.granularity
    if (rc.method or "uniform") == "block":
        return f"full, {rc.num_layers}/{num_layers // c.parallel.pp} layers"
    return f"full, every {rc.num_layers or 1} layer(s)"


def _row(c: Candidate, chosen: Candidate | None, gpu_mem: float, num_layers: int) -> list[str]:
    m, p = c.memory.components, c.parallel
    transient = sum(
        v
        for k, v in m.items()
        if k
        in ("logits_and_loss", "backward_working_set", "optimizer_step_temporaries", "comm_buffers")
    )
    mark = "[green]✓[/green]" if c is chosen else ("" if c.fits else "[red]✗[/red]")
    total = f"{c.memory.total_gib:.1f}" if c.fits else f"[red]{c.memory.total_gib:.1f}[/red]"
    ep = f" EP{p.ep}" if p.ep > 1 else ""
    return [
        mark,
        f"{p.tp}×{p.pp}×{p.dp}{ep}",
        _recompute_text(c, num_layers),
        f"{c.micro_batch_size}/{c.global_batch_size}",
        f"{m.get('weights', 0):.1f}",
        f"{m.get('gradients', 0):.1f}",
        f"{m.get('optimizer_states', 0):.1f}",
        f"{m.get('activations', 0):.1f}",
        f"{transient:.1f}",
        total,
        f"{100 * c.memory.total_gib / gpu_mem:.0f}%",
        f"{c.relative_speed:.2f}",
    ]


def show_plan(result: Plan, ref: str, current: dict | None = None, details: bool = True) -> None:
    """The plan as a table with the reasons, then (with `details`) the job fragment, the flags
    and hints; the wizard shows the table and reasons, then the whole job."""
    s, r = result.model, result.request
    active = f" ({s.active_params() / 1e9:.2f}B active)" if s.is_moe else ""
    ui.info(
        f"[bold]{escape(ref)}[/bold]: {s.family}, {s.total_params() / 1e9:.2f}B parameters"
        f"{active}, "
        f"{s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads / "
        f"{s.num_query_groups} KV, vocab {s.vocab_size}"
    )
    ui.info(
        f"{r.gpus} GPUs × {r.gpu_mem_gb:g} GiB ({r.nodes} node{'s' if r.nodes > 1 else ''} of "
        f"{r.gpus_per_node}), {r.seq_len} tokens per row, {r.task}; using at most "
        f"{r.gpu_mem_gb * (1 - r.margin):.1f} GiB per GPU"
    )
    columns = [
        "",
        "TP×PP×DP",
        "recompute",
        "micro/global",
        "weights",
        "grads",
        "optim",
        "activ.",
        "transient",
        "total GiB",
        "of GPU",
        "speed",
    ]
    rows = [
        _row(c, result.chosen, r.gpu_mem_gb, s.num_layers) for c in result.candidates[:SHOWN_ROWS]
    ]
    ui.show(ui.table("Layouts (GiB per GPU, worst pipeline stage; best first)", columns, rows))
    if current:
        if current["valid"]:
            total = current["memory"]["total_gib"]
            ui.check_row(
                "ok" if current["fits"] else "fail",
                "the job file's own settings",
                f"{total:.1f} GiB per GPU" + ("" if current["fits"] else ": does not fit"),
            )
        else:
            ui.check_row("fail", "the job file's own settings", current["reason"])
    if not result.feasible:
        return
    for note in result.notes:
        ui.info(f"  · {escape(note)}")
    if not details:
        return
    ui.info("[bold]Job settings[/bold] (JobConfig fragment):")
    ui.console.print(
        yaml.safe_dump(result.job_fragment(), sort_keys=False).rstrip(),
        markup=False,
        highlight=False,
    )
    ui.info("[bold]Flags:[/bold] " + escape(" ".join(result.flags())))
    flags = result.flags()
    ui.hint(
        "megafleet plan ... -o job.yaml   (write a job with these settings)",
        f"megafleet render {_template_for(result, s)} "
        "--set model=DIR --set dataset=FILE "
        + " ".join(f"--set {f[2:]}={v}" for f, v in zip(flags[::2], flags[1::2])),
    )


def _template_for(result: Plan, shape) -> str:
    """The template to render a planned job from (DPO's covers full fine-tuning and LoRA)."""
    if result.request.task == "rlhf":
        return "dpo"
    return "sft-lora" if result.request.lora else "sft-moe" if shape.is_moe else "sft-full"


def _refusal_hint(result: Plan) -> str:
    if result.lora_alternative is not None:
        return "train LoRA adapters instead: megafleet plan ... --lora (job: train_type: lora)"
    if result.min_gpus:
        return (
            f"use {result.min_gpus} GPUs of this size, or GPUs with more memory, or a shorter "
            "--seq-len"
        )
    return "use more GPUs, GPUs with more memory, or a shorter --seq-len"
