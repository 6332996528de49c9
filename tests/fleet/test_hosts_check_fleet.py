"""`megafleet hosts check|add|trust` as a user runs them (separate processes) against the
namespace fleet. Hosts that report GPUs do so through a STUB nvidia-smi that replays the 2xH200
captures in tests/fixtures/h200x2: the hosts have no GPU."""

import subprocess
import time

import pytest

from tests.conftest import run_cli, run_cli_json

pytestmark = pytest.mark.fleet


def env(home):
    return {"MEGAFLEET_HOME": str(home)}


def by_name(report):
    return {h["name"]: h for h in report["hosts"]}


def test_three_hosts_one_down_reports_two_reachable_and_why_the_third_is_not(fleet, fleet_home):
    """The issue's done-when check."""
    fleet.write_inventory(fleet_home, fleet.hosts)  # node0..node2
    fleet.host("node2").stop_sshd()
    proc, report = run_cli_json("hosts", "check", "--json", "--timeout", "5", env=env(fleet_home))
    assert proc.returncode == 3, proc.stderr
    assert report["summary"] == {**report["summary"], "total": 3, "reachable": 2, "unreachable": 1}
    hosts = by_name(report)
    assert hosts["node0"]["reachable"] and hosts["node1"]["reachable"]
    assert hosts["node0"]["user"] == fleet.host("node0").user and hosts["node0"]["cpus"] >= 1
    down = hosts["node2"]
    assert not down["reachable"] and down["error"]["kind"] == "unreachable"
    assert "connection refused" in down["error"]["message"]
    assert [f["code"] for f in report["findings"] if f["level"] == "error"] == ["unreachable"]


def test_the_table_for_people_shows_hosts_reasons_and_fixes(fleet, fleet_home):
    fleet.write_inventory(fleet_home, fleet.hosts)
    fleet.host("node1").stop_sshd()
    proc = run_cli("hosts", "check", "--timeout", "5", env=env(fleet_home))
    assert proc.returncode == 3
    out = proc.stdout
    assert "2/3 host(s) reachable" in out and "node0" in out
    assert "✗ node1: connection refused" in out
    assert "first connection to node0, node2: host keys pinned" in out
    assert "free disk in ~/megafleet" in out


def test_stub_gpus_are_reported_and_hosts_are_checked_in_parallel(fleet, fleet_home):
    """Each STUB nvidia-smi sleeps 1 s: three hosts in about the time of one."""
    fleet.write_inventory(fleet_home, fleet.hosts)
    for h in fleet.hosts:
        h.install_stub_nvidia_smi(delay=1.0)
    start = time.monotonic()
    proc, report = run_cli_json("hosts", "check", "--json", env=env(fleet_home))
    assert proc.returncode == 0, proc.stderr
    assert report["summary"]["seconds"] < 4.5, report["summary"]  # 2 s per host; 6 s in a row
    assert time.monotonic() - start < 8
    node = by_name(report)["node1"]
    assert node["gpu_status"] == "ok" and node["cuda_driver_version"] == "13.0"
    assert node["gpus"][1] == {
        "index": 1,
        "name": "NVIDIA H200",
        "memory.total": 143771,
        "driver_version": "580.159.04",
        "compute_cap": "9.0",
    }
    assert report["findings"] == []


def test_a_host_without_gpus_is_a_finding_not_an_error(fleet, fleet_home):
    fleet.write_inventory(fleet_home, fleet.hosts)
    fleet.host("node0").install_stub_nvidia_smi()
    proc, report = run_cli_json("hosts", "check", "--json", env=env(fleet_home))
    assert proc.returncode == 0
    assert by_name(report)["node1"]["gpu_status"] == "none"
    assert [(f["level"], f["code"], f["hosts"]) for f in report["findings"]] == [
        ("warning", "no_gpus", ["node1", "node2"])
    ]


def test_a_silent_host_is_unreachable_within_the_timeout_while_the_others_are_checked(
    fleet, fleet_home
):
    fleet.write_inventory(fleet_home, fleet.hosts)
    fleet.host("node1").link_down()
    start = time.monotonic()
    proc, report = run_cli_json("hosts", "check", "--json", "--timeout", "2", env=env(fleet_home))
    assert time.monotonic() - start < 8
    assert proc.returncode == 3
    hosts = by_name(report)
    assert hosts["node0"]["ok"] and hosts["node2"]["ok"]
    assert hosts["node1"]["error"]["kind"] == "unreachable"
    assert report["summary"]["seconds"] < 4


