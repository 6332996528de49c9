"""`megafleet env check` over the namespace fleet: the script is uploaded to every host and run
with that host's venv python (or python3 where the venv is missing), and hosts whose packages
differ are flagged. node0 and node1 get a venv seeing the test's torch 2.13 / megatron-core
0.16.1 (bind mounts, see tests/fleet_fixture.py); node1's venv also holds a STAND-IN
megatron-core 0.15.2 that shadows the real one, like a node that drifted; node2 has no venv."""

from __future__ import annotations

import pytest

from megafleet import envcheck, ui
from tests.conftest import run_cli_json

pytestmark = pytest.mark.fleet

VENV = "envcheck-venv"
STAND_IN = """\
mkdir -p {sp}/megatron/core {sp}/megatron_core-0.15.2.dist-info
: > {sp}/megatron/__init__.py
echo '__version__ = "0.15.2"' > {sp}/megatron/core/__init__.py
printf 'Metadata-Version: 2.1\\nName: megatron-core\\nVersion: 0.15.2\\n' \\
  > {sp}/megatron_core-0.15.2.dist-info/METADATA
"""


def _make_venvs(fleet) -> None:
    python = fleet.host_python()  # also mounts the test's site-packages on every host
    (pth,) = python.parent.parent.glob("lib/python3*/site-packages/megafleet-test.pth")
    for name in ("node0", "node1"):
        h = fleet.host(name)
        h.run(
            f"rm -rf ~/{VENV} && /usr/bin/python3 -m venv --without-pip ~/{VENV} && "
            f"cp {pth} ~/{VENV}/lib/python3*/site-packages/"
        )
    sp = "$(echo ~/%s/lib/python3*/site-packages)" % VENV
    fleet.host("node1").run(STAND_IN.format(sp=sp))
    fleet.host("node2").run(f"rm -rf ~/{VENV}")


def test_one_table_across_hosts_with_the_drifted_host_flagged(
    fleet, fleet_home, capsys, monkeypatch
):
    _make_venvs(fleet)
    fleet.write_inventory(fleet_home, fleet.hosts)
    env = {"MEGAFLEET_HOME": str(fleet_home)}
    args = ("env", "check", "--venv", VENV, "--cpu-ok", "--timeout", "120")
    proc, doc = run_cli_json(*args, "--json", env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    hosts = doc["hosts"]
    assert list(hosts) == ["node0", "node1", "node2"]
    facts = {h: r["report"]["facts"] for h, r in hosts.items()}
    pythons = {h: r["report"]["host"]["python"]["executable"] for h, r in hosts.items()}
    for h in ("node0", "node1"):
        assert pythons[h] == f"/home/{fleet.host(h).user}/{VENV}/bin/python"
    assert pythons["node2"] == "/usr/bin/python3"  # no venv there yet: the system python
    assert facts["node0"]["megatron_core"] == "0.16.1" and facts["node0"]["torch"] == "2.13.0+cpu"
    assert facts["node1"]["megatron_core"] == "0.15.2" and facts["node1"]["torch"] == "2.13.0+cpu"
    assert facts["node2"]["torch"] is None
    assert hosts["node0"]["ok"] and not hosts["node1"]["ok"]
    findings = {f["key"]: f for f in doc["findings"]}
    assert findings["megatron_core"]["values"] == {
        "node0": "0.16.1",
        "node1": "0.15.2",
        "node2": "missing",
    }
    assert findings["torch"]["values"]["node2"] == "missing"
    assert findings["torch"]["severity"] == "fail"
    # the table people see, rendered from the same reports (a second fleet run costs 20 s)
    reports = [
        envcheck.HostReport(h, r["report"], r["error"], r["exit_code"]) for h, r in hosts.items()
    ]
    monkeypatch.setattr(ui.console, "width", 250)
    envcheck.render(reports, envcheck.findings_for(reports))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "check" in line and "node0" in line)
    assert "node1" in header and "node2" in header
    assert "≠ megatron_core.version" in out and "≠ torch.import" in out
    assert (
        "megatron-core not the same on all hosts: 0.16.1 on node0; 0.15.2 on node1; "
        "missing on node2" in out
    )


def test_an_unreachable_host_is_reported_beside_the_others(fleet, fleet_home):
    fleet.write_inventory(fleet_home, fleet.hosts[:2])
    fleet.host("node1").stop_sshd()
    proc, doc = run_cli_json(
        "env",
        "check",
        "--venv",
        "no-such-venv",
        "--cpu-ok",
        "--json",
        "--connect-timeout",
        "5",
        env={"MEGAFLEET_HOME": str(fleet_home)},
    )
    assert proc.returncode == 3, proc.stderr
    assert doc["hosts"]["node1"]["reached"] is False
    assert "connection refused" in doc["hosts"]["node1"]["error"]
    assert doc["hosts"]["node0"]["report"]["host"]["python"]["executable"] == "/usr/bin/python3"
