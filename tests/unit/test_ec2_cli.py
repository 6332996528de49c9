"""`megafleet ec2 ...` as a user runs it: in-process with click's CliRunner under moto (moto's
mock lives in this process), plus the separate-process launcher tests.ec2_moto once."""

import json
import subprocess
import sys

from click.testing import CliRunner

from megafleet.cli import cli
from megafleet.ec2.checks import CHECKS
from tests.conftest import REPO_ROOT, cli_env
from tests.ec2_moto import aws, make_key  # noqa: F401  (aws: fixture)

INSTANCE_KEYS = {
    "id",
    "name",
    "type",
    "state",
    "region",
    "az",
    "subnet_id",
    "vpc_id",
    "public_ip",
    "private_ip",
    "public_dns",
    "placement_group",
    "security_groups",
    "efa_interfaces",
    "interfaces",
    "lifecycle",
    "tags",
    "launch_time",
    "gpus",
    "gpu_summary",
}
FINDING_KEYS = {"severity", "check", "code", "message", "fix", "commands", "instances"}


def run(*args, input=None):
    from megafleet import ui

    # rich reads COLUMNS once, when megafleet.ui is first imported (maybe by another test)
    ui.console.width = 250
    result = CliRunner().invoke(
        cli,
        list(args),
        input=input,
        obj={},
        catch_exceptions=False,
        env={"COLUMNS": "250", "NO_COLOR": "1"},
    )
    return result


def as_json(result):
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (rc={result.exit_code}):\n{result.output}")


def test_list_json_shape_and_table(aws):
    a = aws.launch("gpu-a", tags={"team": "ml"})
    aws.launch("web", type="t3.micro")
    r = run("ec2", "list", "--tag", "team=ml", "--json")
    data = as_json(r)
    assert r.exit_code == 0 and data["region"] == "us-east-1" and data["count"] == 1
    assert data["filters"] == {"tags": ["team=ml"], "ids": []}
    (inst,) = data["instances"]
    assert set(inst) == INSTANCE_KEYS and inst["id"] == a
    assert inst["gpus"]["gpus"] == 8 and inst["gpus"]["max_efa_interfaces"] == 32
    assert inst["security_groups"] == [{"id": aws.group_id, "name": "nodes"}]
    table = run("ec2", "list").stdout
    assert "8x H100 80 GiB" in table and "unknown" in table and "t3.micro" in table
    assert "megafleet ec2 check" in table


def test_list_in_a_region_without_instances(aws):
    aws.launch("a")
    r = run("ec2", "list", "--region", "eu-west-1")
    assert r.exit_code == 0 and "no instances in eu-west-1" in r.stdout
    assert as_json(run("ec2", "list", "--region", "eu-west-1", "--json"))["instances"] == []


def test_check_json_shape_exit_code_and_text(aws, megafleet_home):
    ids = [aws.launch("a", az="a"), aws.launch("b", az="b", spot=True)]
    r = run("ec2", "check", "--ids", ",".join(ids), "--no-ssh", "--json")
    data = as_json(r)
    assert r.exit_code == 1
    assert set(data) == {"region", "inventory", "instances", "checks", "findings", "summary"}
    assert list(data["checks"]) == list(CHECKS) and data["checks"]["network"] == "error"
    assert data["checks"]["ssh"] == "info" and data["checks"]["spot"] == "warning"
    assert all(set(f) == FINDING_KEYS for f in data["findings"])
    assert data["instances"][0]["ssh"]["status"] == "not_checked"
    assert data["summary"]["error"] >= 3 and data["summary"]["ok"] is False
    text = run("ec2", "check", "--ids", ",".join(ids), "--no-ssh")
    assert text.exit_code == 1
    assert (
        "multiple_azs" in text.stdout and "aws ec2 authorize-security-group-ingress" in text.stdout
    )
    assert "ssh_not_checked" in text.stdout and "error(s)" in text.stdout


