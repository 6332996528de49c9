"""The checks `megafleet launch` makes before anything starts, each recorded for
`launch --dry-run --json` (`checks`: name, status ok|note|fail, detail). A failing check raises
with the fix; the launch stops before any file is uploaded.

Devices: `--device cuda` needs a GPU on every node; more processes per node than GPUs (or, on
CPU, than cores) is refused. Model: every file of a local model directory must be readable (and
on the nodes, when the model is already there). Data: every row of the local dataset files
(megafleet.jobs.dataset_check), and enough sequences per epoch for one global batch.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megafleet import __version__
from megafleet.errors import FieldProblem, ValidationError

OK, NOTE, FAIL = "ok", "note", "fail"


@dataclass
class Checks:
    items: list[dict] = field(default_factory=list)

    def add(self, name: str, status: str, detail) -> None:
        self.items.append({"name": name, "status": status, "detail": detail})

    def refuse(self, name: str, problems: list[FieldProblem], hint: str) -> None:
        self.add(name, FAIL, "; ".join(str(p) for p in problems))
        raise ValidationError(problems, hint=hint)


def record_versions(checks: Checks, facts, local: bool) -> None:
    detail = {"operator": __version__, **{n: f.version for n, f in facts.items()}}
    checks.add(
        "megafleet_version",
        OK if not local else NOTE,
        detail if not local else {"operator": __version__, "nodes": "this machine"},
    )


def record_transfers(checks: Checks, targets) -> None:
    """How files reach each node: SFTP, or streamed over the exec channel where sshd has none."""
    detail = {}
    for t in targets:
        if t.local:
            detail[t.name] = "local copy"
            continue
        has = t.runner.connection().has_sftp()
        detail[t.name] = (
            "sftp"
            if has
            else (
                "exec channel (sshd has no SFTP subsystem; add `Subsystem sftp internal-sftp` to "
                "sshd_config for SFTP)"
            )
        )
    status = OK if all(v in ("sftp", "local copy") for v in detail.values()) else NOTE
    checks.add("file_transfer", status, detail)


def check_devices(checks: Checks, device: str, requested: int | None, facts) -> None:
    """`--device cuda` without GPUs, and more processes than GPUs (or cores on CPU)."""
    gpus = {n: f.gpus for n, f in facts.items()}
    problems = []
    if device == "cuda":
        problems += [
            FieldProblem("model.device", f"cuda, but {n} has no NVIDIA GPU (nvidia-smi lists none)")
            for n, g in gpus.items()
            if not g
        ]
    if requested:
        for n, f in facts.items():
            if device != "cpu" and f.gpus and requested > f.gpus:
                problems.append(
                    FieldProblem(
                        "launch.nproc_per_node",
                        f"{requested} processes, but {n} has {f.gpus} GPU(s)",
                    )
                )
            elif (device == "cpu" or not f.gpus) and f.cores and requested > f.cores:
                problems.append(
                    FieldProblem(
                        "launch.nproc_per_node",
                        f"{requested} processes on CPU, but {n} has {f.cores} core(s)",
                    )
                )
    if problems:
        least_gpus = min(gpus.values()) if gpus else 0
        checks.refuse("devices", problems, hint=_device_fix(device, least_gpus, facts))
    checks.add("devices", OK, {n: {"gpus": f.gpus, "cores": f.cores} for n, f in facts.items()})


def _device_fix(device: str, least_gpus: int, facts) -> str:
    cores = min((f.cores for f in facts.values() if f.cores), default=1)
    if device == "cuda" and not least_gpus:
        return (
            "on hosts without GPUs run on CPU: --device cpu (with --nproc_per_node up to the "
            "core count); or launch on GPU hosts (--hosts)"
        )
    if least_gpus:
        return f"set --nproc_per_node {least_gpus} (or leave it out: one process per GPU)"
    return f"set --nproc_per_node {max(1, min(cores, 2))} (at most {cores}, the cores per node)"


def check_local_model(checks: Checks, model: str) -> None:
    """Every file of a local model directory opens for reading (weights first of all)."""
    root = Path(model).expanduser()
    if not root.is_dir():
        return
    bad = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink() and not p.exists():
            bad.append(
                FieldProblem("model.model", f"{p}: a broken symbolic link (to {os.readlink(p)})")
            )
        elif p.is_file():
            try:
                with open(p, "rb") as f:
                    f.read(1)
            except OSError as exc:
                bad.append(FieldProblem("model.model", f"{p}: cannot be read ({exc.strerror})"))
    if bad:
        checks.refuse(
            "model_files",
            bad,
            hint=f"make the files readable for {_user()} "
            f"(e.g. chmod -R a+rX {root}) or point --model at a readable copy",
        )
    checks.add("model_files", OK, f"{root}: every file readable")


def check_node_model(checks: Checks, model: str, targets) -> None:
    """A model already on the nodes: its files must be readable there too."""
    from megafleet.runner import run_on_hosts

    q = shlex.quote(model)
    find = f"find {q} -maxdepth 2 -type f ! -readable 2>/dev/null | head -5"
    res = run_on_hosts([t.runner for t in targets], find, timeout=60)
    bad = [
        FieldProblem("model.model", f"{name}: {line} cannot be read")
        for name, r in res.items()
        if r.ok
        for line in r.stdout.split()
    ]
    if bad:
        checks.refuse(
            "model_files",
            bad,
            hint="make the files readable for the SSH user on those "
            "nodes (chmod -R a+rX MODEL_DIR)",
        )
    checks.add("model_files", OK, f"{model}: readable on {', '.join(res)}")


def check_batches(checks: Checks, job, report, world_size: int) -> None:
    """At least one global batch per epoch; else the value of global_batch_size to set."""
    from megafleet.jobs.dataset_check import samples_per_epoch

    if report is None or not report.files:
        return
    least, most = samples_per_epoch(report, job)
    tr, par = job.train, job.parallel
    dp = max(
        1,
        world_size
        // (
            par.tensor_model_parallel_size
            * par.pipeline_model_parallel_size
            * par.context_parallel_size
        ),
    )
    unit = tr.micro_batch_size * dp
    what = (
        f"{least} sequence(s) per epoch"
        if least == most
        else f"{least} to {most} sequences per epoch (packed to max_length={job.data.max_length})"
    )
    if least >= tr.global_batch_size:
        checks.add("batches", OK, f"{what}; global_batch_size={tr.global_batch_size}")
        return
    fit, rows_fit = least // unit * unit, most // unit * unit
    fix = (
        f"set --global_batch_size {fit}"
        if fit
        else "the data holds fewer sequences than one step needs "
        f"(micro_batch_size × data parallel = {unit}): add data"
    )
    if job.data.packing and rows_fit > fit:
        fix += f", or --packing false with --global_batch_size {rows_fit}"
    if most >= tr.global_batch_size:  # packing may or may not leave enough: the runtime decides
        checks.add(
            "batches",
            NOTE,
            f"{what}, perhaps fewer than global_batch_size="
            f"{tr.global_batch_size}: {fix} if the run stops for lack of data",
        )
        return
    checks.refuse(
        "batches",
        [
            FieldProblem(
                "train.global_batch_size",
                f"{tr.global_batch_size}, but the dataset gives {what}: not one full global batch",
            )
        ],
        hint=fix,
    )


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return "this user"
