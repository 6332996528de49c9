"""`megafleet resume RUN [-- FLAGS]`: continue a run from its newest complete checkpoint.

The run keeps its id, its hosts in the same order and each node's run directory; the job is the one
recorded at its launch (`$MEGAFLEET_HOME/runs/<id>/job.yaml`) with runtime flags given after `--` on
top (a larger `--train_iters`, say), and `checkpoint.resume=auto`. On the nodes, the previous
launch's state files move to `attempts/<n>/`, node.log continues, and the runtime takes the newest
step complete on every node, sends each node what only rank 0's node holds (the weights, the
optimizer checkpoint's metadata, rank 0's shard file), and loads every rank's own optimizer shard
and RNG state: the data order, the RNG and the step counter continue ("resumed from ... at step N"
in the log). A changed layout is refused before anything starts: other hosts or another order,
another process count per node, other parallel sizes.
"""

from __future__ import annotations

from megafleet.errors import UsageError
from megafleet.jobs.records import RunRecord

# Fields whose change would give ranks other shards than the ones they saved.
LAYOUT_FIELDS = (
    ("parallel", "tensor_model_parallel_size"),
    ("parallel", "pipeline_model_parallel_size"),
    ("parallel", "context_parallel_size"),
    ("parallel", "use_distributed_optimizer"),
    ("launch", "nproc_per_node"),
    ("checkpoint", "output_dir"),
)


def resume_job(run: RunRecord, overrides: list[str]):
    """The run's recorded job with `overrides` applied and checkpoint.resume=auto."""
    from megafleet.jobs.launch import config_problems
    from remote_runtime.spec.config import ConfigError
    from remote_runtime.spec.flags import job_from_argv

    path = run.dir / "job.yaml"
    if not path.is_file():
        raise UsageError(
            f"run {run.run_id}: its job file {path} is missing; nothing to resume from"
        )
    try:
        before = job_from_argv(["--config", str(path)], task=run.task)
        job = job_from_argv(["--config", str(path), *overrides], task=run.task)
    except ConfigError as exc:
        raise config_problems(exc) from None
    for group, name in LAYOUT_FIELDS:
        old, new = getattr(getattr(before, group), name), getattr(getattr(job, group), name)
        if old != new:
            raise UsageError(
                f"resume {run.run_id}: {group}.{name} was {old}, now {new}: the "
                "checkpoint's optimizer shards and RNG states belong to the old layout",
                hint="resume with the run's own layout, or start a new run with "
                "--model pointing at a fetched checkpoint (`megafleet fetch`)",
            )
    if job.checkpoint.resume in (None, ""):
        job.checkpoint.resume = "auto"
    return job


def check_not_running(run: RunRecord, pool=None) -> dict:
    """The run must have ended on every node before it continues (its processes carry the same
    run id)."""
    from megafleet.jobs.status import run_status

    status = run_status(run, lines=1, pool=pool)
    busy = [n["host"] for n in status["nodes"] if n.get("state") in ("running", "starting")]
    unreachable = [n["host"] for n in status["nodes"] if not n.get("reachable", True)]
    if busy:
        raise UsageError(
            f"run {run.run_id} is still running on {', '.join(busy)}",
            hint=f"stop it first: megafleet stop {run.run_id}",
        )
    if unreachable:
        raise UsageError(
            f"run {run.run_id}: {', '.join(unreachable)} cannot be reached; a resumed "
            "run needs every node that holds its checkpoint shards",
            hint="megafleet hosts check, then resume again",
        )
    return status


def resume_options(run: RunRecord, say=lambda m: None):
    from megafleet.jobs.launch import LaunchOptions

    entry = run.entry[1] if len(run.entry) > 1 and run.entry[0] == "-m" else "remote_runtime"
    return LaunchOptions(
        hosts=None if run.local else [n.host for n in run.nodes],
        local=run.local,
        entry_module=entry,
        resume_of=run,
        say=say,
    )
