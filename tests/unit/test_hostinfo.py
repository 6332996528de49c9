"""Parsing of the host probe, on real outputs captured on a 2xH200 machine, and the fleet
findings built from it."""

from pathlib import Path

import pytest

from megafleet import hostinfo
from megafleet.fleetcheck import exit_code, fleet_findings
from megafleet.runner import LocalRunner

H200 = Path(__file__).resolve().parent.parent / "fixtures" / "h200x2"
CAPTURE_FIELDS = (
    "index",
    "name",
    "uuid",
    "memory.total",
    "memory.used",
    "driver_version",
    "compute_cap",
    "pci.bus_id",
    "temperature.gpu",
    "utilization.gpu",
)


def traced(name: str) -> dict[str, str]:
    """{command: output} from a `set -x` capture (lines starting with '+ ')."""
    out, cmd = {}, None
    for line in (H200 / name).read_text().splitlines():
        if line.startswith("+ "):
            cmd = line[2:]
            out[cmd] = ""
        elif cmd:
            out[cmd] += line + "\n"
    return out


def query_as_probe() -> str:
    """The capture's rows cut to the columns megafleet queries, as the probe would print them."""
    idx = [CAPTURE_FIELDS.index(f) for f in hostinfo.GPU_FIELDS]
    rows = [line.split(", ") for line in (H200 / "nvidia-smi-query.csv").read_text().splitlines()]
    return "\n".join(", ".join(r[i] for i in idx) for r in rows)


def h200_probe_output() -> str:
    system = traced("system.txt")
    sections = {
        "user": "ubuntu",
        "hostname": "vm",
        "sudo": "yes",
        "os_release": system["cat /etc/os-release"],
        "uname": "Linux\n6.18.44-fc-v657-gpu\nx86_64",
        "nproc": system["nproc"],
        "meminfo": "MemTotal:       263567360 kB\nMemAvailable:   261000000 kB",
        "workdir": "/home/ubuntu/megafleet\n" + system["df -h / /tmp"].splitlines()[1],
        "python3": "/opt/torch/.venv/bin/python3\n3.12.3",
        "gpus": query_as_probe() + "\n@@rc=0",
        "nvidia_smi": "\n".join((H200 / "nvidia-smi.txt").read_text().splitlines()[:6]),
        "shm": system["df -h /dev/shm"].splitlines()[1],
        "ulimit": "nofile 20000\nmemlock unlimited",
        "ipv4": "2: enp0s5    inet 172.31.5.7/20 brd 172.31.15.255 scope global dynamic enp0s5\n"
        "3: docker0    inet 54.210.1.9/24 scope global ens6",
        "infiniband": "rdmap0s6 efa\nmlx5_0 mlx5_core",
        "end": "",
    }
    return "".join(f"\n@@mf:{k}@@\n{v}\n" for k, v in sections.items())


def test_gpu_query_of_the_capture_parses_every_field():
    gpus = hostinfo.parse_gpus((H200 / "nvidia-smi-query.csv").read_text(), CAPTURE_FIELDS)
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["name"] == "NVIDIA H200" and gpus[0]["memory.total"] == 143771
    assert gpus[1]["driver_version"] == "580.159.04" and gpus[1]["compute_cap"] == "9.0"
    assert gpus[1]["pci.bus_id"] == "00000000:00:07.0"


def test_gpu_query_with_the_wrong_field_count_is_an_error():
    with pytest.raises(ValueError, match="expected 5 fields"):
        hostinfo.parse_gpus((H200 / "nvidia-smi-query.csv").read_text())


def test_cuda_driver_version_from_the_nvidia_smi_header():
    assert hostinfo.parse_cuda_version((H200 / "nvidia-smi.txt").read_text()) == "13.0"
    assert hostinfo.parse_cuda_version("no gpu here") is None


def test_df_in_both_units():
    rows = hostinfo.parse_df(traced("system.txt")["df -h /dev/shm"])
    assert rows[0]["mount"] == "/dev/shm" and rows[0]["size_kib"] == 256 * 1024**2
    rows = hostinfo.parse_df(
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n"
        "/dev/vda 263174212 17000000 134000000 12% /\n"
    )
    assert rows[0]["avail_kib"] == 134000000


