"""`megafleet launch`: from a job config to torchrun running on every node.

    plan = plan_launch(job, LaunchOptions(hosts=["gpu1", "gpu2"]))   # reads, changes nothing
    run = start_run(plan, bars)                                       # uploads, writes, starts
    run = launch_job(job, LaunchOptions(...))                         # both

Planning, in order (any failure stops before anything is changed on a node):
1. the job validates with the runtime's schema (remote_runtime.spec.config.validate);
2. forwarded variables (launch.env) are set here;
3. every node answers: home, venv python, megafleet version (must equal ours), GPU count;
4. node 0 is the master; its address is found (megafleet.jobs.preflight.master_address);
5. where data and model go on each node: local dataset files are uploaded to
   ~/megafleet/uploads/<key>/ and the job's paths rewritten; a local model directory that a node
   lacks is uploaded to ~/megafleet/models/<name>-<key>/;
6. the job is resolved with the runtime's dry-run logic for the real world size: locally when the
   model directory is here, else on node 0 (`python -m remote_runtime sft --dry_run true`);
7. every worker connects to the master port and the watcher port on node 0.

Starting: the local run record is saved, files are uploaded (incremental, resumable), each
node's run directory gets job.yaml, run.json, launch.sh, watch.sh and the 0600 env file, then
node 0 starts (job + watcher, detached), then the others.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megafleet import paths
from megafleet.errors import FieldProblem, RemoteCommandError, UsageError, ValidationError
from megafleet.inventory import Inventory
from megafleet.jobs import launch_checks as C
from megafleet.jobs import layout as L
from megafleet.jobs import node_scripts as render
from megafleet.jobs import preflight as P
from megafleet.jobs.records import NodeInfo, RunRecord, new_run_id
from megafleet.jobs.sync import FileCopy, plan_tree, upload
from megafleet.runner import run_on_hosts

Say = Callable[[str], None]


@dataclass
class LaunchOptions:
    hosts: list[str] | None = None  # inventory names (default: launch.hosts, else all)
    local: bool = False  # run on this machine, no SSH
    entry_module: str = "remote_runtime"  # what torchrun runs with -m (tests use a stand-in)
    check_ports: bool = True
    inventory: Inventory | None = None
    pool: object = None  # a ConnectionPool to share (default: a new one)
    say: Say = lambda msg: None  # progress notes for people ("uploading the model ...")
    resume_of: RunRecord | None = None  # continue this run: same id and run directories


@dataclass
class LaunchPlan:
    run: RunRecord
    job: object  # the JobConfig as given
    node_jobs: dict[str, object]  # node name -> JobConfig with that node's paths
    targets: list[P.Target]
    facts: dict[str, P.NodeFacts]
    copies: dict[str, list[FileCopy]]  # node name -> files to bring there
    env_values: dict[str, str] = field(repr=False, default_factory=dict)
    resolved: dict | None = None  # the runtime's dry-run result, when it could run
    notes: list[str] = field(default_factory=list)
    ports: dict | None = None
    checks: list[dict] = field(default_factory=list)  # every preflight check (launch_checks)
    dataset: dict | None = None  # rows and tokens of the local dataset files

    def describe(self) -> dict:
        """What would happen, for --dry-run (no secret values)."""
        from remote_runtime.spec.flags import dump_job

        out = {
            "run": self.run.to_dict(),
            "notes": self.notes,
            "ports": self.ports,
            "checks": self.checks,
            "dataset": self.dataset,
            "nodes": [],
        }
        for node in self.run.nodes:
            out["nodes"].append(
                {
                    "host": node.host,
                    "node_rank": node.rank,
                    "ranks": node.ranks,
                    "run_dir": node.run_dir,
                    "uploads": [
                        {"local": str(c.local), "remote": c.remote, "bytes": c.size}
                        for c in self.copies.get(node.host, [])
                    ],
                    "launch_sh": render.launch_script(self.run, node),
                    "job_yaml": dump_job(self.node_jobs[node.host]),
                    "env_names": self.run.env_names,
                }
            )
        out["resolved"] = self.resolved
        return out


def config_problems(exc, where: str | None = None) -> ValidationError:
    """A runtime ConfigError as the CLI's ValidationError, fields and hints kept."""
    problems = [
        FieldProblem(p.field or "job", p.message, source=where, hint=p.hint) for p in exc.problems
    ]
    hints = [p.hint for p in exc.problems if p.hint]
    return ValidationError(
        problems,
        hint="; ".join(dict.fromkeys(hints))
        or ("fix the job file or flags; `python -m remote_runtime sft --help` lists the options"),
    )


