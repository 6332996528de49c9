"""The SSH layer against real OpenSSH servers (the session's namespace fleet): commands, files,
timeouts, pooling, jump hosts, and every connection fault the user can meet."""

import subprocess
import time

import pytest

from megafleet.inventory import Inventory
from megafleet.runner import SSHRunner, run_on_hosts
from megafleet.ssh.connection import ConnectionPool
from megafleet.ssh.errors import AuthFailed, HostKeyChanged, HostUnreachable, IdentityProblem
from megafleet.ssh.known_hosts import KnownHosts

pytestmark = pytest.mark.fleet


@pytest.fixture
def inv(fleet_home):
    return Inventory.load()


@pytest.fixture
def pool(inv):
    p = ConnectionPool(inv.jump_for, connect_timeout=3)
    yield p
    p.close()


def test_run_returns_output_exit_code_and_runs_as_the_hosts_user(fleet, inv, pool):
    r = SSHRunner(inv.get("node1"), pool).run("id -un; echo err >&2; exit 5")
    assert (r.exit_code, r.error, r.stdout.strip(), r.stderr) == (
        5,
        "exit",
        fleet.host("node1").user,
        "err\n",
    )
    assert "node1: `id -un; echo err >&2; exit 5` exited with code 5" in r.describe()


def test_env_values_never_appear_on_the_remote_command_line(inv, pool):
    r = SSHRunner(inv.get("node0"), pool).run(
        "tr '\\0' ' ' < /proc/$$/cmdline; echo; echo \"$TOKEN|$OTHER\"",
        env={"TOKEN": "s3cr3t value", "OTHER": 'it\'s "quoted" $HOME'},
    )
    *cmdline, values = r.stdout.splitlines()
    assert r.ok and "sh" in cmdline[0] and "s3cr3t" not in "\n".join(cmdline)
    assert values == 's3cr3t value|it\'s "quoted" $HOME'


def test_stdin_and_streamed_output(inv, pool):
    lines = []
    r = SSHRunner(inv.get("node0"), pool).run(
        "cat; echo done >&2", stdin="a\nb\n", on_output=lambda s, line: lines.append((s, line))
    )
    assert r.stdout == "a\nb\n" and r.stderr == "done\n"
    assert sorted(lines) == [("stderr", "done"), ("stdout", "a"), ("stdout", "b")]


def test_a_hanging_command_is_stopped_at_the_timeout_and_killed_on_the_host(fleet, inv, pool):
    """Also when the login shell's rc file prints something first (bash reads ~/.bashrc)."""
    node = fleet.host("node2")
    bashrc = node.home / ".bashrc"
    original = bashrc.read_text()
    bashrc.write_text("echo 'login noise' >&2\n" + original)
    try:
        start = time.monotonic()
        r = SSHRunner(inv.get("node2"), pool).run(
            "echo started; sleep 600 & sleep 601", timeout=1.5
        )
    finally:
        bashrc.write_text(original)
    assert time.monotonic() - start < 6
    assert r.error == "timeout" and "killed on the host" in r.message and r.stdout == "started\n"
    assert r.stderr == "login noise\n"
    left = node.run("pgrep -u $(id -u) -f 'sleep 60[01]' || true").stdout
    assert left.strip() == "", f"remote processes survived the timeout: {left}"


def test_files_go_up_and_come_back_atomically_with_progress(inv, pool, tmp_path):
    src = tmp_path / "data"
    (src / "shard").mkdir(parents=True)
    (src / "train.jsonl").write_bytes(b'{"x": 1}\n' * 20000)
    (src / "shard" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "shard" / "run.sh").chmod(0o755)
    runner = SSHRunner(inv.get("node1"), pool)
    seen = []
    up = runner.put(src, "~/jobs/j1/data", progress=lambda d, t: seen.append((d, t)))
    assert up.ok, up.describe()
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert up.value == total and seen[-1] == (total, total)
    assert runner.run("jobs/j1/data/shard/run.sh").stdout == "hi\n"
    assert runner.run("find jobs -name '*.mfpart' | wc -l").stdout.strip() == "0"
    down = runner.get("jobs/j1", tmp_path / "back")
    assert (
        down.ok
        and (tmp_path / "back" / "data" / "train.jsonl").read_bytes()
        == (src / "train.jsonl").read_bytes()
    )
    missing = runner.get("no/such/file", tmp_path / "x")
    assert missing.error == "transfer" and not missing.ok


def test_one_connection_per_host_is_reused(inv, pool):
    runner = SSHRunner(inv.get("node0"), pool)
    runner.run("true")
    first = pool.get(inv.get("node0")).transport
    for _ in range(3):
        assert SSHRunner(inv.get("node0"), pool).run("true").ok
    assert pool.get(inv.get("node0")).transport is first


