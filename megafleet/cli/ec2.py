"""`megafleet ec2 list|import|check|start|stop`: EC2 instances as a training fleet.

AWS credentials come from boto3's usual chain (--profile, environment, SSO, instance role) and
stay in this process. `check` exits 1 when it finds an error, 0 otherwise; missing region or
credentials exit 2. The EC2 endpoint follows botocore's AWS_ENDPOINT_URL_EC2 (tests).
"""

from __future__ import annotations

import click

from megafleet import ui
from megafleet.cli import dry_run_option, json_option, yes_option
from megafleet.errors import MegafleetError


def aws_options(f):
    f = click.option("--profile", help="AWS profile (default: the AWS_PROFILE / default chain).")(f)
    return click.option("--region", help="AWS region (default: the profile's or AWS_REGION).")(f)


def select_options(f):
    f = click.option(
        "--ids",
        "ids",
        multiple=True,
        metavar="I-...,I-...",
        help="Instance ids (comma-separated or repeated).",
    )(f)
    return click.option(
        "--tag",
        "tags",
        multiple=True,
        metavar="KEY=VALUE",
        help="Only instances with this tag (KEY alone: any value; repeatable, all "
        "must match; * and ? are wildcards).",
    )(f)


@click.group("ec2")
def ec2() -> None:
    """Find, check, import, start and stop EC2 GPU instances."""


@ec2.command("list")
@select_options
@aws_options
@json_option
def list_instances(tags, ids, region, profile, as_json) -> None:
    """List instances (not terminated ones) with their GPUs, network and placement."""
    from megafleet.cli.ec2_view import show_instances
    from megafleet.ec2.aws import ec2_client, region_of
    from megafleet.ec2.discover import find_instances

    client = ec2_client(region, profile)
    instances = find_instances(tags=tags, ids=ids, client=client)
    where = _where(region_of(client), tags, ids)
    if as_json:
        ui.emit_json(
            {
                "region": region_of(client),
                "filters": {"tags": list(tags), "ids": list(ids)},
                "count": len(instances),
                "instances": [i.to_dict() for i in instances],
            }
        )
        return
    if not instances:
        ui.info(f"no instances {where}")
        ui.hint(
            "megafleet ec2 list --region OTHER-REGION", "megafleet ec2 list (without --tag / --ids)"
        )
        return
    show_instances(instances, f"{len(instances)} instance(s) {where}")
    ui.hint(f"megafleet ec2 check {_flags(tags, ids, region, profile)}".rstrip())


@ec2.command("import")
@select_options
@click.option("--user", "-u", required=True, help="SSH login user (ubuntu, ec2-user ...).")
@click.option(
    "--key",
    "-i",
    "key",
    required=True,
    type=click.Path(),
    help="Private key to log in with (the instances' key pair).",
)
@click.option("--update", is_flag=True, help="Refresh hosts already in the inventory.")
@click.option(
    "--ssh-address",
    type=click.Choice(["public", "private"]),
    default="public",
    show_default=True,
    help="Which address SSH connects to (private: megafleet runs inside the VPC or over a VPN).",
)
@aws_options
@json_option
@dry_run_option
@yes_option
def import_cmd(
    tags, ids, user, key, update, ssh_address, region, profile, as_json, dry_run, yes
) -> None:
    """Add the running instances to the inventory.

    Public address for SSH, private address as `private_address` (the master address), name
    from the Name tag (made unique), EC2 tags copied. Hosts already there are skipped, or
    refreshed with --update.
    """
    from megafleet.cli.ec2_view import show_import_plan
    from megafleet.ec2.aws import ec2_client, region_of
    from megafleet.ec2.discover import find_instances
    from megafleet.ec2.importer import ImportResult, apply_plan, check_key, plan_import
    from megafleet.inventory import Inventory

    key_path, warning = check_key(key)
    if warning:
        ui.warn(warning)
    client = ec2_client(region, profile)
    instances = find_instances(tags=tags, ids=ids, client=client)
    if not instances:
        raise MegafleetError(
            f"no instances {_where(region_of(client), tags, ids)}",
            hint="megafleet ec2 list --region REGION shows what there is",
        )
    inv = Inventory.load()
    plan = plan_import(instances, inv, user, key_path, update, connect_via=ssh_address)
    apply_plan(plan, Inventory(list(inv), path=inv.path))  # validate before asking or writing
    changes = [a for a in plan if a.action != "skip"]
    if not as_json:
        show_import_plan(plan, inv.path, dry_run)
    if changes and not dry_run:
        _confirm(yes, f"write {len(changes)} host(s) to {inv.path}?")
        apply_plan(plan, inv)
        inv.save()
    result = ImportResult(plan, str(inv.path), bool(changes) and not dry_run)
    if as_json:
        ui.emit_json(dict(result.to_dict(), dry_run=dry_run))
    elif result.written:
        ui.check_row(
            "ok",
            f"{result.count('add')} added, {result.count('update')} updated, "
            f"{result.count('skip')} skipped: {inv.path}",
        )
        names = ",".join(a.name for a in plan if a.name and a.action != "skip")
        ui.hint(
            f"megafleet ec2 check {_flags(tags, ids, region, profile)}".rstrip(),
            f"megafleet hosts check --hosts {names}",
        )