def plan_launch(job, opts: LaunchOptions) -> LaunchPlan:
    from remote_runtime.spec.config import ConfigError, validate

    try:
        validate(job)
    except ConfigError as exc:
        raise config_problems(exc) from None
    env_values = forwarded_env(job.launch.env)
    checks = C.Checks()
    checks.add("job_schema", C.OK, "valid")
    dataset = _check_dataset(job, checks)
    C.check_local_model(checks, job.model.model)
    targets = P.select_targets(
        opts.hosts or job.launch.hosts or None, opts.local, opts.inventory, opts.pool
    )
    facts = P.probe_nodes(targets, job.launch.venv)
    checks.add("nodes_reachable", C.OK, [t.name for t in targets])
    if not opts.local and targets[0].host is not None:
        P.check_versions(facts, job.launch.venv)
    C.record_versions(checks, facts, opts.local or targets[0].host is None)
    C.record_transfers(checks, targets)
    C.check_devices(checks, job.model.device, job.launch.nproc_per_node, facts)
    nproc = P.nproc_per_node(job.launch.nproc_per_node, job.model.device, facts)
    master = P.master_address(targets)
    notes = []
    if P.is_public(master):
        notes.append(
            f"master address {master} is a public address; set private_address for "
            f"{targets[0].name} if the nodes share a private network"
        )
    run = _record(job, targets, facts, nproc, master, opts.entry_module, opts.resume_of)
    for node, ifname in zip(run.nodes, P.interfaces_to_master(targets, master).values()):
        node.ifname = ifname
    node_jobs, copies = place_files(job, run, targets, facts, notes)
    run.model = node_jobs[targets[0].name].model.model
    if not Path(job.model.model).expanduser().is_dir() and not targets[0].local:
        C.check_node_model(checks, job.model.model, targets)
    C.check_batches(checks, job, dataset, run.world_size)
    resolved = resolve_on_runtime(
        node_jobs[targets[0].name], run, targets[0], facts, job, notes, opts.entry_module
    )
    checks.add(
        "runtime_dry_run",
        C.OK if resolved else C.NOTE,
        f"resolved for world size {run.world_size}" if resolved else "schema only",
    )
    plan = LaunchPlan(
        run,
        job,
        node_jobs,
        targets,
        facts,
        copies,
        env_values,
        resolved,
        notes,
        checks=checks.items,
        dataset=dataset.to_dict() if dataset else None,
    )
    if opts.check_ports:
        plan.ports = P.check_ports(targets, facts, master, [run.master_port, run.watcher_port])
        checks.add("master_ports", C.OK, plan.ports)
    return plan


def _check_dataset(job, checks: "C.Checks"):
    """Every row of the local dataset files, before anything is uploaded (dataset_check)."""
    from megafleet.jobs.dataset_check import check_datasets

    model_dir = Path(job.model.model).expanduser()
    try:
        report = check_datasets(job, model_dir if model_dir.is_dir() else None)
    except ValidationError as exc:
        checks.add("dataset", C.FAIL, "; ".join(str(p) for p in exc.problems))
        raise
    if report.files:
        checks.add("dataset", C.OK, report.to_dict())
    return report


def forwarded_env(names: list[str]) -> dict[str, str]:
    with_values = [n.split("=", 1)[0] for n in names if "=" in n]
    if with_values:  # never echo what follows the `=`: it is usually a token
        raise UsageError(
            f"launch.env takes variable names, not NAME=value: got a value for "
            f"{', '.join(with_values)} (not shown)",
            hint=f"export {with_values[0]}=... in this shell, then pass "
            f"--env {' '.join(with_values)}",
        )
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise UsageError(
            f"launch.env: {', '.join(missing)} not set in this shell",
            hint="export them here first; their values go to the nodes' 0600 env file only",
        )
    return {n: os.environ[n] for n in names}


