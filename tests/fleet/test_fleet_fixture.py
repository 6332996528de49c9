"""The test fleet itself: hosts see each other, and a crashed run's leftovers are removed."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, cli_env
from tests.fleet_fixture import REGISTRY, _registry_lock, clean_stale

pytestmark = pytest.mark.fleet


def test_hosts_reach_each_other_and_run_as_their_own_users(fleet):
    a, b = fleet.host("node0"), fleet.host("node2")
    assert a.run("id -un").stdout.strip() == a.user != b.user
    probe = f"exec 3<>/dev/tcp/{b.address}/22 && head -c 4 <&3"
    assert a.run(f"bash -c '{probe}'").stdout == "SSH-"
    assert (
        fleet.host("inner0")
        .run(f"bash -c 'exec 3<>/dev/tcp/{a.address}/22'", check=False, timeout=10)
        .returncode
        != 0
    )  # inner0 only sees node0's eth1


def test_a_crashed_runs_fleet_is_removed_by_the_next_run(fleet):
    code = (
        "import sys, os; sys.path.insert(0, '.')\n"
        "from tests.fleet_fixture import Fleet\n"
        "f = Fleet(size=1, hidden=0).build()\n"
        "print(f.prefix, f.hosts[0].netns, f.hosts[0].user, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=cli_env(),
    )
    prefix, netns, user = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)  # no teardown runs
    proc.wait()
    record = json.loads((REGISTRY / f"{prefix}.json").read_text())
    assert netns in record["netns"] and user in record["users"]
    assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    time.sleep(0.1)
    with _registry_lock():
        clean_stale()
    assert not (REGISTRY / f"{prefix}.json").exists()
    assert (
        netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert subprocess.run(["id", user], capture_output=True).returncode != 0
    assert (
        subprocess.run(["ip", "link", "show", f"{prefix}br"], capture_output=True).returncode != 0
    )
    # the session's own fleet is alive: its owner (this process) is still running
    assert (REGISTRY / f"{fleet.prefix}.json").exists()
