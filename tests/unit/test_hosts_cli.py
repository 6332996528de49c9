"""`megafleet hosts add|list|remove` as a user runs them (separate processes, no network)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, cli_env, run_cli, run_cli_json


def env(home):
    return {"MEGAFLEET_HOME": str(home)}


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_add_list_remove_round_trip(megafleet_home, tmp_path):
    key = keygen(tmp_path / "id")
    proc = run_cli(
        "hosts",
        "add",
        "gpu1",
        "ubuntu@10.0.0.5:2222",
        "-i",
        str(key),
        "--tag",
        "rack=a",
        "--private-address",
        "172.31.0.5",
        env=env(megafleet_home),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "added gpu1" in proc.stdout and "megafleet hosts check --hosts gpu1" in proc.stdout
    run_cli(
        "hosts",
        "add",
        "gpu2",
        "10.0.0.6",
        "--user",
        "ec2-user",
        "--jump-host",
        "gpu1",
        env=env(megafleet_home),
        cwd=tmp_path,
    )
    proc, data = run_cli_json("hosts", "list", "--json", env=env(megafleet_home), cwd=tmp_path)
    assert data["inventory"] == str(megafleet_home / "hosts.yaml")
    assert data["hosts"][0] == {
        "name": "gpu1",
        "address": "10.0.0.5",
        "user": "ubuntu",
        "port": 2222,
        "identity_file": str(key),
        "private_address": "172.31.0.5",
        "tags": {"rack": "a"},
    }
    assert data["hosts"][1]["jump_host"] == "gpu1" and data["hosts"][1]["user"] == "ec2-user"
    table = run_cli("hosts", "list", env=env(megafleet_home), cwd=tmp_path).stdout
    assert "ubuntu@10.0.0.5:2222" in table and "rack=a" in table
    refused = run_cli("hosts", "remove", "gpu1", "--yes", env=env(megafleet_home), cwd=tmp_path)
    assert refused.returncode == 2 and "jump host of gpu2" in refused.stderr
    assert (
        run_cli(
            "hosts", "remove", "gpu2", "--yes", env=env(megafleet_home), cwd=tmp_path
        ).returncode
        == 0
    )
    _, data = run_cli_json("hosts", "list", "--json", env=env(megafleet_home), cwd=tmp_path)
    assert [h["name"] for h in data["hosts"]] == ["gpu1"]


def test_add_validates_fields(megafleet_home, tmp_path):
    proc = run_cli(
        "hosts", "add", "bad name", "u@10.0.0.5:0", env=env(megafleet_home), cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "hosts.bad name:" in proc.stderr and "hosts.bad name.port" in proc.stderr
    proc, data = run_cli_json(
        "hosts", "add", "x", "u@h:99999", "--json", env=env(megafleet_home), cwd=tmp_path
    )
    assert proc.returncode == 2 and data["problems"][0]["field"] == "hosts.x.port"
    assert not (megafleet_home / "hosts.yaml").exists()


def test_add_with_a_key_others_can_read_prints_the_chmod(megafleet_home, tmp_path):
    key = keygen(tmp_path / "id")
    key.chmod(0o644)
    proc = run_cli(
        "hosts", "add", "gpu1", "u@10.0.0.5", "-i", str(key), env=env(megafleet_home), cwd=tmp_path
    )
    assert proc.returncode == 2 and "0644" in proc.stderr
    assert f"chmod 600 {key}" in proc.stderr
    missing = run_cli(
        "hosts", "add", "gpu1", "u@10.0.0.5", "-i", "nokey", env=env(megafleet_home), cwd=tmp_path
    )
    assert missing.returncode == 2 and f"{tmp_path / 'nokey'} does not exist" in missing.stderr


def test_dry_run_writes_nothing_and_remove_needs_yes(megafleet_home, tmp_path):
    proc, data = run_cli_json(
        "hosts",
        "add",
        "gpu1",
        "u@10.0.0.5",
        "--dry-run",
        "--json",
        env=env(megafleet_home),
        cwd=tmp_path,
    )
    assert data["dry_run"] and data["host"]["address"] == "10.0.0.5"
    assert not (megafleet_home / "hosts.yaml").exists()
    run_cli("hosts", "add", "gpu1", "u@10.0.0.5", env=env(megafleet_home), cwd=tmp_path)
    proc = run_cli("hosts", "remove", "gpu1", env=env(megafleet_home), cwd=tmp_path)
    assert proc.returncode == 2 and "add --yes" in proc.stderr
    assert (
        "would remove gpu1"
        in run_cli(
            "hosts", "remove", "gpu1", "--dry-run", env=env(megafleet_home), cwd=tmp_path
        ).stdout
    )


def test_malformed_inventory_names_the_line_for_every_command(megafleet_home, tmp_path):
    (megafleet_home / "hosts.yaml").write_text(
        "hosts:\n  a:\n    address: 10.0.0.1\n    port: [22\n"
    )
    for args in (["hosts", "list"], ["hosts", "check"]):
        proc = run_cli(*args, env=env(megafleet_home), cwd=tmp_path)
        assert proc.returncode == 2 and f"{megafleet_home / 'hosts.yaml'}:5:" in proc.stderr
    (megafleet_home / "hosts.yaml").write_text(
        "hosts:\n  a:\n    address: 10.0.0.1\n    port: ssh\n"
    )
    proc, data = run_cli_json("hosts", "check", "--json", env=env(megafleet_home), cwd=tmp_path)
    assert proc.returncode == 2
    assert data["problems"][0]["field"] == "hosts.a.port" and data["problems"][0]["line"] == 4


def test_check_with_no_hosts_says_how_to_add_one(megafleet_home, tmp_path):
    proc = run_cli("hosts", "check", env=env(megafleet_home), cwd=tmp_path)
    assert proc.returncode == 2 and "megafleet hosts add" in proc.stderr
    proc = run_cli("hosts", "check", "--hosts", "nope", env=env(megafleet_home), cwd=tmp_path)
    assert proc.returncode == 2


def test_help_does_not_import_paramiko():
    code = (
        "import sys\nfrom megafleet.cli import main\ntry:\n    main(['hosts', '--help'])\n"
        "except SystemExit:\n    pass\nprint(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('paramiko', 'torch', 'boto3', 'megatron'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_ROOT,
    )
    assert "add" in proc.stdout and "check" in proc.stdout and "trust" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
