"""Security groups for multi-node training: NCCL (and EFA's SRD transport) needs every node to
reach every other on all ports and protocols, which AWS expresses as a group that allows all
traffic from and to itself. This module judges DescribeSecurityGroups entries and writes the
exact AWS CLI commands that fix them (real group ids; a shell variable only for a group that
does not exist yet). No API calls here.
"""

from __future__ import annotations

from dataclasses import dataclass

from megafleet.ec2.discover import NODE_GROUP_NAME, Instance


@dataclass
class GroupRules:
    group_id: str
    name: str
    self_ingress: bool  # all protocols from the group itself
    self_egress: bool  # all protocols to the group itself
    open_egress: bool  # all protocols to 0.0.0.0/0 (the default egress rule)

    @property
    def score(self) -> int:
        return int(self.self_ingress) + int(self.self_egress)


def _all_traffic(perm: dict) -> bool:
    return str(perm.get("IpProtocol")) == "-1"


def rules_of(group: dict) -> GroupRules:
    gid = group["GroupId"]

    def to_self(perms):
        return any(
            _all_traffic(p)
            and any(pair.get("GroupId") == gid for pair in p.get("UserIdGroupPairs", []))
            for p in perms
        )

    egress = group.get("IpPermissionsEgress", [])
    open_egress = any(
        _all_traffic(p) and any(r.get("CidrIp") == "0.0.0.0/0" for r in p.get("IpRanges", []))
        for p in egress
    )
    return GroupRules(
        gid,
        group.get("GroupName", ""),
        to_self(group.get("IpPermissions", [])),
        to_self(egress),
        open_egress,
    )


def interface_groups(inst: Instance) -> set[str]:
    """The groups on every network interface of `inst`: EFA traffic leaves through all of them,
    so a group on the primary interface only does not cover it."""
    sets = [set(n.groups) for n in inst.interfaces]
    return set.intersection(*sets) if sets else set(inst.security_groups)


def shared_groups(instances: list[Instance]) -> list[str]:
    """Group ids on every interface of every instance, in the first instance's order."""
    if not instances:
        return []
    common = interface_groups(instances[0])
    for inst in instances[1:]:
        common &= interface_groups(inst)
    return [g for g in instances[0].security_groups if g in common]


def best_shared(instances: list[Instance], groups: dict[str, dict]) -> GroupRules | None:
    """The shared group closest to allowing all traffic to and from itself."""
    rules = [rules_of(groups[g]) for g in shared_groups(instances) if g in groups]
    return max(rules, key=lambda r: r.score) if rules else None


def aws_cli(verb: str, region: str, profile: str | None, *args: str) -> str:
    prof = f" --profile {profile}" if profile else ""
    return f"aws ec2 {verb} --region {region}{prof} " + " ".join(args)


def authorize_commands(
    group_id: str, region: str, profile: str | None, ingress: bool = True, egress: bool = True
) -> list[str]:
    """The AWS CLI commands adding the all-traffic self rules (`group_id` may be "$SG")."""
    ref = f'"{group_id}"' if group_id.startswith("$") else group_id
    out = []
    for needed, direction in ((ingress, "ingress"), (egress, "egress")):
        if needed:
            out.append(
                aws_cli(
                    f"authorize-security-group-{direction}",
                    region,
                    profile,
                    "--group-id",
                    ref,
                    "--protocol",
                    "-1",
                    "--source-group",
                    ref,
                )
            )
    return out


def new_group_commands(
    instances: list[Instance], groups: dict[str, dict], region: str, profile: str | None
) -> list[str]:
    """Commands that give every instance one group allowing all traffic within itself: the
    VPC's existing `megafleet-nodes` group if there is one, else a new one."""
    vpc = instances[0].vpc_id
    existing = next(
        (
            g
            for g in groups.values()
            if g.get("GroupName") == NODE_GROUP_NAME and g.get("VpcId") == vpc
        ),
        None,
    )
    if existing:
        gid, cmds = existing["GroupId"], []
        r = rules_of(existing)
        cmds += authorize_commands(gid, region, profile, not r.self_ingress, not r.self_egress)
    else:
        gid = "$SG"
        cmds = [
            "SG=$("
            + aws_cli(
                "create-security-group",
                region,
                profile,
                "--vpc-id",
                vpc,
                "--group-name",
                NODE_GROUP_NAME,
                "--description",
                "'megafleet: all traffic between training nodes'",
                "--query",
                "GroupId",
                "--output",
                "text",
            )
            + ")"
        ]
        cmds += authorize_commands(gid, region, profile)
    ref = f'"{gid}"' if gid.startswith("$") else gid
    for inst in instances:
        for eni in inst.interfaces:
            if gid not in eni.groups:
                cmds.append(
                    aws_cli(
                        "modify-network-interface-attribute",
                        region,
                        profile,
                        "--network-interface-id",
                        eni.id,
                        "--groups",
                        *eni.groups,
                        ref,
                    )
                )
    return cmds
