"""What a host is made of, gathered by one shell script in one SSH round trip, and the pure
functions that parse its output (tested on real captures in tests/fixtures/h200x2/).

The script prints sections, each starting with a `@@mf:NAME@@` line; every probe tolerates a
missing tool, so a bare machine yields a report, not an error. "No GPU" is a fact (`gpu_status`
"none"), not a failure; only an nvidia-smi that exists and fails is an error.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

GPU_FIELDS = ("index", "name", "memory.total", "driver_version", "compute_cap")
SECTION = re.compile(r"^@@mf:([a-z0-9_]+)@@$", re.M)
DEFAULT_WORKDIR = "~/megafleet"

_SCRIPT = r"""
s() { printf '\n@@mf:%s@@\n' "$1"; }
W={workdir}
s user; id -un
s hostname; hostname 2>/dev/null || cat /proc/sys/kernel/hostname
s sudo
if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo yes; else echo no; fi
s os_release; cat /etc/os-release 2>/dev/null
s uname; uname -s; uname -r; uname -m
s nproc; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN
s meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo
s workdir
d="$W"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; echo "$W"; df -Pk "$d" | tail -n 1
s python3; command -v python3 && python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'
s gpus
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu={fields} --format=csv,noheader,nounits 2>&1; echo "@@rc=$?"
else echo "@@absent"; fi
s nvidia_smi; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi 2>/dev/null | head -n 6
s shm; df -Pk /dev/shm 2>/dev/null | tail -n 1
s ulimit; echo "nofile $(ulimit -n)"; echo "memlock $(ulimit -l)"
s ipv4; ip -4 -o addr show scope global 2>/dev/null || hostname -I 2>/dev/null
s infiniband
for d in /sys/class/infiniband/*; do
  [ -e "$d" ] || continue
  echo "$(basename "$d") $(basename "$(readlink -f "$d/device/driver")")"
done
s end
"""


def probe_script(workdir: str = DEFAULT_WORKDIR) -> str:
    """The POSIX sh script (run with `sh -s`) that prints every section parsed below."""
    wd = '"$HOME"/' + shlex.quote(workdir[2:]) if workdir.startswith("~/") else shlex.quote(workdir)
    return _SCRIPT.replace("{workdir}", wd).replace("{fields}", ",".join(GPU_FIELDS))


def split_sections(text: str) -> dict[str, str]:
    """{section name: its text} from the script's output."""
    parts = SECTION.split(text)
    return {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """{'MemTotal': KiB, 'MemAvailable': KiB}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


_UNITS = {"": 1, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3, "P": 1024**4}


def _kib(value: str) -> int | None:
    """A df size: plain KiB (`df -k`) or human (`df -h`: 252G, 1.5T)."""
    m = re.fullmatch(r"([\d.]+)([KMGTP]?)i?B?", value.strip())
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def parse_df(text: str) -> list[dict]:
    """Rows of `df -P -k` (or `df -h`): filesystem, size/used/avail in KiB, mount point."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or cols[0] == "Filesystem" or _kib(cols[1]) is None:
            continue
        rows.append(
            {
                "filesystem": cols[0],
                "size_kib": _kib(cols[1]),
                "used_kib": _kib(cols[2]),
                "avail_kib": _kib(cols[3]),
                "mount": " ".join(cols[5:]),
            }
        )
    return rows


def parse_gpus(text: str, fields: tuple[str, ...] = GPU_FIELDS) -> list[dict]:
    """`nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits` -> one dict per GPU.
    Numbers become ints/floats; "[N/A]" and similar become None."""
    gpus = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != len(fields):
            raise ValueError(f"nvidia-smi printed {line!r}, expected {len(fields)} fields")
        gpus.append({f: _number(c, f) for f, c in zip(fields, cols)})
    return gpus


def _number(value: str, field: str):
    if value.startswith("[") or value in ("N/A", ""):
        return None
    if field in ("name", "driver_version", "uuid", "pci.bus_id", "compute_cap"):
        return value
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def parse_cuda_version(nvidia_smi_text: str) -> str | None:
    """The CUDA version the driver supports, from plain `nvidia-smi`'s header."""
    m = re.search(r"CUDA Version:\s*([\d.]+)", nvidia_smi_text)
    return m.group(1) if m else None


def parse_ulimits(text: str) -> dict[str, int | str]:
    """{'nofile': 1024, 'memlock': 'unlimited' or KiB} from the script's ulimit lines."""
    out: dict[str, int | str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        if key and value:
            out[key] = int(value) if value.isdigit() else value
    return out


def parse_ipv4(text: str) -> list[str]:
    """Private (RFC 1918 / shared) IPv4 addresses from `ip -4 -o addr` or `hostname -I`."""
    found = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)", text) or re.findall(
        r"\b(\d+\.\d+\.\d+\.\d+)\b", text
    )
    out = []
    for a in found:
        ip = ipaddress.ip_address(a)
        if (
            (ip.is_private or ip in ipaddress.ip_network("100.64.0.0/10"))
            and not ip.is_loopback
            and not ip.is_link_local
            and a not in out
        ):
            out.append(a)
    return out


def parse_infiniband(text: str) -> list[dict]:
    """`DEVICE DRIVER` lines -> [{'device', 'driver', 'efa'}] (AWS EFA devices use driver efa)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts:
            driver = parts[1] if len(parts) > 1 else None
            out.append({"device": parts[0], "driver": driver, "efa": driver == "efa"})
    return out


def parse_probe(text: str) -> dict:
    """Everything the probe script printed, as a flat dict of facts (see HostFacts keys in
    megafleet.fleetcheck). Missing sections give None."""
    s = split_sections(text)
    osr = parse_os_release(s.get("os_release", ""))
    uname = s.get("uname", "").splitlines() + [None, None, None]
    mem = parse_meminfo(s.get("meminfo", ""))
    work_lines = s.get("workdir", "").splitlines()
    work_df = parse_df("\n".join(work_lines[1:]))
    shm_df = parse_df(s.get("shm", ""))
    py = s.get("python3", "").splitlines()
    facts = {
        "user": s.get("user", "").strip() or None,
        "hostname": s.get("hostname", "").strip() or None,
        "sudo": s.get("sudo", "").strip() == "yes",
        "os": osr.get("PRETTY_NAME") or osr.get("NAME") or uname[0],
        "os_id": osr.get("ID"),
        "os_version": osr.get("VERSION_ID"),
        "kernel": uname[1],
        "arch": uname[2],
        "cpus": int(s["nproc"]) if s.get("nproc", "").strip().isdigit() else None,
        "memory_gib": _gib(mem.get("MemTotal")),
        "memory_available_gib": _gib(mem.get("MemAvailable")),
        "workdir": work_lines[0] if work_lines else None,
        "disk_free_gib": _gib(work_df[0]["avail_kib"]) if work_df else None,
        "python3": py[1].strip() if len(py) > 1 else None,
        "python3_path": py[0].strip() if py else None,
        "shm_gib": _gib(shm_df[0]["size_kib"]) if shm_df else None,
        "private_ipv4": parse_ipv4(s.get("ipv4", "")),
    }
    facts.update(_gpu_facts(s.get("gpus", ""), s.get("nvidia_smi", "")))
    limits = parse_ulimits(s.get("ulimit", ""))
    facts["ulimit_nofile"], facts["ulimit_memlock"] = limits.get("nofile"), limits.get("memlock")
    ib = parse_infiniband(s.get("infiniband", ""))
    facts["infiniband"] = ib
    facts["efa_devices"] = [d["device"] for d in ib if d["efa"]]
    facts["complete"] = "end" in s
    return facts


def _gpu_facts(gpu_text: str, smi_text: str) -> dict:
    lines = gpu_text.strip().splitlines()
    if not lines or lines[-1] == "@@absent":
        return {
            "gpu_status": "none",
            "gpu_error": None,
            "gpus": [],
            "driver_version": None,
            "cuda_driver_version": None,
        }
    rc = lines[-1].removeprefix("@@rc=")
    body = "\n".join(lines[:-1])
    if rc != "0":
        return {
            "gpu_status": "error",
            "gpu_error": body.strip()[-500:] or f"exit code {rc}",
            "gpus": [],
            "driver_version": None,
            "cuda_driver_version": None,
        }
    try:
        gpus = parse_gpus(body)
    except ValueError as exc:
        return {
            "gpu_status": "error",
            "gpu_error": str(exc),
            "gpus": [],
            "driver_version": None,
            "cuda_driver_version": None,
        }
    drivers = sorted({str(g["driver_version"]) for g in gpus if g["driver_version"]})
    return {
        "gpu_status": "ok" if gpus else "none",
        "gpu_error": None,
        "gpus": gpus,
        "driver_version": ", ".join(drivers) or None,
        "cuda_driver_version": parse_cuda_version(smi_text),
    }


def _gib(kib: int | None) -> float | None:
    return round(kib / 1024**2, 1) if kib is not None else None
