"""`ec2 check` findings from instance and security-group descriptions (pure functions; the raw
dicts have the shape of real DescribeInstances / DescribeSecurityGroups answers, including the
EFA interfaces and placement groups moto does not model)."""

from megafleet.ec2.checks import Reach, check_status, judge
from megafleet.ec2.discover import ClusterSnapshot, Instance
from megafleet.inventory import Host

REGION = "us-east-1"


def raw(
    iid,
    name=None,
    type="p5.48xlarge",
    state="running",
    az="us-east-1a",
    vpc="vpc-1",
    public="3.0.0.1",
    private="10.0.0.1",
    groups=("sg-1",),
    efa=0,
    pg=None,
    lifecycle=None,
):
    enis = [
        {
            "NetworkInterfaceId": f"eni-{iid}-{n}",
            "InterfaceType": "efa" if n < efa else "interface",
            "Attachment": {"DeviceIndex": 0 if n == 0 else 1, "NetworkCardIndex": n},
            "Groups": [{"GroupId": g, "GroupName": g} for g in groups],
        }
        for n in range(max(1, efa))
    ]
    d = {
        "InstanceId": iid,
        "InstanceType": type,
        "State": {"Name": state},
        "Placement": {"AvailabilityZone": az, "GroupName": pg or ""},
        "VpcId": vpc,
        "SubnetId": "subnet-" + az[-1],
        "PrivateIpAddress": private,
        "NetworkInterfaces": enis,
        "SecurityGroups": [{"GroupId": g, "GroupName": g} for g in groups],
        "Tags": [{"Key": "Name", "Value": name}] if name else [],
    }
    if public:
        d["PublicIpAddress"] = public
    if lifecycle:
        d["InstanceLifecycle"] = lifecycle
    return Instance.from_api(d, REGION)


def group(gid, ingress_self=True, egress_self=True, open_egress=True, name=None, vpc="vpc-1"):
    self_rule = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}
    egress = ([self_rule] if egress_self else []) + (
        [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}] if open_egress else []
    )
    return {
        "GroupId": gid,
        "GroupName": name or gid,
        "VpcId": vpc,
        "IpPermissions": [self_rule] if ingress_self else [],
        "IpPermissionsEgress": egress,
    }


def good_pair(**kw):
    a = raw("i-a", "a", efa=32, pg="pg", public="3.0.0.1", private="10.0.0.1", **kw)
    b = raw("i-b", "b", efa=32, pg="pg", public="3.0.0.2", private="10.0.0.2", **kw)
    return [a, b]


def snap(instances, groups=None, strategies=None, profile=None):
    return ClusterSnapshot(
        REGION,
        instances,
        groups if groups is not None else {"sg-1": group("sg-1")},
        strategies if strategies is not None else {"pg": "cluster"},
        profile,
    )


def codes(findings):
    return sorted(f.code for f in findings)


def reach_ok(instances):
    return {i.id: Reach("ok", f"{i.public_ip}:22") for i in instances}


def test_a_well_built_cluster_has_no_findings():
    inst = good_pair()
    hosts = {i.id: Host(i.name, i.public_ip, "ubuntu", private_address=i.private_ip) for i in inst}
    findings = judge(snap(inst), hosts, reach_ok(inst))
    assert findings == []
    assert {check_status(findings, c) for c in ("network", "security_group", "efa")} == {"pass"}


def test_two_azs_two_vpcs_and_states():
    inst = [
        raw("i-a", "a", az="us-east-1a"),
        raw("i-b", "b", az="us-east-1b", vpc="vpc-2"),
        raw("i-c", state="stopped", public=None),
        raw("i-d", state="pending"),
    ]
    f = {x.code: x for x in judge(snap(inst), None, reach_ok(inst))}
    assert (
        f["multiple_azs"].severity == "error" and "us-east-1b: b (i-b)" in f["multiple_azs"].message
    )
    assert f["multiple_vpcs"].severity == "error"
    assert f["no_shared_security_group"].commands == []  # one VPC first
    assert f["instances_stopped"].severity == "error"
    assert f["instances_stopped"].fix == "megafleet ec2 start --ids i-c --region us-east-1"
    assert f["instances_pending"].severity == "warning"