def test_the_whole_probe_of_an_h200_host():
    f = hostinfo.parse_probe(h200_probe_output())
    assert f["complete"] and f["user"] == "ubuntu" and f["sudo"] is True
    assert f["os"] == "Ubuntu 24.04.3 LTS" and f["arch"] == "x86_64" and f["cpus"] == 32
    assert f["memory_gib"] == 251.4 and f["disk_free_gib"] == 128.0 and f["shm_gib"] == 256.0
    assert f["python3"] == "3.12.3"
    assert f["gpu_status"] == "ok" and len(f["gpus"]) == 2
    assert f["gpus"][0] == {
        "index": 0,
        "name": "NVIDIA H200",
        "memory.total": 143771,
        "driver_version": "580.159.04",
        "compute_cap": "9.0",
    }
    assert f["driver_version"] == "580.159.04" and f["cuda_driver_version"] == "13.0"
    assert f["ulimit_nofile"] == 20000 and f["ulimit_memlock"] == "unlimited"
    assert f["private_ipv4"] == ["172.31.5.7"]  # 54.210.1.9 is public
    assert f["efa_devices"] == ["rdmap0s6"] and len(f["infiniband"]) == 2


def test_no_nvidia_smi_is_a_plain_none_not_an_error():
    out = h200_probe_output().replace(query_as_probe() + "\n@@rc=0", "@@absent")
    f = hostinfo.parse_probe(out)
    assert (f["gpu_status"], f["gpu_error"], f["gpus"]) == ("none", None, [])


def test_failing_nvidia_smi_is_reported_with_its_message():
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    f = hostinfo.parse_probe(
        h200_probe_output().replace(query_as_probe() + "\n@@rc=0", msg + "\n@@rc=9")
    )
    assert f["gpu_status"] == "error" and msg in f["gpu_error"]


def test_the_probe_script_runs_on_this_machine():
    """The real script, run by sh here: every section present and parseable."""
    res = LocalRunner().run("sh -s", stdin=hostinfo.probe_script("~/no/such/dir"), timeout=30)
    assert res.ok, res.describe()
    f = hostinfo.parse_probe(res.stdout)
    assert f["complete"] and f["cpus"] >= 1 and f["memory_gib"] > 0 and f["disk_free_gib"] > 0
    assert f["workdir"].endswith("/no/such/dir") and f["arch"]
    assert isinstance(f["ulimit_nofile"], int)


def row(name, gpus=(), driver="580.159.04", status=None, reachable=True, ok=True):
    g = [
        {"index": i, "name": n, "memory.total": 1, "driver_version": driver, "compute_cap": "9.0"}
        for i, n in enumerate(gpus)
    ]
    return {
        "name": name,
        "reachable": reachable,
        "ok": ok,
        "gpus": g,
        "driver_version": driver,
        "gpu_status": status or ("ok" if g else "none"),
        "gpu_error": None,
        "error": None if ok else {"kind": "unreachable", "message": "refused", "hint": None},
    }


def codes(rows):
    return {f.code: f.hosts for f in fleet_findings(rows)}


def test_a_uniform_fleet_has_no_findings():
    assert codes([row("a", ["H200"] * 8), row("b", ["H200"] * 8)]) == {}


def test_mixed_models_counts_drivers_and_a_host_without_gpus():
    found = codes(
        [
            row("a", ["NVIDIA H200"] * 8),
            row("b", ["NVIDIA H100 80GB HBM3"] * 8),
            row("c", ["NVIDIA H200"] * 4, driver="570.1"),
            row("d"),
        ]
    )
    assert found["mixed_gpu_models"] == ["a", "c", "b"]
    assert set(found["mixed_gpu_counts"]) == {"a", "b", "c"}
    assert set(found["mixed_drivers"]) == {"a", "b", "c"}
    assert found["no_gpus"] == ["d"]


def test_exit_codes_follow_the_worst_finding():
    def report(rows):
        reachable = sum(r["reachable"] for r in rows)
        return {
            "findings": [vars(f) for f in fleet_findings(rows)],
            "summary": {"unreachable": len(rows) - reachable},
        }

    assert exit_code(report([row("a", ["H200"])])) == 0
    assert exit_code(report([row("a", ["H200"]), row("b")])) == 0  # a warning only
    assert exit_code(report([row("a", status="error")])) == 1
    assert exit_code(report([row("a", ["H200"]), row("b", reachable=False, ok=False)])) == 3
