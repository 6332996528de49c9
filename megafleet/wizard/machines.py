"""The wizard's first half: where training runs, which hosts, and what they carry.

Hosts are checked as soon as they are named (SSH reachability, user, GPUs: the `megafleet hosts
check` probe and table), through the wizard's connection pool, whose host keys are staged until
the job is saved (see megafleet.wizard.state).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from megafleet import ui
from megafleet.errors import UsageError
from megafleet.inventory import Host, parse_target
from megafleet.wizard.ask import Asker
from megafleet.wizard.state import WizardState

WHERE = [
    ("local", "This machine (no SSH; local mode)"),
    ("ssh", "Remote machines over SSH"),
    ("ec2", "EC2 instances, found by tag"),
]


@dataclass
class GpuFacts:
    per_node: int  # GPUs per node (0: CPU only)
    mem_gib: float  # memory of one GPU
    name: str
    source: str  # where the numbers come from, for the summary line


# -- checking hosts ------------------------------------------------------------------------------


def check_hosts(state: WizardState, targets: list) -> list[dict]:
    """`hosts check` for inventory Hosts (or Runners); rows kept in the state, table shown."""
    from megafleet.cli.hosts_view import show_report
    from megafleet.fleetcheck import check_fleet

    with ui.err_console.status(f"checking {', '.join(t.name for t in targets)} ..."):
        report = check_fleet(targets, state.pool)
    state.rows.update({r["name"]: r for r in report["hosts"]})
    show_report(report)
    return report["hosts"]


def show_fleet(state: WizardState, names: list[str]) -> None:
    """What only shows with the chosen hosts together: mixed GPU models, counts or drivers
    (each host's own problems were shown when it was checked)."""
    from megafleet.fleetcheck import fleet_findings

    rows = [state.rows[n] for n in names if n in state.rows]
    for f in fleet_findings(rows):
        if f.code.startswith("mixed_"):
            ui.check_row("warn", escape(f.message))


# -- where ---------------------------------------------------------------------------------------


def ask_where(ask: Asker, state: WizardState) -> str:
    return ask.select("where", "Where should training run?", WHERE, default="ssh")


def local_node(ask: Asker, state: WizardState) -> list[str]:
    """This machine as the only node: checked like a host (GPUs, memory)."""
    from megafleet.jobs.access import local_runner

    check_hosts(state, [local_runner()])
    state.nodes = ["local"]
    return state.nodes


# -- SSH hosts -----------------------------------------------------------------------------------


def default_key() -> str:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        p = Path.home() / ".ssh" / name
        if p.is_file():
            return str(p)
    return ""


def default_name(address: str, taken: set[str]) -> str:
    if re.fullmatch(r"[\d.:]+", address):  # an IP address: host-10-0-0-5
        base = "host-" + re.sub(r"[.:]", "-", address)
    else:  # a DNS name: its first label
        base = re.sub(r"[^A-Za-z0-9._-]", "-", address.split(".")[0])
    name, n = base or "host", 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _address_problem(text: str) -> str | None:
    if not text.strip():
        return "give an address (IP or DNS name)"
    try:
        _, address, _ = parse_target(text.strip())
    except ValueError as exc:
        return str(exc)
    host = Host(name="x", address=address)
    return next((p.message for p in host.validate()), None)


def _key_problem(text: str) -> str | None:
    if not text.strip():
        return None  # the SSH agent and ~/.ssh keys
    from megafleet.ssh.errors import IdentityProblem
    from megafleet.ssh.keys import load_identity

    try:
        load_identity(str(Path(text).expanduser()), "new host")
    except IdentityProblem as exc:
        if exc.problem == "passphrase":
            return None  # usable through the agent; connecting will say so if not
        return f"{exc.reason} (fix: {exc.hint})" if exc.hint else exc.reason
    return None


def ask_new_host(ask: Asker, state: WizardState, prev: Host | None = None) -> Host:
    """Address, user, key and name of one host (validated as typed)."""
    import getpass

    target = ask.text(
        "host_address",
        "Host address ([user@]address[:port]):",
        default=prev.address if prev else "",
        validate=_address_problem,
    )
    user, address, port = parse_target(target.strip())
    user = ask.text(
        "host_user",
        f"SSH user on {address}:",
        default=user or (prev.user if prev else getpass.getuser()),
        validate=lambda t: None if t.strip() else "give a user name",
    )
    key = ask.text(
        "host_key",
        "Private key to log in with (empty: SSH agent / ~/.ssh keys):",
        default=(prev.identity_file if prev else default_key()) or "",
        validate=_key_problem,
        path=True,
    )
    taken = set(state.inventory.names())
    name = ask.text(
        "host_name",
        "Name for this host in megafleet:",
        default=prev.name if prev else default_name(address, taken),
        validate=lambda t: _name_problem(t, taken),
    )
    key_path = str(Path(key).expanduser().absolute()) if key.strip() else None
    return Host(
        name=name.strip(),
        address=address,
        user=user.strip(),
        port=port or 22,
        identity_file=key_path,
    )


def _name_problem(text: str, taken: set[str]) -> str | None:
    if text.strip() in taken:
        return f"{text.strip()} is already in the inventory: choose another name"
    problems = Host(name=text.strip(), address="x").validate()
    return problems[0].message if problems else None


def add_hosts(ask: Asker, state: WizardState, chosen: list[str]) -> list[str]:
    """New hosts, each checked at once, until the user is done."""
    preset, hosts = ask.preset("new_hosts")
    if preset:
        for entry in hosts or []:
            _add_preset(state, entry, chosen)
        return chosen
    while ask.confirm("add_host", "Add a new host?", default=not chosen):
        host = one_checked_host(ask, state)
        if host is not None:
            state.added.append(host.name)
            chosen.append(host.name)
    return chosen


def one_checked_host(ask: Asker, state: WizardState) -> Host | None:
    """Ask for a host and check it at once; on failure enter it again, keep it, or drop it."""
    prev = None
    while True:
        host = ask_new_host(ask, state, prev)
        state.inventory.add(host)
        if check_hosts(state, [host])[0]["ok"]:
            return host
        what = ask.select(
            "host_failed",
            f"{host.name} failed the check. What now?",
            [
                ("retry", "Enter it again"),
                ("keep", "Keep it anyway (fix it later)"),
                ("drop", "Leave it out"),
            ],
            default="retry",
        )
        if what == "keep":
            return host
        state.inventory.remove(host.name)
        state.rows.pop(host.name, None)
        if what == "drop":
            return None
        prev = host


def _add_preset(state: WizardState, entry, chosen: list[str]) -> None:
    if not isinstance(entry, dict) or "address" not in entry:
        raise UsageError("answers file: new_hosts entries need address (and user, key, name)")
    user, address, port = parse_target(str(entry["address"]))
    key = entry.get("key")
    host = Host(
        name=str(entry.get("name") or default_name(address, set(state.inventory.names()))),
        address=address,
        user=str(entry.get("user") or user or os.environ.get("USER", "root")),
        port=port or 22,
        identity_file=str(Path(key).expanduser().absolute()) if key else None,
    )
    state.inventory.add(host)
    check_hosts(state, [host])
    state.added.append(host.name)
    chosen.append(host.name)


def ssh_hosts(ask: Asker, state: WizardState) -> list[str]:
    chosen: list[str] = []
    if len(state.inventory):
        names = state.inventory.names()
        chosen = ask.checkbox(
            "hosts",
            f"Hosts from your inventory ({state.inventory.path}) to use:",
            [(n, f"{n}  ({state.inventory.hosts[n].target})") for n in names],
            checked=names,
        )
        if chosen:
            check_hosts(state, state.inventory.select(chosen))
    add_hosts(ask, state, chosen)
    if not chosen:
        raise UsageError("no hosts chosen", hint="add one: megafleet hosts add NAME USER@ADDRESS")
    return chosen


# -- EC2 -----------------------------------------------------------------------------------------


def _default_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def ec2_hosts(ask: Asker, state: WizardState) -> list[str]:
    """Find instances by tag, stage their import, run `ec2 check`, then check SSH."""
    from megafleet.cli.ec2_view import show_check, show_import_plan, show_instances
    from megafleet.ec2 import check_instances, find_instances, import_instances
    from megafleet.ec2.importer import ID_TAG, TYPE_TAG, apply_plan, check_key

    region = ask.text(
        "ec2_region",
        "AWS region:",
        default=_default_region(),
        validate=lambda t: (
            None
            if re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", t.strip())
            else "a region name such as us-east-1"
        ),
    )
    tags_text = ask.text(
        "ec2_tags",
        "Instance tags to match (KEY=VALUE, comma-separated; empty: all instances):",
        default="",
    )
    tags = [t.strip() for t in tags_text.split(",") if t.strip()]
    with ui.err_console.status(f"looking for instances in {region} ..."):
        instances = find_instances(region.strip(), tags)
    where = f"in {region}" + (f" tagged {', '.join(tags)}" if tags else "")
    if not instances:
        raise UsageError(
            f"no instances {where}", hint="megafleet ec2 list --region REGION shows what is there"
        )
    show_instances(instances, f"{len(instances)} instance(s) {where}", compact=True)
    user = ask.text(
        "ec2_user",
        "SSH user on the instances:",
        default="ubuntu",
        validate=lambda t: None if t.strip() else "give a user name",
    )
    key = ask.text(
        "ec2_key",
        "Private key of the instances' key pair:",
        default=default_key(),
        validate=lambda t: _key_problem(t) if t.strip() else "give the key file",
        path=True,
    )
    _, warning = check_key(key)
    if warning:
        ui.warn(warning)
    # Planned and validated against the inventory, not saved: the hosts join the in-memory
    # inventory now and are written with the job (see megafleet.wizard.state).
    plan = import_instances(
        instances, user.strip(), key, inventory=state.inventory, dry_run=True
    ).actions
    apply_plan(plan, state.inventory)
    show_import_plan(plan, state.inventory.path, dry_run=True)
    names = []
    for a in plan:
        host = state.inventory.hosts.get(a.name) if a.name else None
        if host is None or host.tags.get(ID_TAG) != a.instance_id:
            continue
        if a.action == "add":
            state.added.append(a.name)
        names.append(a.name)
        state.ec2_types[a.name] = host.tags.get(TYPE_TAG, "")
    with ui.err_console.status("checking the instances (network, placement, SSH) ..."):
        report = check_instances(
            region.strip(), tags, inventory=state.inventory, ssh_timeout=min(state.timeout, 5.0)
        )
    show_check(report)
    if not names:
        raise UsageError("no running instance to train on", hint="megafleet ec2 start --ids ...")
    rows = check_hosts(state, state.inventory.select(names))
    if not all(r["ok"] for r in rows):
        keep = ask.confirm(
            "keep_unreachable",
            "Some instances failed the SSH check. Go on anyway "
            "(GPU facts from the instance type; the launch needs SSH)?",
            default=False,
        )
        if not keep:
            raise UsageError(
                "stopped at the SSH check",
                hint="fix SSH (security group, key, user) and run `megafleet wizard` again",
            )
    return names


# -- several hosts, GPUs -------------------------------------------------------------------------


def ask_distribute(ask: Asker, state: WizardState, names: list[str]) -> list[str]:
    if len(names) < 2:
        return names
    how = ask.select(
        "distribute",
        f"{len(names)} hosts: train across all of them?",
        [
            ("all", f"Distributed across all {len(names)} hosts ({', '.join(names)})"),
            ("first", f"The first host only ({names[0]})"),
        ],
        default="all",
    )
    return names if how == "all" else names[:1]


def gpu_facts(state: WizardState) -> GpuFacts:
    """GPUs per node and memory per GPU from the host checks (the fewest over the nodes), else
    from the EC2 instance type; 0 GPUs when no node has any."""
    from megafleet.ec2 import catalog

    found = []
    for name in state.nodes:
        row = state.rows.get(name) or {}
        gpus = row.get("gpus") or []
        if gpus:
            mib = min(g.get("memory.total") or 0 for g in gpus)
            found.append((len(gpus), mib / 1024, gpus[0].get("name", "GPU"), "hosts check"))
        elif not row.get("ok") and catalog.lookup(state.ec2_types.get(name)):
            info = catalog.lookup(state.ec2_types[name])
            found.append(
                (info.gpus, info.gpu_memory_mib / 1024, info.gpu_model, f"EC2 type {info.name}")
            )
        else:
            found.append((0, 0.0, "", "hosts check"))
    per_node = min(f[0] for f in found)
    if per_node == 0:
        return GpuFacts(0, 0.0, "", found[0][3])
    mem = min(f[1] for f in found if f[0])
    return GpuFacts(per_node, round(mem, 1), found[0][2], found[0][3])
