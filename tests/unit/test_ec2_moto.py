"""The EC2 layer against moto (AWS's API in-process): discovery, checks whose printed commands,
applied through boto3, fix the cluster, import into the inventory, start/stop, and the errors
for a missing region, credentials or profile."""

import re
import shlex
import socket
import threading

import pytest

from megafleet.ec2 import check_instances, find_instances, import_instances
from megafleet.ec2.power import change_state
from megafleet.ec2.reach import ssh_banner_probe
from megafleet.errors import MegafleetError, UsageError
from megafleet.inventory import Inventory
from tests.ec2_moto import aws, isolate_aws_env, make_key  # noqa: F401  (aws: fixture)


def fine(address, port, timeout):
    return None


def apply_aws_cli(client, commands, region="us-east-1"):
    """Run the AWS CLI commands `ec2 check` printed, through the equivalent boto3 calls."""
    shell_vars = {}
    for line in commands:
        target, m = None, re.fullmatch(r"(\w+)=\$\((.*)\)", line)
        if m:
            target, line = m.groups()
        for name, value in shell_vars.items():
            line = line.replace(f'"${name}"', value)
        argv = shlex.split(line)
        assert argv[:2] == ["aws", "ec2"] and "$" not in line, line
        verb, opts, key = argv[2], {}, None
        for a in argv[3:]:
            if a.startswith("--"):
                key = a
                opts[key] = []
            else:
                opts[key].append(a)
        assert opts.pop("--region") == [region]
        if verb == "create-security-group":
            assert opts["--query"] == ["GroupId"] and opts["--output"] == ["text"]
            shell_vars[target] = client.create_security_group(
                GroupName=opts["--group-name"][0],
                Description=opts["--description"][0],
                VpcId=opts["--vpc-id"][0],
            )["GroupId"]
        elif verb in ("authorize-security-group-ingress", "authorize-security-group-egress"):
            assert opts["--protocol"] == ["-1"] and set(opts) == {
                "--group-id",
                "--protocol",
                "--source-group",
            }
            getattr(client, verb.replace("-", "_"))(
                GroupId=opts["--group-id"][0],
                IpPermissions=[
                    {
                        "IpProtocol": "-1",
                        "UserIdGroupPairs": [{"GroupId": opts["--source-group"][0]}],
                    }
                ],
            )
        elif verb == "modify-network-interface-attribute":
            client.modify_network_interface_attribute(
                NetworkInterfaceId=opts["--network-interface-id"][0], Groups=opts["--groups"]
            )
        else:
            raise AssertionError(f"unexpected command {verb}")


def sg_findings(report):
    return [f for f in report.findings if f.check == "security_group"]


def test_two_azs_are_flagged(aws):
    a = aws.launch("a", az="a")
    b = aws.launch("b", az="b")
    report = check_instances(ids=[a, b], inventory=False, probe=fine)
    (f,) = [f for f in report.findings if f.code == "multiple_azs"]
    assert f.severity == "error" and set(f.instances) == {a, b}
    assert report.exit_code() == 1 and report.status()["network"] == "error"
    assert report.status()["master_address"] == "skip"


def test_printed_security_group_commands_make_the_check_pass(aws):
    ids = [aws.launch("a"), aws.launch("b")]
    before = sg_findings(check_instances(ids=ids, inventory=False, probe=fine))
    assert {f.code for f in before} == {"sg_missing_self_ingress", "sg_missing_self_egress"}
    assert all(aws.group_id in f.commands[0] for f in before)
    apply_aws_cli(aws.client, [c for f in before for c in f.commands])
    after = check_instances(ids=ids, inventory=False, probe=fine)
    assert sg_findings(after) == [] and after.status()["security_group"] == "pass"


def test_no_shared_group_commands_create_and_attach_one(aws):
    ids = [
        aws.launch("a", groups=[aws.new_group("only-a")]),
        aws.launch("b", groups=[aws.new_group("only-b", self_rule=True)]),
    ]
    (f,) = sg_findings(check_instances(ids=ids, inventory=False, probe=fine))
    assert f.code == "no_shared_security_group"
    apply_aws_cli(aws.client, f.commands)
    after = check_instances(ids=ids, inventory=False, probe=fine)
    assert sg_findings(after) == []
    assert all("megafleet-nodes" in i.security_groups.values() for i in after.instances)