def test_a_pooled_connection_that_died_is_replaced(fleet, inv, pool):
    node = fleet.host("node0")
    runner = SSHRunner(inv.get("node0"), pool)
    assert runner.run("true").ok
    first = pool.get(inv.get("node0")).transport
    sessions = node.run(f"pgrep -u {node.user} -f 'sshd: {node.user}'", as_root=True).stdout.split()
    assert sessions
    for pid in sessions:
        node.run(f"kill -9 {pid}", as_root=True)
    r = runner.run("echo back")
    assert r.ok and r.stdout == "back\n", r.describe()
    assert pool.get(inv.get("node0")).transport is not first


def test_hosts_run_in_parallel(inv, pool):
    start = time.monotonic()
    res = run_on_hosts(inv.select(["node0", "node1", "node2"]), "sleep 1", pool=pool)
    assert all(r.ok for r in res.values()), [r.describe() for r in res.values()]
    assert time.monotonic() - start < 2.5


def test_a_host_only_reachable_through_a_jump_host(fleet, inv, pool, megafleet_home):
    inner = inv.get("inner0")
    direct = ConnectionPool(lambda h: None, connect_timeout=1.5)
    with pytest.raises(HostUnreachable):
        direct.get(inner)
    r = SSHRunner(inner, pool).run("id -un; ip -4 -o addr show eth0")
    assert r.ok and r.stdout.startswith(fleet.host("inner0").user)
    assert fleet.host("inner0").address in r.stdout
    assert pool.get(inner).jump.host.name == "node0"
    assert len(KnownHosts().lookup(fleet.host("inner0").address)) == 1  # pinned too


def test_host_keys_are_pinned_on_first_use(fleet, inv, pool):
    conn = pool.get(inv.get("node1"))
    assert conn.pinned_now
    fp = fleet.host("node1").host_key_fingerprint()
    assert conn.host_key == f"ssh-ed25519 {fp}"
    assert [k.fingerprint for k in KnownHosts().lookup(fleet.host("node1").address).values()] == [
        fp
    ]
    again = ConnectionPool(inv.jump_for).get(inv.get("node1"))
    assert not again.pinned_now
    again.close()


def test_a_changed_host_key_is_refused_with_both_fingerprints(fleet, inv):
    node = fleet.host("node2")
    ConnectionPool(inv.jump_for).get(inv.get("node2")).close()
    old = node.host_key_fingerprint()
    node.regenerate_host_key()
    new = node.host_key_fingerprint()
    with pytest.raises(HostKeyChanged) as e:
        ConnectionPool(inv.jump_for).get(inv.get("node2"))
    assert old in e.value.message and new in e.value.message and "refused" in e.value.message
    assert e.value.hint.endswith(f"megafleet hosts trust node2 --replace --fingerprint {new}")
    assert [k.fingerprint for k in KnownHosts().lookup(node.address).values()] == [old]


def test_a_stopped_sshd_is_unreachable_quickly(fleet, inv):
    fleet.host("node1").stop_sshd()
    start = time.monotonic()
    with pytest.raises(HostUnreachable, match="connection refused"):
        ConnectionPool(inv.jump_for, connect_timeout=3).get(inv.get("node1"))
    assert time.monotonic() - start < 3


def test_a_silent_host_is_unreachable_at_the_connect_timeout(fleet, inv):
    fleet.host("node2").link_down()
    start = time.monotonic()
    with pytest.raises(HostUnreachable) as e:
        ConnectionPool(inv.jump_for, connect_timeout=1.5).get(inv.get("node2"))
    assert time.monotonic() - start < 4
    assert "no answer" in e.value.message or "no route" in e.value.message


def test_a_key_the_host_does_not_accept_is_named_in_the_auth_error(fleet, inv, tmp_path):
    other = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host = fleet.host("node0").to_host(identity_file=str(other))
    with pytest.raises(AuthFailed) as e:
        ConnectionPool().get(host)
    assert str(other) in e.value.message and f"as {host.user!r}" in e.value.message
    assert "authorized_keys" in e.value.hint and e.value.exit_code == 3


def test_a_key_readable_by_others_is_refused_before_connecting(fleet, tmp_path):
    key = tmp_path / "id"
    key.write_bytes(fleet.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(IdentityProblem) as e:
        ConnectionPool().get(fleet.host("node0").to_host(identity_file=str(key)))
    assert e.value.hint == f"chmod 600 {key}"


def test_a_passphrase_key_works_through_the_agent(fleet, tmp_path, monkeypatch, megafleet_home):
    from tests.unit.test_ssh_keys import ssh_agent

    key = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", str(key)], check=True
    )
    node = fleet.host("node0")
    auth = node.home / ".ssh" / "authorized_keys"
    original = auth.read_text()
    auth.write_text(original + (tmp_path / "locked.pub").read_text())
    try:
        host = node.to_host(identity_file=str(key))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        with pytest.raises(IdentityProblem, match="passphrase"):
            ConnectionPool().get(host)
        with ssh_agent(tmp_path, monkeypatch) as add:
            add(key, "pass phrase")
            conn = ConnectionPool().get(host)
            assert conn.identity.source == "agent"
            conn.close()
    finally:
        auth.write_text(original)
