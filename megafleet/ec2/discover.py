"""Find EC2 instances by tag or id and describe what multi-node training cares about.

    instances = find_instances(region="us-east-1", tags=["team=ml"])      # list[Instance]
    snap = describe_cluster(region="us-east-1", ids=["i-0abc", "i-0def"])  # + groups, placement

`Instance.from_api(raw, region)` turns one DescribeInstances entry into an Instance with no API
call, so everything after the fetch (checks, import, the wizard) is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megafleet.ec2 import catalog
from megafleet.ec2.aws import aws_errors, ec2_client, region_of
from megafleet.errors import UsageError

LISTED_STATES = ("pending", "running", "stopping", "stopped")
NODE_GROUP_NAME = "megafleet-nodes"  # the group `ec2 check` proposes when none is shared


@dataclass
class Interface:
    id: str
    type: str  # "interface" | "efa" | "efa-only"
    device_index: int | None
    network_card_index: int | None
    groups: list[str]  # security group ids

    @property
    def is_efa(self) -> bool:
        return self.type in ("efa", "efa-only")


@dataclass
class Instance:
    id: str
    region: str
    type: str
    state: str
    name: str | None = None  # the Name tag
    az: str | None = None
    subnet_id: str | None = None
    vpc_id: str | None = None
    public_ip: str | None = None
    private_ip: str | None = None
    public_dns: str | None = None
    placement_group: str | None = None
    security_groups: dict[str, str] = field(default_factory=dict)  # id -> name
    interfaces: list[Interface] = field(default_factory=list)
    lifecycle: str = "on-demand"  # | "spot" | "capacity-block" | "scheduled"
    tags: dict[str, str] = field(default_factory=dict)
    launch_time: str | None = None

    @classmethod
    def from_api(cls, raw: dict, region: str) -> "Instance":
        """One entry of DescribeInstances' Reservations[].Instances[]."""
        tags = {t["Key"]: t.get("Value", "") for t in raw.get("Tags", [])}
        interfaces = [
            Interface(
                n["NetworkInterfaceId"],
                n.get("InterfaceType", "interface"),
                n.get("Attachment", {}).get("DeviceIndex"),
                n.get("Attachment", {}).get("NetworkCardIndex"),
                [g["GroupId"] for g in n.get("Groups", [])],
            )
            for n in raw.get("NetworkInterfaces", [])
        ]
        groups = {g["GroupId"]: g.get("GroupName", "") for g in raw.get("SecurityGroups", [])}
        for n in raw.get("NetworkInterfaces", []):  # EFA interfaces may carry other groups
            groups.update({g["GroupId"]: g.get("GroupName", "") for g in n.get("Groups", [])})
        placement = raw.get("Placement", {})
        return cls(
            id=raw["InstanceId"],
            region=region,
            type=raw.get("InstanceType", "?"),
            state=raw.get("State", {}).get("Name", "?"),
            name=tags.get("Name") or None,
            az=placement.get("AvailabilityZone"),
            subnet_id=raw.get("SubnetId"),
            vpc_id=raw.get("VpcId"),
            public_ip=raw.get("PublicIpAddress"),
            private_ip=raw.get("PrivateIpAddress"),
            public_dns=raw.get("PublicDnsName") or None,
            placement_group=placement.get("GroupName") or None,
            security_groups=groups,
            interfaces=interfaces,
            lifecycle=raw.get("InstanceLifecycle") or "on-demand",
            tags=tags,
            launch_time=str(raw["LaunchTime"]) if raw.get("LaunchTime") else None,
        )

    @property
    def label(self) -> str:
        """`name (i-0abc)` or the id, for messages."""
        return f"{self.name} ({self.id})" if self.name else self.id

    @property
    def type_info(self) -> catalog.TypeInfo | None:
        return catalog.lookup(self.type)

    @property
    def efa_interfaces(self) -> int:
        return sum(1 for n in self.interfaces if n.is_efa)

    def to_dict(self) -> dict:
        info = self.type_info
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "state": self.state,
            "region": self.region,
            "az": self.az,
            "subnet_id": self.subnet_id,
            "vpc_id": self.vpc_id,
            "public_ip": self.public_ip,
            "private_ip": self.private_ip,
            "public_dns": self.public_dns,
            "placement_group": self.placement_group,
            "security_groups": [{"id": k, "name": v} for k, v in self.security_groups.items()],
            "efa_interfaces": self.efa_interfaces,
            "interfaces": [vars(n) for n in self.interfaces],
            "lifecycle": self.lifecycle,
            "tags": self.tags,
            "launch_time": self.launch_time,
            "gpus": info.to_dict() if info else None,
            "gpu_summary": catalog.gpu_summary(self.type),
        }


