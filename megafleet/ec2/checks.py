"""`megafleet ec2 check`: catch the AWS mistakes that make multi-node NCCL hang or crawl.

Pure functions of a ClusterSnapshot (instances, security groups, placement strategies), the
inventory's hosts and SSH reachability results; `megafleet.ec2.report.check_instances` fetches
those and calls `judge`. Every finding has a severity (error / warning / info), a stable `code`
for agents, the instances it concerns and a fix (text, plus exact commands where there are some).

Checks, in order: instances (found, types known and alike), state (all running), network (one
VPC, one availability zone), placement (a cluster placement group), security_group (one group
on all of them allowing all traffic to and from itself), efa (attached where the type has it),
ssh (port 22 reachable from here), master_address (the inventory has each node's private
address: the public IP must never be the master address), spot (interruption risk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from megafleet.ec2 import secgroups
from megafleet.ec2.discover import ClusterSnapshot, Instance

CHECKS = (
    "instances",
    "state",
    "network",
    "placement",
    "security_group",
    "efa",
    "ssh",
    "master_address",
    "spot",
)
SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    check: str  # one of CHECKS
    code: str  # stable identifier, e.g. "multiple_azs"
    message: str
    fix: str | None = None
    commands: list[str] = field(default_factory=list)  # exact shell commands, in order
    instances: list[str] = field(default_factory=list)  # instance ids

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reach:
    """SSH reachability of one instance: status "ok" | "unreachable" | "not_checked"."""

    status: str
    address: str | None = None
    detail: str = ""


@dataclass
class Context:
    snap: ClusterSnapshot
    hosts: dict[str, object] | None  # instance id -> inventory Host (None: not consulted)
    reach: dict[str, Reach]

    @property
    def instances(self) -> list[Instance]:
        return self.snap.instances

    @property
    def running(self) -> list[Instance]:
        return [i for i in self.snap.instances if i.state == "running"]

    def flags(self) -> str:
        """`--region R [--profile P]` for megafleet commands in fixes."""
        return f"--region {self.snap.region}" + (
            f" --profile {self.snap.profile}" if self.snap.profile else ""
        )


def ids(instances) -> list[str]:
    return [i.id for i in instances]


def labels(instances) -> str:
    return ", ".join(i.label for i in instances)


def check_found(c: Context) -> list[Finding]:
    out = []
    unknown = [i for i in c.instances if i.type_info is None]
    if unknown:
        types = sorted({i.type for i in unknown})
        out.append(
            Finding(
                "info",
                "instances",
                "unknown_instance_type",
                f"GPU count and EFA support of {', '.join(types)} are unknown to "
                "megafleet (not guessed)",
                "megafleet hosts check reads the GPUs "
                "from nvidia-smi once the instances are in the inventory",
                instances=ids(unknown),
            )
        )
    types = sorted({i.type for i in c.instances})
    if len(types) > 1:
        out.append(
            Finding(
                "warning",
                "instances",
                "mixed_instance_types",
                f"mixed instance types ({', '.join(types)}): the slowest node sets "
                "the pace and GPU counts per node may differ",
                "train on instances of one type",
                instances=ids(c.instances),
            )
        )
    return out


def check_state(c: Context) -> list[Finding]:
    out = []
    for state in ("pending", "stopping", "stopped"):
        group = [i for i in c.instances if i.state == state]
        if not group:
            continue
        severity = "warning" if state == "pending" else "error"
        fix = (
            "wait until they are running"
            if state == "pending"
            else f"megafleet ec2 start --ids {','.join(ids(group))} {c.flags()}"
        )
        out.append(
            Finding(
                severity,
                "state",
                f"instances_{state}",
                f"{state}: {labels(group)}",
                fix,
                instances=ids(group),
            )
        )
    return out


def check_network(c: Context) -> list[Finding]:
    out = []
    by_vpc = _group_by(c.instances, lambda i: i.vpc_id or "(no VPC)")
    if len(by_vpc) > 1:
        out.append(
            Finding(
                "error",
                "network",
                "multiple_vpcs",
                "instances are in different VPCs: " + _describe_groups(by_vpc),
                "launch all nodes in one VPC (and one subnet)",
                instances=ids(c.instances),
            )
        )
    by_az = _group_by(c.instances, lambda i: i.az or "?")
    if len(by_az) > 1:
        out.append(
            Finding(
                "error",
                "network",
                "multiple_azs",
                "instances are in different availability zones: "
                + _describe_groups(by_az)
                + "; EFA and cluster placement groups work "
                "only within one zone, and cross-zone traffic is slower and billed",
                "launch all nodes in one subnet of one availability zone",
                instances=ids(c.instances),
            )
        )
    return out


def check_placement(c: Context) -> list[Finding]:
    out = []
    p_family = any(i.type_info and i.type_info.cluster_class for i in c.instances)
    loose = [i for i in c.instances if not i.placement_group]
    if loose and len(c.instances) > 1:
        pg = "megafleet-cluster"
        cmds = [
            secgroups.aws_cli(
                "create-placement-group",
                c.snap.region,
                c.snap.profile,
                "--group-name",
                pg,
                "--strategy",
                "cluster",
            )
        ]
        cmds += [
            secgroups.aws_cli(
                "modify-instance-placement",
                c.snap.region,
                c.snap.profile,
                "--instance-id",
                i.id,
                "--group-name",
                pg,
            )
            for i in loose
        ]
        out.append(
            Finding(
                "warning" if p_family else "info",
                "placement",
                "no_placement_group",
                f"not in a placement group: {labels(loose)}"
                + (
                    "; a cluster placement group is recommended for p4/p5/p6 "
                    "(lowest latency, full EFA bandwidth)"
                    if p_family
                    else ""
                ),
                "stop the instances, then move them into one cluster placement "
                "group (capacity permitting):",
                cmds,
                ids(loose),
            )
        )
    groups = _group_by([i for i in c.instances if i.placement_group], lambda i: i.placement_group)
    if len(groups) > 1:
        out.append(
            Finding(
                "warning",
                "placement",
                "multiple_placement_groups",
                "instances are in different placement groups: " + _describe_groups(groups),
                "put all nodes in one cluster placement group",
                instances=ids(c.instances),
            )
        )
    for name, members in groups.items():
        strategy = c.snap.placement_strategies.get(name)
        if strategy is None:
            out.append(
                Finding(
                    "info",
                    "placement",
                    "placement_strategy_unknown",
                    f"could not read placement group {name} (not visible to these "
                    "credentials?): its strategy is unknown",
                    f"aws ec2 describe-placement-groups --group-names {name}",
                    instances=ids(members),
                )
            )
        elif strategy != "cluster":
            out.append(
                Finding(
                    "warning",
                    "placement",
                    "placement_group_not_cluster",
                    f"placement group {name} has strategy {strategy!r}, not 'cluster'",
                    "use a placement group created with --strategy cluster",
                    instances=ids(members),
                )
            )
    return out


def check_security_groups(c: Context) -> list[Finding]:
    snap = c.snap
    if len({i.vpc_id for i in c.instances}) > 1:
        return [
            Finding(
                "error",
                "security_group",
                "no_shared_security_group",
                "instances in different VPCs cannot share a security group",
                "move the nodes into one VPC first (see network)",
                instances=ids(c.instances),
            )
        ]
    best = secgroups.best_shared(c.instances, snap.security_groups)
    if best is None:
        return [
            Finding(
                "error",
                "security_group",
                "no_shared_security_group",
                "no security group is shared by all instances, so nothing allows all "
                "traffic between them (NCCL and EFA need every port)",
                "give every node one group that allows all traffic to and from itself:",
                secgroups.new_group_commands(
                    c.instances, snap.security_groups, snap.region, snap.profile
                ),
                ids(c.instances),
            )
        ]
    out = []
    name = f"{best.group_id} ({best.name})" if best.name else best.group_id
    if not best.self_ingress:
        out.append(
            Finding(
                "error",
                "security_group",
                "sg_missing_self_ingress",
                f"security group {name} does not allow all inbound traffic from itself",
                "add the self-referencing inbound rule:",
                secgroups.authorize_commands(
                    best.group_id, snap.region, snap.profile, egress=False
                ),
                ids(c.instances),
            )
        )
    if not best.self_egress:
        efa = any(i.type_info and i.type_info.efa_supported for i in c.instances)
        severity = "warning" if best.open_egress and not efa else "error"
        why = (
            "EFA requires an explicit outbound rule to the group itself"
            if efa
            else "outbound traffic is otherwise limited"
            if not best.open_egress
            else "the open outbound rule covers TCP, but an explicit rule survives its removal"
        )
        out.append(
            Finding(
                severity,
                "security_group",
                "sg_missing_self_egress",
                f"security group {name} has no outbound rule allowing all traffic to "
                f"itself ({why})",
                "add the self-referencing outbound rule:",
                secgroups.authorize_commands(
                    best.group_id, snap.region, snap.profile, ingress=False
                ),
                ids(c.instances),
            )
        )
    return out


def check_efa(c: Context) -> list[Finding]:
    out = []
    for inst in c.instances:
        info = inst.type_info
        if info is None or not info.efa_supported:
            continue
        if inst.efa_interfaces == 0:
            out.append(
                Finding(
                    "warning",
                    "efa",
                    "efa_missing",
                    f"{inst.label}: {inst.type} supports up to "
                    f"{info.max_efa_interfaces} EFA interface(s) ({info.network}) but "
                    "has none; NCCL falls back "
                    "to TCP sockets at a fraction of the bandwidth",
                    "stop the instance, create an EFA interface in its subnet with the "
                    "cluster security group (aws ec2 create-network-interface "
                    "--interface-type efa ...) and attach it (aws ec2 "
                    "attach-network-interface), or relaunch with EFA interfaces; then "
                    "install the EFA software (aws-efa-installer)",
                    instances=[inst.id],
                )
            )
        elif inst.efa_interfaces < info.max_efa_interfaces:
            out.append(
                Finding(
                    "info",
                    "efa",
                    "efa_partial",
                    f"{inst.label}: {inst.efa_interfaces} of {info.max_efa_interfaces} "
                    f"EFA interfaces attached (full bandwidth needs all)",
                    "launch with one EFA interface per network card",
                    instances=[inst.id],
                )
            )
    no_efa = [i for i in c.instances if i.type_info and not i.type_info.efa_supported]
    if no_efa and len(c.instances) > 1:
        out.append(
            Finding(
                "info",
                "efa",
                "efa_unsupported",
                f"{', '.join(sorted({i.type for i in no_efa}))} has no EFA: nodes talk over TCP",
                "for multi-node training prefer a type with EFA "
                "(e.g. g5/g6/g6e.8xlarge and larger, p4d, p5)",
                instances=ids(no_efa),
            )
        )
    return out


def check_ssh(c: Context) -> list[Finding]:
    out = []
    not_checked = [
        i for i in c.running if c.reach.get(i.id, Reach("not_checked")).status == "not_checked"
    ]
    if not_checked:
        why = {c.reach[i.id].detail for i in not_checked if i.id in c.reach} - {""}
        out.append(
            Finding(
                "info",
                "ssh",
                "ssh_not_checked",
                f"SSH reachability not checked for {labels(not_checked)}"
                + (f" ({'; '.join(sorted(why))})" if why else ""),
                "megafleet ec2 check without --no-ssh, or megafleet hosts check",
                instances=ids(not_checked),
            )
        )
    for inst in c.running:
        r = c.reach.get(inst.id)
        if r and r.status == "unreachable":
            groups = " ".join(inst.security_groups) or "<group>"
            first = next(iter(inst.security_groups), "<group>")
            out.append(
                Finding(
                    "error",
                    "ssh",
                    "ssh_unreachable",
                    f"{inst.label}: SSH port not reachable at {r.address} ({r.detail})",
                    f"allow TCP 22 from this machine's address (curl "
                    f"https://checkip.amazonaws.com) in one of its groups ({groups}):",
                    [
                        secgroups.aws_cli(
                            "authorize-security-group-ingress",
                            c.snap.region,
                            c.snap.profile,
                            "--group-id",
                            first,
                            "--protocol",
                            "tcp",
                            "--port",
                            "22",
                            "--cidr",
                            "YOUR.IP.ADDRESS/32",
                        )
                    ],
                    [inst.id],
                )
            )
        if not inst.public_ip:
            out.append(
                Finding(
                    "warning",
                    "ssh",
                    "no_public_address",
                    f"{inst.label} has no public IP: reachable only from inside the "
                    f"VPC ({inst.private_ip})",
                    "run megafleet from inside the VPC or "
                    "through a bastion (megafleet hosts add ... --jump-host)",
                    instances=[inst.id],
                )
            )
    return out


def check_master_address(c: Context) -> list[Finding]:
    if c.hosts is None:
        return []
    out = []
    missing = [i for i in c.running if i.id not in c.hosts]
    if missing:
        out.append(
            Finding(
                "info",
                "master_address",
                "not_in_inventory",
                f"not in the inventory: {labels(missing)}",
                f"megafleet ec2 import --ids {','.join(ids(missing))} {c.flags()} "
                "--user USER --key PATH",
                instances=ids(missing),
            )
        )
    for inst in c.running:
        host = c.hosts.get(inst.id)
        if host is None:
            continue
        fix = (
            f"megafleet ec2 import --ids {inst.id} {c.flags()} --update --user {host.user} "
            f"--key {host.identity_file or 'PATH'}"
        )
        priv = host.private_address
        if not priv:
            out.append(
                Finding(
                    "error",
                    "master_address",
                    "private_address_missing",
                    f"inventory host {host.name} ({inst.id}) has no private_address: "
                    "the public IP would become the master address (NCCL would "
                    "leave the VPC or be blocked)",
                    fix,
                    instances=[inst.id],
                )
            )
        elif priv in (inst.public_ip, inst.public_dns):
            out.append(
                Finding(
                    "error",
                    "master_address",
                    "master_address_public",
                    f"inventory host {host.name}: private_address {priv} is the "
                    "instance's public address",
                    fix,
                    instances=[inst.id],
                )
            )
        elif inst.private_ip and priv != inst.private_ip:
            out.append(
                Finding(
                    "warning",
                    "master_address",
                    "private_address_stale",
                    f"inventory host {host.name}: private_address {priv} is not the "
                    f"instance's private IP {inst.private_ip}",
                    fix,
                    instances=[inst.id],
                )
            )
    return out


def check_spot(c: Context) -> list[Finding]:
    out = []
    spot = [i for i in c.instances if i.lifecycle == "spot"]
    if spot:
        out.append(
            Finding(
                "warning",
                "spot",
                "spot_instances",
                f"spot instances: {labels(spot)}; AWS can reclaim each with a "
                "two-minute notice, which stops the whole job",
                "save checkpoints often (checkpoint.save_steps) and resume after "
                "an interruption, or use on-demand instances or a capacity block",
                instances=ids(spot),
            )
        )
    block = [i for i in c.instances if i.lifecycle == "capacity-block"]
    if block:
        out.append(
            Finding(
                "info",
                "spot",
                "capacity_block",
                f"capacity-block instances end when the block ends: {labels(block)}",
                "make sure the job (and a last checkpoint) finishes before then",
                instances=ids(block),
            )
        )
    return out


CHECK_FUNCTIONS: dict[str, Callable[[Context], list[Finding]]] = {
    "instances": check_found,
    "state": check_state,
    "network": check_network,
    "placement": check_placement,
    "security_group": check_security_groups,
    "efa": check_efa,
    "ssh": check_ssh,
    "master_address": check_master_address,
    "spot": check_spot,
}


def judge(
    snap: ClusterSnapshot, hosts: dict | None = None, reach: dict[str, Reach] | None = None
) -> list[Finding]:
    """All findings for the snapshot. `hosts`: instance id -> inventory Host (None skips the
    master-address check); `reach`: instance id -> Reach (missing ids count as not checked)."""
    if not snap.instances:
        return [
            Finding(
                "error",
                "instances",
                "no_instances",
                f"no instances found in {snap.region} (terminated ones are ignored)",
                "check --region, --tag and --ids (megafleet ec2 list --region REGION)",
            )
        ]
    c = Context(snap, hosts, reach or {})
    return [f for name in CHECKS for f in CHECK_FUNCTIONS[name](c)]


def check_status(findings: list[Finding], name: str, skipped: bool = False) -> str:
    """ "error" / "warning" / "info" (the worst finding of a check), "pass" or "skip"."""
    if skipped:
        return "skip"
    levels = {f.severity for f in findings if f.check == name}
    return next((s for s in SEVERITIES if s in levels), "pass")


def _group_by(instances, key) -> dict[str, list[Instance]]:
    out: dict[str, list[Instance]] = {}
    for i in instances:
        out.setdefault(key(i), []).append(i)
    return out


def _describe_groups(groups: dict[str, list[Instance]]) -> str:
    return "; ".join(f"{k}: {labels(v)}" for k, v in groups.items())