def test_the_jump_host_path_is_shown(fleet, fleet_home):
    fleet.write_inventory(fleet_home, [fleet.host("node0"), fleet.host("inner0")])
    proc, report = run_cli_json(
        "hosts", "check", "--json", "--hosts", "inner0", env=env(fleet_home)
    )
    assert proc.returncode == 0, report
    assert by_name(report)["inner0"]["via"] == "node0"


def test_a_wrong_key_and_a_readable_key_are_reported_per_host(fleet, fleet_home, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    loose = tmp_path / "loose_key"
    loose.write_bytes(fleet.key.read_bytes())
    loose.chmod(0o644)
    fleet.write_inventory(
        fleet_home,
        fleet.hosts,
        node0={"identity_file": str(other)},
        node1={"identity_file": str(loose)},
    )
    proc, report = run_cli_json(
        "hosts", "check", "--json", "--hosts", "node0,node1,node2", env=env(fleet_home)
    )
    assert proc.returncode == 3
    hosts = by_name(report)
    assert (
        hosts["node0"]["error"]["kind"] == "auth"
        and str(other) in hosts["node0"]["error"]["message"]
    )
    assert hosts["node1"]["error"]["kind"] == "identity"
    assert hosts["node1"]["error"]["hint"] == f"chmod 600 {loose}"
    assert hosts["node2"]["ok"]


def test_a_changed_host_key_is_refused_until_trusted_deliberately(fleet, fleet_home):
    fleet.write_inventory(fleet_home, [fleet.host("node0")])
    assert run_cli("hosts", "check", "--json", env=env(fleet_home)).returncode == 0
    fleet.host("node0").regenerate_host_key()
    new = fleet.host("node0").host_key_fingerprint()
    proc, report = run_cli_json("hosts", "check", "--json", env=env(fleet_home))
    err = by_name(report)["node0"]["error"]
    assert proc.returncode == 3 and err["kind"] == "host_key" and new in err["message"]
    assert "--replace" in err["hint"]
    refused = run_cli("hosts", "trust", "node0", env=env(fleet_home))
    assert refused.returncode == 2 and "--replace" in refused.stderr
    wrong = run_cli(
        "hosts", "trust", "node0", "--replace", "--fingerprint", "SHA256:nope", env=env(fleet_home)
    )
    assert wrong.returncode == 3 and "nothing was trusted" in wrong.stderr
    proc, done = run_cli_json(
        "hosts", "trust", "node0", "--replace", "--fingerprint", new, "--json", env=env(fleet_home)
    )
    assert proc.returncode == 0 and done["action"] == "replace" and new in done["key"]
    assert run_cli("hosts", "check", "--json", env=env(fleet_home)).returncode == 0


def test_add_with_check_reaches_the_new_host(fleet, fleet_home):
    (fleet_home / "hosts.yaml").unlink()
    n = fleet.host("node2")
    proc, report = run_cli_json(
        "hosts",
        "add",
        "fresh",
        f"{n.user}@{n.address}",
        "-i",
        str(fleet.key),
        "--check",
        "--json",
        env=env(fleet_home),
    )
    assert proc.returncode == 0, proc.stderr
    assert report["summary"]["reachable"] == 1 and report["hosts"][0]["name"] == "fresh"


def test_host_python_runs_for_the_hosts_user_with_this_checkout(fleet, fleet_home):
    """The fixture's world-readable python (see tests/fleet_fixture.py) for later parts."""
    from megafleet.inventory import Inventory
    from megafleet.runner import SSHRunner
    from megafleet.ssh.connection import ConnectionPool

    py = fleet.host_python()
    pool = ConnectionPool(Inventory.load().jump_for)
    try:
        r = SSHRunner(Inventory.load().get("node1"), pool).run(
            f"{py} -c 'import yaml, remote_runtime.spec.config as c, megafleet; print(c.__file__)'"
        )
    finally:
        pool.close()
    assert r.ok, r.describe()
    assert r.stdout.strip().endswith("remote_runtime/spec/config.py")