def _record(job, targets, facts, nproc, master, entry_module, previous=None) -> RunRecord:
    run_id = previous.run_id if previous else new_run_id()
    nodes = []
    for t in targets:
        run_dir = (
            str(paths.runs_dir() / run_id / "node0")
            if t.local
            else f"{facts[t.name].home.rstrip('/')}/{L.WORKDIR}/{L.RUNS}/{run_id}"
        )
        if previous:
            run_dir = _same_node(previous, t, run_dir)
        nodes.append(
            NodeInfo(
                rank=t.rank,
                host=t.name,
                run_dir=run_dir,
                python=facts[t.name].python,
                ranks=list(range(t.rank * nproc, (t.rank + 1) * nproc)),
                host_entry=t.host.to_dict() if t.host else None,
            )
        )
    run = RunRecord(
        run_id=run_id,
        created=time.time(),
        task=job.task,
        nodes=nodes,
        master_addr=master,
        master_port=job.launch.master_port,
        watcher_port=job.launch.watcher_port or job.launch.master_port + 1,
        nproc_per_node=nproc,
        world_size=nproc * len(targets),
        entry=["-m", entry_module, job.task, "--config", L.JOB_YAML],
        output_dir=job.checkpoint.output_dir,
        stall_timeout=job.launch.stall_timeout,
        stop_grace=job.launch.stop_grace,
        local=targets[0].local,
        env_names=list(job.launch.env),
        model=job.model.model,
    )
    if previous:
        if nproc != previous.nproc_per_node or len(targets) != len(previous.nodes):
            raise UsageError(
                f"resume {run_id}: the run had {len(previous.nodes)} node(s) × "
                f"{previous.nproc_per_node} process(es); these nodes give "
                f"{len(targets)} × {nproc}. Its checkpoint's optimizer shards and RNG "
                "states belong to the old ranks",
                hint="resume on the same nodes with "
                "the same launch.nproc_per_node, or start a new run from its weights",
            )
        run.created, run.attempt = previous.created, previous.attempt + 1
    return run


def _same_node(previous: RunRecord, t, run_dir: str) -> str:
    """A resumed run keeps each node's run directory: same host at the same node rank."""
    if t.rank >= len(previous.nodes) or previous.node(t.rank).host != t.name:
        raise UsageError(
            f"resume {previous.run_id}: node {t.rank} was "
            f"{previous.node(t.rank).host if t.rank < len(previous.nodes) else 'absent'}, "
            f"not {t.name}: each node holds the checkpoint shards of its own ranks",
            hint="resume on the run's hosts in their order: "
            + ",".join(n.host for n in previous.nodes),
        )
    return previous.node(t.rank).run_dir


def upload_key(path: Path) -> str:
    """Where an operator file lands on the nodes: the same local path always maps to the same
    place, so a later launch finds it there and sends nothing."""
    return hashlib.sha256(f"{socket.gethostname()}:{path.resolve()}".encode()).hexdigest()[:12]


def place_files(job, run: RunRecord, targets, facts, notes: list[str]):
    """Per node: the job with node paths, and the files to upload (see the module docstring)."""
    node_jobs = {t.name: copy.deepcopy(job) for t in targets}
    copies: dict[str, list[FileCopy]] = {t.name: [] for t in targets}
    if targets[0].local:
        nj = node_jobs[targets[0].name]
        nj.data.dataset = [_local_spec(s) for s in job.data.dataset]
        if Path(job.model.model).expanduser().is_dir():
            nj.model.model = str(Path(job.model.model).expanduser().resolve())
        return node_jobs, copies
    for nj in node_jobs.values():
        nj.data.dataset = []
    for spec in job.data.dataset:
        path, sep, count = spec.partition("#")
        local = Path(path).expanduser()
        if not local.exists():
            _require_on_nodes(targets, path, "data.dataset", "is not a file here")
        for t in targets:
            if not local.exists():
                node_jobs[t.name].data.dataset.append(spec)
                continue
            base = (
                f"{facts[t.name].home.rstrip('/')}/{L.WORKDIR}/{L.UPLOADS}/"
                f"{upload_key(local)}/{local.name}"
            )
            copies[t.name] += plan_tree(local, base)
            node_jobs[t.name].data.dataset.append(base + sep + count)
    _place_model(job, targets, facts, node_jobs, copies, notes)
    return node_jobs, copies


def _local_spec(spec: str) -> str:
    path, sep, count = spec.partition("#")
    local = Path(path).expanduser()
    if not local.exists():
        raise ValidationError([FieldProblem("data.dataset", f"{path}: no such file")])
    return str(local.resolve()) + sep + count