def test_missing_self_rules_give_exact_commands_with_the_real_group_id():
    inst = good_pair()
    f = {
        x.code: x
        for x in judge(
            snap(inst, {"sg-1": group("sg-1", False, False)}, profile="ml"), None, reach_ok(inst)
        )
    }
    assert f["sg_missing_self_ingress"].commands == [
        "aws ec2 authorize-security-group-ingress --region us-east-1 --profile ml --group-id sg-1 "
        "--protocol -1 --source-group sg-1"
    ]
    # EFA needs the explicit outbound rule even though 0.0.0.0/0 is open
    assert f["sg_missing_self_egress"].severity == "error"
    assert (
        f["sg_missing_self_egress"]
        .commands[0]
        .startswith(
            "aws ec2 authorize-security-group-egress --region us-east-1 --profile ml"
            " --group-id sg-1"
        )
    )


def test_open_egress_is_only_a_warning_without_efa():
    inst = [raw("i-a", type="g5.xlarge"), raw("i-b", type="g5.xlarge")]
    f = {
        x.code: x
        for x in judge(snap(inst, {"sg-1": group("sg-1", egress_self=False)}), None, reach_ok(inst))
    }
    assert f["sg_missing_self_egress"].severity == "warning"
    assert "sg_missing_self_ingress" not in f
    closed = judge(
        snap(inst, {"sg-1": group("sg-1", egress_self=False, open_egress=False)}),
        None,
        reach_ok(inst),
    )
    assert [x.severity for x in closed if x.code == "sg_missing_self_egress"] == ["error"]


def test_the_best_shared_group_is_chosen():
    inst = [raw("i-a", groups=("sg-ssh", "sg-1")), raw("i-b", groups=("sg-1", "sg-ssh"))]
    groups = {"sg-ssh": group("sg-ssh", False, False), "sg-1": group("sg-1")}
    assert not [
        x for x in judge(snap(inst, groups), None, reach_ok(inst)) if x.check == "security_group"
    ]


def test_no_shared_group_creates_one_and_adds_it_to_every_interface():
    inst = [raw("i-a", groups=("sg-a",), efa=2), raw("i-b", groups=("sg-b",))]
    groups = {"sg-a": group("sg-a"), "sg-b": group("sg-b")}
    (f,) = [
        x for x in judge(snap(inst, groups), None, reach_ok(inst)) if x.check == "security_group"
    ]
    assert f.code == "no_shared_security_group" and f.severity == "error"
    assert f.commands[0].startswith(
        "SG=$(aws ec2 create-security-group --region us-east-1 "
        "--vpc-id vpc-1 --group-name megafleet-nodes"
    )
    assert f.commands[1] == (
        "aws ec2 authorize-security-group-ingress --region us-east-1 "
        '--group-id "$SG" --protocol -1 --source-group "$SG"'
    )
    mods = f.commands[3:]
    assert mods == [
        f"aws ec2 modify-network-interface-attribute --region us-east-1 "
        f'--network-interface-id {eni} --groups {g} "$SG"'
        for eni, g in (("eni-i-a-0", "sg-a"), ("eni-i-a-1", "sg-a"), ("eni-i-b-0", "sg-b"))
    ]


def test_an_existing_megafleet_group_is_reused_by_id():
    inst = [raw("i-a", groups=("sg-a", "sg-m")), raw("i-b", groups=("sg-b",))]
    groups = {
        "sg-a": group("sg-a"),
        "sg-b": group("sg-b"),
        "sg-m": group("sg-m", ingress_self=True, egress_self=False, name="megafleet-nodes"),
    }
    (f,) = [
        x for x in judge(snap(inst, groups), None, reach_ok(inst)) if x.check == "security_group"
    ]
    assert f.commands == [
        "aws ec2 authorize-security-group-egress --region us-east-1 --group-id sg-m --protocol -1 "
        "--source-group sg-m",
        "aws ec2 modify-network-interface-attribute --region us-east-1 --network-interface-id "
        "eni-i-b-0 --groups sg-b sg-m",
    ]


