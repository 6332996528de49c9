"""How `megafleet ec2` shows instances, import plans, check reports and start/stop plans."""

from __future__ import annotations

from rich.markup import escape

from megafleet import ui

INSTANCE_COLUMNS = [
    "name",
    "id",
    "type",
    "GPUs",
    "state",
    "AZ",
    "VPC / subnet",
    "public IP",
    "private IP",
    "placement",
    "security groups",
    "EFA",
    "lifecycle",
]
STATE_STYLE = {"running": "green", "pending": "yellow", "stopping": "yellow", "stopped": "red"}
CHECK_TITLES = {
    "instances": "instances found",
    "state": "all running",
    "network": "one VPC and availability zone",
    "placement": "cluster placement group",
    "security_group": "security group allows all traffic between nodes",
    "efa": "EFA attached",
    "ssh": "SSH reachable from here",
    "master_address": "private addresses in the inventory (master address)",
    "spot": "no interruption risk (spot)",
}


def _instance_row(i) -> list[str]:
    style = STATE_STYLE.get(i.state, "dim")
    info = i.type_info
    efa = (
        f"{i.efa_interfaces}/{info.max_efa_interfaces}"
        if info and info.efa_supported
        else ("no" if info else f"{i.efa_interfaces or '?'}")
    )
    groups = ", ".join(
        f"{gid} ({name})" if name else gid for gid, name in i.security_groups.items()
    )
    return [
        escape(i.name or "-"),
        i.id,
        i.type,
        i.to_dict()["gpu_summary"],
        f"[{style}]{i.state}[/{style}]",
        i.az or "-",
        f"{i.vpc_id or '-'} / {i.subnet_id or '-'}",
        i.public_ip or "-",
        i.private_ip or "-",
        i.placement_group or "-",
        escape(groups) or "-",
        efa,
        i.lifecycle,
    ]


NO_WRAP = {"id", "public IP", "private IP", "state"}
COMPACT = [
    "name",
    "id",
    "type",
    "GPUs",
    "state",
    "AZ",
    "public IP",
    "private IP",
    "EFA",
    "lifecycle",
]


def show_instances(instances, title: str, compact: bool = False) -> None:
    rows = [_instance_row(i) for i in instances]
    if compact:
        keep = [INSTANCE_COLUMNS.index(c) for c in COMPACT]
        rows = [[r[k] for k in keep] for r in rows]
    columns = COMPACT if compact else INSTANCE_COLUMNS
    t = ui.table(title, columns, rows)
    for col in t.columns:  # ids and addresses get copied: never break them
        col.no_wrap = col.header in NO_WRAP
    ui.show(t)


def show_import_plan(plan, path, dry_run: bool) -> None:
    rows = []
    for a in plan:
        h = a.host
        rows.append(
            [
                a.action,
                escape(a.name or "-"),
                a.instance_id,
                f"{h.user}@{h.address}" if h else "-",
                (h.private_address if h else None) or "-",
                escape("; ".join([a.reason] + a.notes).strip("; ")),
            ]
        )
    verb = "would change" if dry_run else "changes to"
    ui.show(
        ui.table(
            f"import: {verb} {path}",
            ["action", "host", "instance", "ssh target", "private address", "why"],
            rows,
        )
    )


def show_check(report) -> None:
    s = report.snapshot
    if s.instances:
        show_instances(s.instances, f"{len(s.instances)} instance(s) in {s.region}", compact=True)
    status = report.status()
    for name in status:
        st = status[name]
        detail = {"skip": "no inventory consulted", "info": "notes below"}.get(st, "")
        ui.check_row({"pass": "ok", "skip": "skip"}.get(st, st), CHECK_TITLES[name], detail)
    problems = sorted(report.findings, key=lambda f: ("error", "warning", "info").index(f.severity))
    if problems:
        ui.info("")
    for f in problems:
        ui.console.print(f"{ui.symbol(f.severity)} [bold]{f.code}[/bold]: {escape(f.message)}")
        if f.fix:
            ui.console.print(f"    [bold]fix:[/bold] {escape(f.fix)}", soft_wrap=True)
        for cmd in f.commands:
            ui.console.print(f"      {escape(cmd)}", soft_wrap=True)
    c = report.counts()
    ui.info(f"\n{c['error']} error(s), {c['warning']} warning(s), {c['info']} note(s)")


def show_power(plan, dry_run: bool) -> None:
    from megafleet.ec2.power import TARGET

    target = TARGET[plan.action]
    for i in plan.already:
        ui.check_row("skip", f"{i.label}: already {i.state}")
    prefix = "would " if dry_run else ""
    for i in plan.change:
        ui.check_row("info", f"{prefix}{plan.action} {i.label} ({i.type}, {i.state} -> {target})")
    if not plan.change:
        ui.check_row("ok", f"nothing to {plan.action}")