def _place_model(job, targets, facts, node_jobs, copies, notes) -> None:
    model = job.model.model
    local = Path(model).expanduser()
    if not local.is_dir():
        _require_on_nodes(
            targets,
            f"{model}/config.json",
            "model.model",
            "is not a model directory here (a Hugging Face checkpoint directory)",
        )
        return
    there = run_on_hosts(
        [t.runner for t in targets], f"test -f {shlex.quote(str(local))}/config.json", timeout=60
    )
    lacking = [t for t in targets if not there[t.name].ok]
    if not lacking:
        notes.append(f"model {model}: found at the same path on every node; not uploaded")
        return
    tree = plan_tree(local, "")
    size = sum(c.size for c in tree)
    notes.append(
        f"model {model} ({size / 2**20:.1f} MiB) is not on {', '.join(t.name for t in lacking)}:"
        " uploading it (incrementally)"
    )
    for t in lacking:
        base = (
            f"{facts[t.name].home.rstrip('/')}/{L.WORKDIR}/{L.MODELS}/"
            f"{local.resolve().name}-{upload_key(local)}"
        )
        copies[t.name] += [FileCopy(c.local, base + c.remote, c.size, c.sha256) for c in tree]
        node_jobs[t.name].model.model = base


def _require_on_nodes(targets, path: str, field_name: str, why_here: str) -> None:
    """A path that is not on this machine must exist on every node."""
    res = run_on_hosts([t.runner for t in targets], f"test -e {shlex.quote(path)}", timeout=60)
    missing = [n for n, r in res.items() if not r.ok]
    if missing:
        raise ValidationError(
            [FieldProblem(field_name, f"{path} {why_here}, and not on {', '.join(missing)}")],
            hint="give a path on this machine (it is uploaded) or one that exists on every node",
        )


def resolve_on_runtime(
    node_job, run: RunRecord, node0, facts, job, notes, entry_module
) -> dict | None:
    """The runtime's own dry run for the real world size (see the module docstring, step 6)."""
    from remote_runtime.spec.config import ConfigError
    from remote_runtime.spec.resolve import resolve_job

    if Path(job.model.model).expanduser().is_dir():
        local_job = copy.deepcopy(job)
        local_job.model.model = str(Path(job.model.model).expanduser())
        try:
            return resolve_job(local_job, run.world_size)
        except ConfigError as exc:
            raise config_problems(exc) from None
    return _node_dry_run(node_job, run, node0, facts, entry_module)


def _node_dry_run(node_job, run, node0, facts, entry_module) -> dict:
    """The runtime's dry run on node 0 (the model lives there); its problems come back as JSON."""
    from remote_runtime.spec.config import ConfigError
    from remote_runtime.spec.flags import dump_job

    py = shlex.quote(facts[node0.name].python)
    r = node0.runner.run(
        f"WORLD_SIZE={run.world_size} {py} -m {entry_module} {node_job.task} "
        "--config /dev/stdin --dry_run true",
        stdin=dump_job(node_job),
        timeout=300,
    )
    if r.exit_code == 2:
        try:
            exc = ConfigError.from_dict(json.loads(r.stdout))
        except (ValueError, TypeError, KeyError):  # not the runtime's JSON: show what it printed
            lines = [x.removeprefix("error: ") for x in r.stderr.strip().splitlines() if x.strip()]
            exc = ConfigError([(f"{node0.name} dry run", x) for x in lines[-20:]])
        raise config_problems(exc, where=f"{node0.name} dry run") from None
    if not r.ok:
        raise RemoteCommandError(f"{node0.name}: the runtime's dry run failed", hint=r.describe())
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"output": r.stdout[-2000:]}


# -- starting ---------------------------------------------------------------------------------


def start_run(plan: LaunchPlan, bars=None, say: Say = lambda m: None) -> RunRecord:
    """Upload, write each node's run directory, start node 0 then the others; return the saved
    record (state "running"). On failure the record says "failed" and the error names the node."""
    from remote_runtime.spec.flags import dump_job

    run = plan.run
    plan.run.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (run.dir / "job.yaml").write_text(dump_job(plan.job))
    (run.dir / "node-job.yaml").write_text(dump_job(plan.node_jobs[run.nodes[0].host]))
    run.mark_launcher()
    run.save()
    try:
        _upload_all(plan, bars, say)
        token = render.new_watch_token()
        _write_run_dirs(plan, token)
        _start_nodes(plan, say)
    except BaseException:
        run.state = "failed"
        run.save()
        _stop_started(run)
        raise
    run.state = "running"
    run.save()
    return run


def _stop_started(run: RunRecord) -> None:
    """A launch that failed half-way stops the nodes it already started (they would wait for
    the others until the watcher's stall timeout)."""
    if not any(n.pid for n in run.nodes):
        return
    from megafleet.jobs.stop import stop_run

    try:
        stop_run(run, grace=min(run.stop_grace, 10))
    except Exception:  # the launch error matters more; `megafleet stop` can finish the job
        pass
    run.state = "failed"
    run.save()