def test_placement_groups():
    inst = good_pair()
    loose = [raw("i-a", efa=32), raw("i-b", efa=32)]
    (f,) = [x for x in judge(snap(loose), None, reach_ok(loose)) if x.check == "placement"]
    assert f.code == "no_placement_group" and f.severity == "warning" and "p4/p5/p6" in f.message
    assert f.commands[1] == (
        "aws ec2 modify-instance-placement --region us-east-1 --instance-id "
        "i-a --group-name megafleet-cluster"
    )
    g = [raw("i-a", type="g6e.xlarge"), raw("i-b", type="g6e.xlarge")]
    assert [x.severity for x in judge(snap(g), None, reach_ok(g)) if x.check == "placement"] == [
        "info"
    ]
    spread = judge(snap(inst, strategies={"pg": "spread"}), None, reach_ok(inst))
    assert codes(x for x in spread if x.check == "placement") == ["placement_group_not_cluster"]
    split = [raw("i-a", efa=32, pg="pg1"), raw("i-b", efa=32, pg="pg2")]
    found = judge(
        snap(split, strategies={"pg1": "cluster", "pg2": "cluster"}), None, reach_ok(split)
    )
    assert codes(x for x in found if x.check == "placement") == ["multiple_placement_groups"]


def test_efa_missing_partial_unsupported_and_unknown_types():
    inst = [
        raw("i-a", efa=0, pg="pg"),
        raw("i-b", efa=4, pg="pg"),
        raw("i-c", type="g5.2xlarge", pg="pg"),
        raw("i-d", type="x9.weird", pg="pg"),
    ]
    f = judge(snap(inst), None, reach_ok(inst))
    efa = {x.code: x for x in f if x.check == "efa"}
    assert efa["efa_missing"].instances == ["i-a"] and efa["efa_missing"].severity == "warning"
    assert "4 of 32" in efa["efa_partial"].message and efa["efa_partial"].severity == "info"
    assert efa["efa_unsupported"].instances == ["i-c"]
    (unknown,) = [x for x in f if x.code == "unknown_instance_type"]
    assert unknown.instances == ["i-d"] and "x9.weird" in unknown.message
    assert "mixed_instance_types" in codes(f)


def test_ssh_reach_is_injected_and_not_checked_is_said():
    inst = good_pair()
    f = judge(
        snap(inst),
        None,
        {
            "i-a": Reach("unreachable", "3.0.0.1:22", "timed out"),
            "i-b": Reach("not_checked", None, "skipped with --no-ssh"),
        },
    )
    ssh = {x.code: x for x in f if x.check == "ssh"}
    assert (
        ssh["ssh_unreachable"].instances == ["i-a"] and ssh["ssh_unreachable"].severity == "error"
    )
    assert "--group-id sg-1 --protocol tcp --port 22" in ssh["ssh_unreachable"].commands[0]
    assert (
        ssh["ssh_not_checked"].severity == "info" and "--no-ssh" in ssh["ssh_not_checked"].message
    )
    assert check_status(judge(snap(inst), None, {}), "ssh") == "info"  # nothing given: not checked