@ec2.command("check")
@select_options
@click.option(
    "--no-ssh", is_flag=True, help="Do not probe the SSH ports (reported as not checked)."
)
@click.option(
    "--ssh-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each SSH server's answer.",
)
@aws_options
@json_option
@click.pass_context
def check(ctx, tags, ids, no_ssh, ssh_timeout, region, profile, as_json) -> None:
    """Check the instances for multi-node training.

    All running; one VPC and availability zone; a cluster placement group; a security group
    shared by all allowing all traffic to and from itself; SSH reachable from here; EFA
    attached where the type has it; spot interruption risk; the inventory's private address
    used as master address. Each finding comes with a fix (exact AWS CLI commands where
    possible). Exit 1 when an error is found.
    """
    from megafleet.cli.ec2_view import show_check
    from megafleet.ec2.report import check_instances

    def run():
        return check_instances(region, tags, ids, profile, ssh=not no_ssh, ssh_timeout=ssh_timeout)

    if as_json:
        report = run()
    else:
        with ui.err_console.status("describing instances and probing SSH..."):
            report = run()
    if as_json:
        ui.emit_json(report.to_dict())
    else:
        show_check(report)
    ctx.exit(report.exit_code())


def _power_command(action: str):
    @click.option(
        "--ids",
        "ids",
        multiple=True,
        required=True,
        metavar="I-...,I-...",
        help="Instance ids (comma-separated or repeated).",
    )
    @click.option("--no-wait", is_flag=True, help="Return without waiting for the new state.")
    @aws_options
    @json_option
    @dry_run_option
    @yes_option
    def command(ids, no_wait, region, profile, as_json, dry_run, yes) -> None:
        from megafleet.cli.ec2_view import show_power
        from megafleet.ec2.aws import ec2_client
        from megafleet.ec2.power import TARGET, change_state, lookup_ids, power_plan

        client = ec2_client(region, profile)
        plan = power_plan(action, lookup_ids(ids, client))
        if dry_run or not plan.change:
            if as_json:
                ui.emit_json(dict(plan.to_dict(), dry_run=dry_run, instances=None))
            else:
                show_power(plan, dry_run)
            return
        if not as_json:
            show_power(plan, dry_run)
        _confirm(
            yes,
            f"{action} {len(plan.change)} instance(s)?"
            + (
                " (instance-store disks are wiped; public IPs change on the next start)"
                if action == "stop"
                else ""
            ),
        )
        say = None if as_json else (lambda m: ui.err_console.print(f"[dim]{m}[/dim]"))
        after = change_state(
            action,
            [i.id for i in plan.change + plan.already],
            client=client,
            wait=not no_wait,
            on_progress=say,
        )
        if as_json:
            ui.emit_json(
                dict(
                    plan.to_dict(),
                    dry_run=False,
                    instances=[{"id": i.id, "name": i.name, "state": i.state} for i in after],
                )
            )
            return
        for i in after:
            ui.check_row("ok" if i.state == TARGET[action] else "info", f"{i.label}: {i.state}")
        if action == "start":
            ui.hint(
                "megafleet ec2 import --update --ids "
                + ",".join(i.id for i in after)
                + " --user USER --key PATH   (public IPs change after a stop)"
            )

    command.__doc__ = (
        f"{action.capitalize()} instances and wait until they are "
        f"{'running' if action == 'start' else 'stopped'}."
    )
    return ec2.command(action)(command)


start = _power_command("start")
stop = _power_command("stop")


def _confirm(yes: bool, question: str) -> None:
    ui.confirm(yes, question, default=False)


def _where(region: str, tags, ids) -> str:
    parts = [f"in {region}"]
    if tags:
        parts.append("with tag " + " and ".join(tags))
    if ids:
        parts.append("among " + ",".join(ids))
    return " ".join(parts)


def _flags(tags, ids, region, profile) -> str:
    out = [f"--tag {t}" for t in tags] + ([f"--ids {','.join(ids)}"] if ids else [])
    out += [f"--region {region}"] if region else []
    out += [f"--profile {profile}"] if profile else []
    return " ".join(out)