def tag_filters(tags) -> list[dict]:
    """`K=V` -> instances whose tag K is V (EC2 wildcards * and ? allowed); a bare `K` -> having
    tag K. Several tags must all match."""
    filters = []
    for spec in tags or ():
        key, sep, value = spec.partition("=")
        if not key:
            raise UsageError(f"--tag {spec!r}: write tags as KEY=VALUE (or KEY for any value)")
        filters.append(
            {"Name": f"tag:{key}", "Values": [value]}
            if sep
            else {"Name": "tag-key", "Values": [key]}
        )
    return filters


def split_ids(ids) -> list[str]:
    """Instance ids given as repeated options and/or comma-separated lists."""
    out = [i.strip() for spec in ids or () for i in spec.split(",") if i.strip()]
    bad = [i for i in out if not i.startswith("i-")]
    if bad:
        raise UsageError(
            f"--ids: {', '.join(bad)} not an instance id (i-...)",
            hint="megafleet ec2 list shows the ids",
        )
    return list(dict.fromkeys(out))


def find_instances(
    region: str | None = None,
    tags=None,
    ids=None,
    profile: str | None = None,
    states=LISTED_STATES,
    client=None,
) -> list[Instance]:
    """Instances matching all `tags` (`K=V` or `K`) and `ids`, in `states` (terminated ones are
    never returned), sorted by name then id."""
    client = client or ec2_client(region, profile)
    filters = tag_filters(tags) + [{"Name": "instance-state-name", "Values": list(states)}]
    kwargs: dict = {"Filters": filters}
    id_list = split_ids(ids)
    if id_list:
        kwargs["InstanceIds"] = id_list
    out = []
    with aws_errors(client):
        for page in client.get_paginator("describe_instances").paginate(**kwargs):
            for reservation in page.get("Reservations", []):
                out += [
                    Instance.from_api(raw, region_of(client))
                    for raw in reservation.get("Instances", [])
                ]
    return sorted(out, key=lambda i: (i.name or "~", i.id))


@dataclass
class ClusterSnapshot:
    """Everything `ec2 check` judges, fetched once: instances, the security groups they use
    (plus any group named NODE_GROUP_NAME in their VPCs) and placement group strategies."""

    region: str
    instances: list[Instance]
    security_groups: dict[str, dict]  # id -> DescribeSecurityGroups entry
    placement_strategies: dict[str, str | None]  # group name -> "cluster" | "spread" | ...
    profile: str | None = None


def describe_cluster(
    region: str | None = None, tags=None, ids=None, profile: str | None = None, client=None
) -> ClusterSnapshot:
    client = client or ec2_client(region, profile)
    instances = find_instances(tags=tags, ids=ids, client=client)
    return ClusterSnapshot(
        region_of(client),
        instances,
        security_groups(client, instances),
        placement_strategies(client, instances),
        profile,
    )


def security_groups(client, instances: list[Instance]) -> dict[str, dict]:
    ids = sorted({g for i in instances for g in i.security_groups})
    vpcs = sorted({i.vpc_id for i in instances if i.vpc_id})
    out: dict[str, dict] = {}
    with aws_errors(client):
        if ids:
            for g in client.describe_security_groups(GroupIds=ids)["SecurityGroups"]:
                out[g["GroupId"]] = g
        if vpcs:
            for g in client.describe_security_groups(
                Filters=[
                    {"Name": "vpc-id", "Values": vpcs},
                    {"Name": "group-name", "Values": [NODE_GROUP_NAME]},
                ]
            )["SecurityGroups"]:
                out.setdefault(g["GroupId"], g)
    return out


def placement_strategies(client, instances: list[Instance]) -> dict[str, str | None]:
    names = sorted({i.placement_group for i in instances if i.placement_group})
    if not names:
        return {}
    import botocore.exceptions as bx

    found: dict[str, str | None] = {}
    with aws_errors(client):  # credentials and network problems still stop here
        for name in names:  # one by one: a group of another account may be invisible
            try:
                groups = client.describe_placement_groups(GroupNames=[name])["PlacementGroups"]
            except bx.ClientError:
                groups = []  # not found or not allowed: the check reports the strategy unknown
            found[name] = groups[0].get("Strategy") if groups else None
    return found