def test_master_address_never_the_public_ip():
    inst = good_pair() + [raw("i-c", "c", efa=32, pg="pg", public="3.0.0.3", private="10.0.0.3")]
    hosts = {
        "i-a": Host("a", "3.0.0.1", "ubuntu"),
        "i-b": Host("b", "3.0.0.2", "ubuntu", private_address="3.0.0.2"),
        "i-c": Host("c", "3.0.0.3", "ubuntu", private_address="10.9.9.9"),
    }
    f = {x.code: x for x in judge(snap(inst), hosts, reach_ok(inst)) if x.check == "master_address"}
    assert f["private_address_missing"].instances == ["i-a"]
    assert f["private_address_missing"].severity == "error"
    assert "--update" in f["private_address_missing"].fix
    assert f["master_address_public"].instances == ["i-b"]
    assert f["private_address_stale"].instances == ["i-c"]
    f2 = judge(snap(inst), {}, reach_ok(inst))
    assert [x.code for x in f2 if x.check == "master_address"] == ["not_in_inventory"]


def test_spot_and_capacity_blocks_and_no_instances():
    inst = [
        raw("i-a", efa=32, pg="pg", lifecycle="spot"),
        raw("i-b", efa=32, pg="pg", lifecycle="capacity-block"),
    ]
    f = {x.code: x for x in judge(snap(inst), None, reach_ok(inst))}
    assert f["spot_instances"].severity == "warning" and "two-minute" in f["spot_instances"].message
    assert f["capacity_block"].severity == "info"
    (none,) = judge(snap([]))
    assert none.code == "no_instances" and none.severity == "error" and "us-east-1" in none.message


def test_instance_from_api_reads_efa_groups_and_lifecycle():
    i = raw("i-a", "gpu-1", efa=3, pg="pg", lifecycle="spot", groups=("sg-1", "sg-2"))
    d = i.to_dict()
    assert d["efa_interfaces"] == 3 and d["placement_group"] == "pg" and d["lifecycle"] == "spot"
    assert [g["id"] for g in d["security_groups"]] == ["sg-1", "sg-2"]
    assert d["gpus"]["gpus"] == 8 and d["gpu_summary"] == "8x H100 80 GiB"
    assert raw("i-x", type="m7i.large").to_dict()["gpus"] is None


def test_a_group_on_the_primary_interface_only_does_not_cover_efa_traffic():
    inst = good_pair()
    for i in inst:
        i.interfaces[0].groups = ["sg-1", "sg-ssh"]
        for eni in i.interfaces[1:]:
            eni.groups = ["sg-efa"]
        i.security_groups = {"sg-1": "", "sg-ssh": "", "sg-efa": ""}
    groups = {g: group(g) for g in ("sg-1", "sg-ssh", "sg-efa")}
    (f,) = [
        x for x in judge(snap(inst, groups), None, reach_ok(inst)) if x.check == "security_group"
    ]
    assert f.code == "no_shared_security_group"
    mods = [c for c in f.commands if "modify-network-interface-attribute" in c]
    assert len(mods) == 64  # every interface of both instances gets the new group
    assert mods[0].endswith('--network-interface-id eni-i-a-0 --groups sg-1 sg-ssh "$SG"')


def test_unknown_placement_strategy_is_said_not_guessed():
    inst = good_pair()
    f = [
        x
        for x in judge(snap(inst, strategies={"pg": None}), None, reach_ok(inst))
        if x.check == "placement"
    ]
    assert [(x.code, x.severity) for x in f] == [("placement_strategy_unknown", "info")]


def test_probe_targets_skip_hosts_behind_a_jump_host():
    from megafleet.ec2.reach import probe_instances

    inst = good_pair() + [raw("i-c", state="stopped")]
    asked = []

    def probe(address, port, timeout):
        asked.append((address, port))
        return None

    hosts = {
        "i-a": Host("a", "10.0.0.1", "ubuntu", port=2200, jump_host="bastion"),
        "i-b": Host("b", "3.0.0.2", "ubuntu", port=2222),
    }
    reach = probe_instances(inst, hosts, 1.0, probe)
    assert asked == [("3.0.0.2", 2222)] and set(reach) == {"i-a", "i-b"}
    assert reach["i-a"].status == "not_checked" and "jump host bastion" in reach["i-a"].detail
    assert reach["i-b"] == Reach("ok", "3.0.0.2:2222", "")