def test_import_dry_run_confirmation_and_write(aws, megafleet_home, tmp_path):
    key = make_key(tmp_path)
    aws.launch("gpu-a")
    aws.launch("gpu-b")
    args = ["ec2", "import", "--user", "ubuntu", "--key", str(key)]
    dry = as_json(run(*args, "--dry-run", "--json"))
    assert dry["dry_run"] and dry["added"] == 2 and not dry["written"]
    assert not (megafleet_home / "hosts.yaml").exists()
    refused = run(*args)
    assert refused.exit_code == 2 and "add --yes" in refused.stderr
    assert "gpu-a" in refused.stdout  # the plan was shown before asking
    done = run(*args, "--yes")
    assert done.exit_code == 0 and "2 added" in done.stdout
    hosts = as_json(run("hosts", "list", "--json"))["hosts"]
    assert [h["name"] for h in hosts] == ["gpu-a", "gpu-b"]
    again = as_json(run(*args, "--yes", "--json"))
    assert again["skipped"] == 2 and not again["written"]
    private = as_json(run(*args, "--update", "--ssh-address", "private", "--yes", "--json"))
    assert private["updated"] == 2 and private["written"]
    hosts = as_json(run("hosts", "list", "--json"))["hosts"]
    assert all(
        h["address"] == h["private_address"] and h["address"].startswith("10.7.") for h in hosts
    )
    missing = run(
        "ec2", "import", "--user", "ubuntu", "--key", str(key), "--tag", "team=none", "--yes"
    )
    assert (
        missing.exit_code == 1 and "no instances in us-east-1 with tag team=none" in missing.stderr
    )


def test_start_stop_with_confirmation(aws):
    ids = [aws.launch("a"), aws.launch("b")]
    joined = ",".join(ids)
    refused = run("ec2", "stop", "--ids", joined)
    assert refused.exit_code == 2 and "add --yes" in refused.stderr
    assert {aws.state(i) for i in ids} == {"running"}
    dry = run("ec2", "stop", "--ids", joined, "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count("would stop") == 2
    stopped = as_json(run("ec2", "stop", "--ids", joined, "--yes", "--json"))
    assert {i["state"] for i in stopped["instances"]} == {"stopped"}
    assert {aws.state(i) for i in ids} == {"stopped"}
    started = run("ec2", "start", "--ids", ids[0], "--yes")
    assert (
        started.exit_code == 0
        and "running" in started.stdout
        and "import --update" in started.stdout
    )
    assert aws.state(ids[0]) == "running" and aws.state(ids[1]) == "stopped"
    noop = run("ec2", "start", "--ids", ids[0])  # nothing to do: no question asked
    assert noop.exit_code == 0 and "already running" in noop.stdout


def test_missing_region_and_credentials_messages(monkeypatch, tmp_path):
    from tests.ec2_moto import isolate_aws_env

    env = {}
    isolate_aws_env(env, str(tmp_path), credentials=False, region=False)
    for k in (
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = run("ec2", "list", "--json")
    assert r.exit_code == 2
    assert (
        as_json(r)["message"] == "no AWS region given or configured"
        and "--region" in as_json(r)["hint"]
    )
    r = run("ec2", "list", "--region", "us-east-1")
    assert (
        r.exit_code == 2 and "no AWS credentials found" in r.stderr and "aws configure" in r.stderr
    )
    assert "Traceback" not in r.output


def test_profile_from_the_aws_config_files(aws, tmp_path, monkeypatch):
    (tmp_path / "aws-config").write_text("[profile ml]\nregion = eu-west-1\n")
    (tmp_path / "aws-credentials").write_text(
        "[ml]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    data = as_json(run("ec2", "list", "--profile", "ml", "--json"))
    assert data["region"] == "eu-west-1" and data["instances"] == []
    r = run("ec2", "check", "--profile", "nope", "--region", "us-east-1")
    assert r.exit_code == 2 and "AWS profile 'nope' not found" in r.stderr


def test_separate_process_launcher_and_lazy_boto3(tmp_path):
    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps(
            {
                "instances": [
                    {"name": "n1", "tags": {"team": "ml"}},
                    {"name": "n2", "type": "g6e.48xlarge"},
                ]
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.ec2_moto",
            str(seed),
            "--",
            "ec2",
            "list",
            "--tag",
            "team=ml",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [i["name"] for i in json.loads(proc.stdout)["instances"]] == ["n1"]
    probe = (
        "import sys\nfrom megafleet.cli import main\nfor argv in (['--help'], ['ec2', '--help'],"
        " ['ec2', 'check', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n"
        "        pass\nprint('boto3' in sys.modules, 'botocore' in sys.modules,"
        " 'moto' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_ROOT,
        timeout=60,
    ).stdout
    assert out.strip().splitlines()[-1] == "False False False"