def _upload_all(plan: LaunchPlan, bars, say: Say) -> None:
    by_runner = {t.name: t for t in plan.targets}
    work = [t for t in plan.targets if plan.copies.get(t.name)]
    if not work:
        return
    say(f"uploading to {', '.join(t.name for t in work)} (files already there are skipped)")

    def one(runner):
        copies = plan.copies[runner.name]
        cb = bars.bar(f"upload {runner.name}", sum(c.size for c in copies)) if bars else None
        return upload(runner, plan.facts[runner.name].python, copies, cb)

    results = run_on_hosts([by_runner[t.name].runner for t in work], one)
    for name, res in results.items():
        res.check()
        rep = res.value
        plan.run.uploads.append(
            {
                "host": name,
                "sent": len(rep.sent),
                "skipped": len(rep.skipped),
                "resumed": rep.resumed,
                "bytes_sent": rep.bytes_sent,
                "bytes_total": rep.bytes_total,
            }
        )


def _write_run_dirs(plan: LaunchPlan, token: str) -> None:
    from remote_runtime.spec.flags import dump_job

    run = plan.run
    env_text = render.env_file(run, plan.env_values, token)

    def write(runner):
        node = next(n for n in run.nodes if n.host == runner.name)
        files = [
            {"name": L.JOB_YAML, "text": dump_job(plan.node_jobs[node.host]), "mode": 0o644},
            {
                "name": L.RUN_JSON,
                "text": json.dumps(render.node_record(run, node), indent=1),
                "mode": 0o644,
            },
            {"name": L.LAUNCH_SH, "text": render.launch_script(run, node), "mode": 0o755},
            {"name": L.WATCH_SH, "text": render.watch_script(run, node), "mode": 0o755},
            {"name": L.ENV_FILE, "text": env_text, "mode": 0o600},
        ]
        py = shlex.quote(node.python)
        return runner.run(
            f"{py} -m megafleet.jobs.nodectl write {shlex.quote(node.run_dir)}",
            stdin=json.dumps({"files": files, "new_attempt": run.attempt > 1}),
            timeout=120,
        )

    results = run_on_hosts([t.runner for t in plan.targets], write)
    for res in results.values():
        res.check()


def _start_nodes(plan: LaunchPlan, say: Say) -> None:
    run = plan.run
    targets = {t.name: t for t in plan.targets}
    first, rest = run.nodes[0], run.nodes[1:]
    say(f"starting node 0 ({first.host}, master {run.master_addr}:{run.master_port})")
    _start_one(targets[first.host].runner, first)
    if rest:
        say(f"starting {', '.join(n.host for n in rest)}")
        res = run_on_hosts(
            [targets[n.host].runner for n in rest],
            lambda r: _start_one(r, next(n for n in rest if n.host == r.name)),
        )
        for r in res.values():
            r.check()


def _start_one(runner, node: NodeInfo) -> NodeInfo:
    r = runner.run(render.start_command(node), timeout=120).check()
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteCommandError(
            f"{node.host}: could not start the job", hint=r.describe()
        ) from None
    if not info.get("ok") and info.get("exit_code") is None:
        raise RemoteCommandError(
            f"{node.host}: the job did not start ({info.get('error')})",
            hint="\n".join(info.get("log_tail") or []) or None,
        )
    node.pid, node.pgid = info.get("pid"), info.get("pgid")
    node.start_time, node.start_ticks = info.get("start_time"), info.get("start_ticks")
    return node


def launch_job(job, opts: LaunchOptions | None = None, bars=None) -> RunRecord:
    """Plan and start a job (the API the wizard and `megafleet demo` call)."""
    opts = opts or LaunchOptions()
    own_pool = opts.pool is None and not opts.local
    if own_pool:
        from megafleet.ssh.connection import ConnectionPool

        inv = opts.inventory or Inventory.load()
        opts = LaunchOptions(
            **{**vars(opts), "inventory": inv, "pool": ConnectionPool(inv.jump_for)}
        )
    try:
        plan = plan_launch(job, opts)
        for note in plan.notes:
            opts.say(note)
        return start_run(plan, bars, opts.say)
    finally:
        if own_pool:
            opts.pool.close()


__all__ = ["LaunchOptions", "LaunchPlan", "launch_job", "plan_launch", "start_run"]
