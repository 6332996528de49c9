"""Transfers on any sshd and stricter trust, on the namespace fleet: node2's sshd runs without
the SFTP subsystem (as minimal and hardened images do), files still move (streamed over the exec
channel, resumable, with login-script noise on stdout), `hosts check` says so and what to
enable; a replaced host key needs its fingerprint, hosts sharing a key are flagged, and
`hosts add --check` writes nothing when the check fails."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from megafleet.inventory import Inventory
from megafleet.runner import SSHRunner
from megafleet.ssh.connection import ConnectionPool
from tests.conftest import run_cli, run_cli_json

pytestmark = pytest.mark.fleet


def env(home):
    return {"MEGAFLEET_HOME": str(home)}


@pytest.fixture
def no_sftp(fleet, fleet_home):
    """node2 without SFTP, and a login script that prints to stdout before every command."""
    node = fleet.host("node2")
    node.set_sftp(False)
    bashrc = node.home / ".bashrc"
    original = bashrc.read_text()
    bashrc.write_text("echo 'login noise on stdout'\n" + original)
    pool = ConnectionPool(Inventory.load().jump_for, connect_timeout=5)
    yield SSHRunner(Inventory.load().get("node2"), pool)
    pool.close()
    bashrc.write_text(original)
    node.set_sftp(True)


def test_files_move_over_the_exec_channel_where_sshd_has_no_sftp(no_sftp, fleet, tmp_path):
    runner = no_sftp
    assert runner.connection().has_sftp() is False
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(3 << 20))
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "sub" / "run.sh").chmod(0o750)
    seen = []
    put = runner.put(tree, "~/copied", progress=lambda done, total: seen.append((done, total)))
    assert put.ok, put.describe()
    assert put.value == seen[-1][0] == seen[-1][1] == (3 << 20) + 18
    got = runner.get("copied", tmp_path / "back")
    assert got.ok, got.describe()
    assert (tmp_path / "back" / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    assert stat.S_IMODE((tmp_path / "back" / "sub" / "run.sh").stat().st_mode) == 0o750
    assert not list((tmp_path / "back").rglob("*.mfpart"))

    # resume: a part left by an interrupted upload holds the first MiB; only the rest moves
    data = (tree / "a.bin").read_bytes()
    assert runner.run("cat > resumed.bin.mfpart", stdin=data[: 1 << 20]).ok
    res = runner.put_from(tree / "a.bin", "resumed.bin", offset=1 << 20)
    assert res.ok and res.value == 2 << 20, res.describe()
    there = runner.run("sha256sum resumed.bin").stdout.split()[-2]  # after the login noise
    assert there == hashlib.sha256(data).hexdigest()
    part = tmp_path / "down.bin.mfpart"
    part.write_bytes(data[: 1 << 20])
    res = runner.get_from("resumed.bin", tmp_path / "down.bin", offset=1 << 20)
    assert res.ok and res.value == 2 << 20 and (tmp_path / "down.bin").read_bytes() == data

    missing = runner.get("no/such/file", tmp_path / "x")
    assert missing.error == "transfer" and "No such file" in missing.message
    assert missing.hint and "check the path" in missing.hint


def test_hosts_check_says_which_host_lacks_sftp_and_what_to_enable(no_sftp, fleet, fleet_home):
    fleet.write_inventory(fleet_home, fleet.hosts)
    proc, report = run_cli_json("hosts", "check", "--json", env=env(fleet_home))
    assert proc.returncode == 0, proc.stderr
    rows = {h["name"]: h for h in report["hosts"]}
    assert rows["node2"]["sftp"] is False and rows["node0"]["sftp"] is True
    (finding,) = [f for f in report["findings"] if f["code"] == "no_sftp"]
    assert finding["hosts"] == ["node2"] and "Subsystem sftp internal-sftp" in finding["message"]


def test_env_check_runs_on_a_host_without_sftp(no_sftp, fleet, fleet_home):
    fleet.write_inventory(fleet_home, [fleet.host("node2")])
    proc, doc = run_cli_json(
        "env", "check", "--cpu-ok", "--json", "--timeout", "120", env=env(fleet_home), timeout=300
    )
    report = doc["hosts"]["node2"]
    assert report["report"], report
    assert report["report"]["host"]["python"]["executable"], proc.stderr
    assert report.get("error") is None, report


def test_hosts_sharing_a_host_key_are_a_finding(fleet, fleet_home):
    n = fleet.host("node1")
    fleet.write_inventory(fleet_home, [n])
    assert (
        run_cli(
            "hosts",
            "add",
            "node1-again",
            f"{n.user}@{n.address}",
            "-i",
            str(fleet.key),
            env=env(fleet_home),
        ).returncode
        == 0
    )
    proc, report = run_cli_json("hosts", "check", "--json", env=env(fleet_home))
    (finding,) = [f for f in report["findings"] if f["code"] == "shared_host_key"]
    assert finding["level"] == "warning" and finding["hosts"] == ["node1", "node1-again"]
    assert "listed twice" in finding["message"]


def test_add_with_a_failing_check_writes_nothing(fleet, fleet_home):
    n = fleet.host("node2")
    before = (fleet_home / "hosts.yaml").read_text()
    proc = run_cli(
        "hosts",
        "add",
        "wrong-user",
        f"nobody@{n.address}",
        "-i",
        str(fleet.key),
        "--check",
        env=env(fleet_home),
    )
    assert proc.returncode == 3 and "not added" in proc.stderr
    assert (fleet_home / "hosts.yaml").read_text() == before
    assert not (fleet_home / "known_hosts").exists()  # nor its host key pinned


def test_replacing_a_host_key_needs_its_fingerprint_not_just_yes(fleet, fleet_home):
    node = fleet.host("node1")
    fleet.write_inventory(fleet_home, [node])
    assert run_cli("hosts", "check", "--json", env=env(fleet_home)).returncode == 0
    node.regenerate_host_key()
    new = node.host_key_fingerprint()
    proc = run_cli("hosts", "trust", "node1", "--replace", "--yes", env=env(fleet_home))
    assert proc.returncode == 2 and "needs --fingerprint" in proc.stderr
    assert f"--fingerprint {new}" in " ".join(proc.stderr.split())
    assert run_cli("hosts", "check", "--json", env=env(fleet_home)).returncode == 3  # still refused
    proc = run_cli(
        "hosts", "trust", "node1", "--replace", "--fingerprint", new, env=env(fleet_home)
    )
    assert proc.returncode == 0, proc.stderr
