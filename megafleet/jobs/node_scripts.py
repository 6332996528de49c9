"""The files a launch writes into each node's run directory: launch.sh, watch.sh, the env file
and run.json (see megafleet.jobs.layout). Pure functions of the run record; tested as text.

Secrets live in the env file only (mode 0600, sent over the SSH channel's stdin): never in the
scripts, on a command line, in run.json or in a log. The file is deleted when torchrun exits (and
by `megafleet stop`).
"""

from __future__ import annotations

import secrets
import shlex

from megafleet.jobs import layout as L
from megafleet.jobs.records import NodeInfo, RunRecord

q = shlex.quote


def torchrun_argv(run: RunRecord, node: NodeInfo) -> list[str]:
    """`torchrun ...` for one node (as `python -m torch.distributed.run`: a venv made without
    console scripts still has it). Each worker's stdout and stderr go to files of their own
    (`--redirects 3`): torchrun's `--tee` would splice lines of different ranks and streams
    together whenever one writes a partial line (a progress bar)."""
    return [
        node.python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(len(run.nodes)),
        "--node_rank",
        str(node.rank),
        "--nproc_per_node",
        str(run.nproc_per_node),
        "--master_addr",
        run.master_addr,
        "--master_port",
        str(run.master_port),
        "--redirects",
        "3",
        "--log_dir",
        L.TORCHRUN_LOGS,
        *run.entry,
    ]


def launch_script(run: RunRecord, node: NodeInfo) -> str:
    n = len(run.nodes)
    return f"""#!/bin/sh
# megafleet run {run.run_id}: node {node.rank} of {n} ({node.host}), global ranks {_ranks(node)}.
# Written by `megafleet launch`, started in a session of its own:
#   setsid nohup /bin/sh {L.LAUNCH_SH} < /dev/null >> {L.NODE_LOG} 2>&1 &
# Forwarded variables come from the mode-0600 env file; nothing secret is in this script.
cd {q(node.run_dir)} || exit 1
echo $$ > {L.PID}
set -a
. ./{L.ENV_FILE}
set +a
unset {L.WATCH_TOKEN_VAR}
export MEGAFLEET_RUN_ID={q(run.run_id)} MEGAFLEET_NODE_RANK={node.rank} PYTHONUNBUFFERED=1
{_ifname_lines(node)}echo "megafleet: node {node.rank}/{n} ({node.host}) \
starting torchrun at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{" ".join(q(a) for a in torchrun_argv(run, node))}
rc=$?
{q(node.python)} -m megafleet.jobs.nodectl reap . --exit-code "$rc" > /dev/null
rm -f ./{L.ENV_FILE}  # forwarded secrets end with the run
echo "$rc" > {L.EXIT_CODE}.tmp && mv {L.EXIT_CODE}.tmp {L.EXIT_CODE}
echo "megafleet: node {node.rank} torchrun exited with code $rc at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$rc"
"""


def watch_script(run: RunRecord, node: NodeInfo) -> str:
    return f"""#!/bin/sh
# megafleet run {run.run_id}: the fail-fast watcher of node {node.rank} (megafleet/jobs/watcher.py).
cd {q(node.run_dir)} || exit 1
set -a
. ./{L.ENV_FILE}
set +a
export MEGAFLEET_WATCH_RUN={q(run.run_id)}
exec {q(node.python)} -m megafleet.jobs.watcher {q(node.run_dir)}
"""


def start_command(node: NodeInfo) -> str:
    """Start the job and the watcher detached (own session, no terminal, stdin from /dev/null),
    then wait for the launch shell to record itself and print its pid, pgid and start time."""
    d = q(node.run_dir)
    return (
        f"cd {d} && setsid nohup /bin/sh {L.LAUNCH_SH} < /dev/null >> {L.NODE_LOG} 2>&1 &\n"
        f"cd {d} && setsid nohup /bin/sh {L.WATCH_SH} < /dev/null >> {L.WATCHER_LOG} 2>&1 &\n"
        f"{q(node.python)} -m megafleet.jobs.nodectl started {d}"
    )


def new_watch_token() -> str:
    return secrets.token_hex(16)


def env_file(run: RunRecord, values: dict[str, str], watch_token: str) -> str:
    """KEY='value' lines (the scripts source it with `set -a`)."""
    lines = [f"# megafleet run {run.run_id}: the job's environment (mode 0600; never logged)"]
    lines += [f"{k}={q(v)}" for k, v in values.items()]
    lines.append(f"{L.WATCH_TOKEN_VAR}={q(watch_token)}")
    return "\n".join(lines) + "\n"


def node_record(run: RunRecord, node: NodeInfo) -> dict:
    """run.json on the node: what its watcher and nodectl need (no secrets)."""
    return {
        "run_id": run.run_id,
        "node_rank": node.rank,
        "nnodes": len(run.nodes),
        "hosts": [n.host for n in run.nodes],
        "ranks": node.ranks,
        "master_addr": run.master_addr,
        "master_port": run.master_port,
        "watcher_port": run.watcher_port,
        "nproc_per_node": run.nproc_per_node,
        "stall_timeout": run.stall_timeout,
        "stop_grace": run.stop_grace,
        "output_dir": run.output_dir,
        "entry": run.entry,
        "created": run.created,
    }


def _ifname_lines(node: NodeInfo) -> str:
    """Pin gloo and NCCL's bootstrap to the interface towards the master (a value forwarded in
    the env file wins)."""
    if not node.ifname:
        return ""
    i = q(node.ifname)
    return (
        f'export GLOO_SOCKET_IFNAME="${{GLOO_SOCKET_IFNAME:-{i}}}" '
        f'NCCL_SOCKET_IFNAME="${{NCCL_SOCKET_IFNAME:-{i}}}"\n'
    )


def _ranks(node: NodeInfo) -> str:
    if not node.ranks:
        return "-"
    return str(node.ranks[0]) if len(node.ranks) == 1 else f"{node.ranks[0]}-{node.ranks[-1]}"