def test_ssh_probe_is_injected_and_uses_the_inventory_target(aws, megafleet_home, tmp_path):
    ids = [aws.launch("a"), aws.launch("b")]
    aws.client.stop_instances(InstanceIds=[ids[1]])
    asked = []

    def refuse(address, port, timeout):
        asked.append((address, port, timeout))
        return "Connection refused"

    report = check_instances(ids=ids, probe=refuse, ssh_timeout=0.5)
    (f,) = [f for f in report.findings if f.code == "ssh_unreachable"]
    running = next(i for i in report.instances if i.state == "running")
    assert asked == [(running.public_ip, 22, 0.5)] and f.instances == [running.id]
    assert "Connection refused" in f.message and aws.group_id in f.commands[0]
    import_instances(report.instances, "ubuntu", str(make_key(tmp_path)))
    inv = Inventory.load()
    host = next(iter(inv))
    host.port = 2222
    inv.save()
    asked.clear()
    check_instances(ids=ids, probe=refuse, ssh_timeout=0.5)
    assert asked == [(running.public_ip, 2222, 0.5)]
    skipped = check_instances(ids=ids, ssh=False)
    assert [f.code for f in skipped.findings if f.check == "ssh"] == ["ssh_not_checked"]


def test_region_without_instances_says_so(aws):
    assert find_instances(region="eu-west-1") == []
    report = check_instances(region="eu-west-1", inventory=False)
    assert [f.code for f in report.findings] == ["no_instances"]
    assert "eu-west-1" in report.findings[0].message and report.exit_code() == 1
    status = report.status()
    assert status.pop("instances") == "error" and set(status.values()) == {"skip"}


def test_tags_ids_and_states_select_instances(aws):
    a = aws.launch("a", tags={"team": "ml", "job": "x"})
    b = aws.launch("b", tags={"team": "ml"})
    aws.launch("c", tags={"team": "web"})
    assert [i.id for i in find_instances(tags=["team=ml"])] == [a, b]
    assert [i.id for i in find_instances(tags=["team=ml", "job"])] == [a]
    assert [i.id for i in find_instances(tags=["team=m*"], ids=[f"{b},{a}"])] == [a, b]
    aws.client.terminate_instances(InstanceIds=[b])
    assert [i.id for i in find_instances(tags=["team=ml"])] == [a]
    with pytest.raises(UsageError, match="not an instance id"):
        find_instances(ids=["gpu1"])


def test_import_writes_the_inventory_and_reimport_skips_or_updates(aws, megafleet_home, tmp_path):
    key = make_key(tmp_path)
    a = aws.launch("gpu node", tags={"team": "ml"})
    b = aws.launch("gpu node", tags={"team": "ml"}, spot=True)
    stopped = aws.launch("gpu node", tags={"team": "ml"})
    aws.client.stop_instances(InstanceIds=[stopped])
    found = find_instances(tags=["team=ml"])
    result = import_instances(found, "ubuntu", str(key))
    assert result.written and (result.count("add"), result.count("skip")) == (2, 1)
    inv = Inventory.load()
    assert inv.names() == ["gpu-node", "gpu-node-2"]
    by_id = {i.id: i for i in found}
    for host in inv:
        inst = by_id[host.tags["ec2_instance_id"]]
        assert host.address == inst.public_ip and host.private_address == inst.private_ip
        assert host.user == "ubuntu" and host.identity_file == str(key) and host.port == 22
        assert host.tags["team"] == "ml" and host.tags["Name"] == "gpu node"
        assert (
            host.tags["ec2_region"] == "us-east-1"
            and host.tags["ec2_instance_type"] == "p5.48xlarge"
        )
    assert {h.tags["ec2_instance_id"] for h in inv} == {a, b}
    skipped = [x for x in result.actions if x.action == "skip"]
    assert skipped[0].instance_id == stopped and "stopped" in skipped[0].reason

    again = import_instances(find_instances(tags=["team=ml"]), "ubuntu", str(key))
    assert not again.written and again.count("skip") == 3
    assert all("--update" in x.reason for x in again.actions if x.instance_id != stopped)

    inv.hosts["gpu-node"].private_address = None  # an old entry without the master address
    inv.save()
    report = check_instances(tags=["team=ml"], probe=fine)
    assert [f.instances for f in report.findings if f.code == "private_address_missing"] == [
        [inv.hosts["gpu-node"].tags["ec2_instance_id"]]
    ]
    updated = import_instances(find_instances(tags=["team=ml"]), "ec2-user", str(key), update=True)
    assert updated.count("update") == 2 and updated.written
    reloaded = Inventory.load()
    assert reloaded.names() == ["gpu-node", "gpu-node-2"]
    assert all(h.user == "ec2-user" and h.private_address for h in reloaded)
    assert not [
        f
        for f in check_instances(tags=["team=ml"], probe=fine).findings
        if f.check == "master_address"
    ]


def test_import_dry_run_and_bad_key(aws, megafleet_home, tmp_path):
    aws.launch("a")
    res = import_instances(find_instances(), "ubuntu", str(make_key(tmp_path)), dry_run=True)
    assert res.count("add") == 1 and not res.written
    assert not (megafleet_home / "hosts.yaml").exists()
    with pytest.raises(UsageError, match="does not exist"):
        import_instances(find_instances(), "ubuntu", str(tmp_path / "missing.pem"))


def test_start_and_stop_change_state(aws):
    ids = [aws.launch("a"), aws.launch("b")]
    after = change_state("stop", ids, delay=0.05)
    assert {i.state for i in after} == {"stopped"} and {aws.state(i) for i in ids} == {"stopped"}
    after = change_state("start", [ids[0]], delay=0.05)
    assert [i.state for i in after] == ["running"] and aws.state(ids[1]) == "stopped"
    again = change_state("start", ids, delay=0.05)  # one already running: only the other starts
    assert {i.state for i in again} == {"running"}
    with pytest.raises(UsageError, match="i-0000000000000dead"):
        change_state("stop", ["i-0000000000000dead"], delay=0.05)


def test_missing_region_credentials_and_profile(monkeypatch, tmp_path):
    env = {}
    isolate_aws_env(env, str(tmp_path), credentials=False, region=False)
    for k in (
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match="no AWS region") as exc:
        find_instances()
    assert "--region" in exc.value.hint and exc.value.exit_code == 2
    with pytest.raises(UsageError, match="no AWS credentials") as exc:
        find_instances(region="us-east-1")
    assert "aws configure" in exc.value.hint
    with pytest.raises(UsageError, match="profile 'nope' not found"):
        find_instances(region="us-east-1", profile="nope")
    with pytest.raises(UsageError, match="not an AWS region"):
        find_instances(region="useast")


def test_endpoint_variable_is_honoured_and_an_unreachable_api_is_explained(monkeypatch, tmp_path):
    env = {}
    isolate_aws_env(env, str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(
        MegafleetError, match=f"cannot reach the EC2 API in us-east-1.*127.0.0.1:{port}"
    ):
        find_instances()


def test_api_errors_name_the_permission():
    import botocore.exceptions as bx

    from megafleet.ec2.aws import client_error

    def err(code, message="m"):
        return bx.ClientError({"Error": {"Code": code, "Message": message}}, "DescribeInstances")

    denied = client_error(
        err(
            "UnauthorizedOperation",
            "You are not authorized. Encoded authorization failure message: xyz",
        ),
        "r",
    )
    assert "ec2:DescribeInstances" in denied.hint and "xyz" not in denied.message
    assert client_error(err("AuthFailure"), "r").exit_code == 2
    assert "expired" in client_error(err("ExpiredToken"), "r").message
    assert isinstance(client_error(err("Throttled"), "r"), MegafleetError)


def test_ssh_banner_probe_against_real_sockets():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        conn, _ = srv.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ssh_banner_probe("127.0.0.1", port, 2.0) is None
    t.join(2)
    srv.close()
    closed = ssh_banner_probe("127.0.0.1", port, 1.0)  # nothing listens any more
    assert closed and "refused" in closed.lower()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        assert "no answer within 0.3s" == ssh_banner_probe(
            "127.0.0.1", silent.getsockname()[1], 0.3
        )
    finally:
        silent.close()
