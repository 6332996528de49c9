"""A real multi-host test fleet: network namespaces joined by veth pairs to a bridge, each
running its own OpenSSH `sshd` (own config and host key, port 22 inside the namespace, PAM,
passwords and keyboard-interactive off) with its own Linux user, home and authorized key.

Fixtures (registered by tests/conftest.py through `pytest_plugins`):

- `fleet` (session): a Fleet of 3 hosts `node0..node2` on bridge subnet 10.X.Y.0/24, plus
  `inner0`, reachable only through node0 (a second, unaddressed bridge), for jump-host tests.
- `fleet_home` (per test): an empty MEGAFLEET_HOME whose hosts.yaml lists every fleet host
  (inner0 with `jump_host: node0`); every host is up again (sshd running, link up) first.

Fleet helpers: `host(name)`, `write_inventory(home, hosts, node0={"identity_file": ...})`,
`ensure_up()`, `host_python()`, `key` (the operator's private key, authorized on every host).
FleetHost helpers: `stop_sshd()`/`start_sshd()`, `link_down()`/`link_up()` (a silent host,
packets dropped), `set_sftp(False)` (an sshd without the SFTP subsystem), `run(cmd)` (a shell
in the namespace as the host's user; `as_root=True` for root), `regenerate_host_key()`,
`install_stub_nvidia_smi()` (a STUB that prints the captured outputs of tests/fixtures/h200x2;
tests using it must say so), `to_host()` (an inventory Host).

Python on the hosts: the test process's interpreter usually lives where host users cannot read
it (/root is mode 700). `fleet.host_python()` returns a venv made from a system python3 of the
same version in a world-readable directory; it sees this checkout and the test process's
site-packages (torch, megatron-core, ...) through bind mounts that exist only inside the hosts'
sshd mount namespaces (`ip netns exec` gives each its own), so nothing else on the machine
changes. Add further paths for the hosts with `FleetHost.bind_mounts[src] = dst` before
`start_sshd()`.

Outside pytest: `python -m tests.fleet_fixture check [ARGS]` builds a throwaway fleet, runs
`megafleet hosts check ARGS` against it and removes it (root, sshd and iproute2 needed).

Everything created is recorded in /run/megafleet-test-fleet/<id>.json and removed at teardown;
a later run also removes what a crashed run (its process gone) left behind. Names are unique per
run (`mft` + 5 hex digits), so several fleets can exist at once on one machine.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
REGISTRY = Path("/run/megafleet-test-fleet")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class FleetHost:
    """One host of the fleet: a network namespace running sshd for one Linux user."""

    def __init__(self, fleet: "Fleet", name: str, index: int, address: str):
        self.fleet, self.name, self.index, self.address = fleet, name, index, address
        self.tag = f"{fleet.prefix}{'h' if name.startswith('node') else 'i'}{index}"
        self.netns = self.tag
        self.user = self.tag
        self.port = 22
        self.home = Path("/home") / self.user
        self.dir = fleet.workdir / name  # sshd config, host key, log, stub bin (world-readable)
        self.bin_dir = self.dir / "bin"  # first on PATH for SSH sessions (sshd SetEnv)
        self.bind_mounts: dict[str, str] = {}
        self.jump_host: str | None = None
        self.sftp = True  # sshd offers the sftp subsystem (see set_sftp)

    # -- inventory --------------------------------------------------------------------------
    @property
    def identity_file(self) -> str:
        return str(self.fleet.key)

    def inventory_entry(self) -> dict:
        d = {
            "address": self.address,
            "user": self.user,
            "port": self.port,
            "identity_file": self.identity_file,
        }
        if self.jump_host:
            d["jump_host"] = self.jump_host
        return d

    def to_host(self, **overrides):
        from megafleet.inventory import Host

        return Host(**{"name": self.name, **self.inventory_entry(), **overrides})

    # -- commands in the namespace ------------------------------------------------------------
    def run(
        self, cmd: str, as_root: bool = False, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run `cmd` with /bin/sh in this host's namespace (as its user unless as_root)."""
        prefix = (
            []
            if as_root
            else [
                "setpriv",
                f"--reuid={self.user}",
                f"--regid={self.user}",
                "--init-groups",
                "env",
                f"HOME={self.home}",
                f"USER={self.user}",
                f"PATH={self.bin_dir}:{HOST_PATH}",
            ]
        )
        return sh(
            "ip",
            "netns",
            "exec",
            self.netns,
            *prefix,
            "/bin/sh",
            "-c",
            cmd,
            check=check,
            timeout=timeout,
            cwd="/",
        )

    # -- sshd ---------------------------------------------------------------------------------
    def sshd_pid(self) -> int | None:
        try:
            pid = int((self.dir / "sshd.pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start_sshd(self) -> None:
        if self.sshd_pid():
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        mounts = "".join(
            f"mkdir -p {dst} && mount --bind {src} {dst} && "
            for src, dst in self.bind_mounts.items()
        )
        sh(
            "ip",
            "netns",
            "exec",
            self.netns,
            "/bin/sh",
            "-c",
            f"{mounts}exec {SSHD} -f {self.dir}/sshd_config -E {self.dir}/sshd.log",
        )
        self._wait_for(lambda: self.sshd_pid() is not None, "sshd to write its pid file")

    def stop_sshd(self) -> None:
        pid = self.sshd_pid()
        if pid:
            os.kill(pid, 15)
            self._wait_for(lambda: self.sshd_pid() is None, "sshd to stop")
        (self.dir / "sshd.pid").unlink(missing_ok=True)

    def link_down(self) -> None:
        """A silent host: its interface goes down, packets to it vanish (no refusal)."""
        self.run("ip link set eth0 down", as_root=True)

    def link_up(self) -> None:
        self.run("ip link set eth0 up", as_root=True)

    def set_sftp(self, enabled: bool) -> None:
        """A minimal or hardened sshd: without the `Subsystem sftp` line (sshd restarted)."""
        if enabled == self.sftp:
            return
        self.sftp = enabled
        self.fleet._write_sshd_config(self)
        self.stop_sshd()
        self.start_sshd()

    def regenerate_host_key(self) -> None:
        """A rebuilt machine: a new host key, sshd restarted."""
        key = self.dir / "ssh_host_ed25519_key"
        key.unlink(missing_ok=True)
        Path(str(key) + ".pub").unlink(missing_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.stop_sshd()
        self.start_sshd()

    def host_key_fingerprint(self) -> str:
        out = sh("ssh-keygen", "-l", "-f", str(self.dir / "ssh_host_ed25519_key.pub")).stdout
        return out.split()[1]

    def install_stub_nvidia_smi(
        self, fixture_dir: Path = FIXTURES / "h200x2", delay: float = 0.0
    ) -> Path:
        """Put a STUB `nvidia-smi` first on this host's PATH. It is not a GPU: it prints the
        outputs captured on a real 2xH200 machine (plain, -L, and --query-gpu for any field
        list that the capture holds), after sleeping `delay` seconds (a slow host)."""
        fields = [
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
        ]
        cases = "\n".join(f"    {f}) echo {i + 1} ;;" for i, f in enumerate(fields))
        stub = f"""#!/bin/sh
# STUB nvidia-smi for megafleet tests: replays {fixture_dir.name} captures, no GPU involved.
D={fixture_dir}
{f"sleep {delay}" if delay else ""}
col() {{
  case "$1" in
{cases}
    *) echo "Field \\"$1\\" is not a valid field to query." >&2; exit 2 ;;
  esac
}}
case "$1" in
  "") cat "$D/nvidia-smi.txt" ;;
  -L) cat "$D/nvidia-smi-L.txt" ;;
  --query-gpu=*)
    cols=""
    for f in $(echo "${{1#--query-gpu=}}" | tr ',' ' '); do
      c=$(col "$f") || exit 2; cols="$cols $c"
    done
    awk -F', ' -v cols="$cols" 'BEGIN {{ n = split(cols, c, " ") }}
      {{ line = ""; for (i = 1; i <= n; i++) line = line (i > 1 ? ", " : "") $c[i]
         print line }}' \\
      "$D/nvidia-smi-query.csv" ;;
  *) echo "stub nvidia-smi: unsupported arguments: $*" >&2; exit 2 ;;
esac
"""
        path = self.bin_dir / "nvidia-smi"
        path.write_text(stub)
        path.chmod(0o755)
        return path

    def remove_stub_nvidia_smi(self) -> None:
        (self.bin_dir / "nvidia-smi").unlink(missing_ok=True)

    def _wait_for(self, cond, what: str, timeout: float = 10) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                log = (
                    (self.dir / "sshd.log").read_text() if (self.dir / "sshd.log").exists() else ""
                )
                raise RuntimeError(f"{self.name}: timed out waiting for {what}\n{log[-2000:]}")
            time.sleep(0.02)


class Fleet:
    """`size` hosts on one bridge (reachable from the test process), plus `hidden` hosts on a
    second bridge that only the first host also joins (reachable only through it)."""

    def __init__(self, size: int = 3, hidden: int = 1):
        self.id = secrets.token_hex(3)[:5]
        self.prefix = f"mft{self.id}"
        self.workdir = Path(f"/tmp/{self.prefix}")
        self.key = self.workdir / "operator" / "id_ed25519"
        self.bridge, self.hidden_bridge = f"{self.prefix}br", f"{self.prefix}bh"
        self.size, self.hidden_count = size, hidden
        self.record: dict = {
            "owner": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "netns": [],
            "links": [],
            "users": [],
            "workdir": str(self.workdir),
        }
        self.hosts: list[FleetHost] = []
        self.hidden: list[FleetHost] = []
        self._python: Path | None = None

    @property
    def all_hosts(self) -> list[FleetHost]:
        return self.hosts + self.hidden

    def host(self, name: str) -> FleetHost:
        return next(h for h in self.all_hosts if h.name == name)

    # -- building -----------------------------------------------------------------------------
    def build(self) -> "Fleet":
        REGISTRY.mkdir(mode=0o755, exist_ok=True)
        with _registry_lock():
            clean_stale()
            subnet, hidden_subnet = _free_subnets(2)
            self.record["subnets"] = [str(subnet), str(hidden_subnet)]
            self._save_record()
        try:
            self._build(subnet, hidden_subnet)
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self, subnet, hidden_subnet) -> None:
        self.workdir.mkdir(mode=0o755)
        (self.workdir / "operator").mkdir(mode=0o700)
        sh(
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            f"{self.prefix}-operator",
            "-f",
            str(self.key),
        )
        gw = subnet.network_address + 1
        self._link(self.bridge, "ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{gw}/{subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        if self.hidden_count:  # no address in this namespace: the test process cannot reach it
            self._link(
                self.hidden_bridge, "ip", "link", "add", self.hidden_bridge, "type", "bridge"
            )
            sh("ip", "link", "set", self.hidden_bridge, "up")
        for i in range(self.size):
            h = FleetHost(self, f"node{i}", i, str(subnet.network_address + 10 + i))
            self._make_namespace(h, self.bridge, "eth0", f"{h.address}/{subnet.prefixlen}", gw)
            self.hosts.append(h)
        for i in range(self.hidden_count):
            h = FleetHost(self, f"inner{i}", i, str(hidden_subnet.network_address + 10 + i))
            self._make_namespace(h, self.hidden_bridge, "eth0", f"{h.address}/24", None)
            h.jump_host = self.hosts[0].name
            self.hidden.append(h)
        if self.hidden_count:
            bastion = self.hosts[0]
            self._veth(
                bastion, self.hidden_bridge, "eth1", f"{hidden_subnet.network_address + 1}/24"
            )
        for h in self.all_hosts:
            self._make_user(h)
            self._write_sshd(h)
            h.start_sshd()

    def _link(self, name: str, *cmd: str) -> None:
        self.record["links"].append(name)
        self._save_record()
        sh(*cmd)

    def _make_namespace(self, h: FleetHost, bridge: str, ifname: str, cidr: str, gw) -> None:
        self.record["netns"].append(h.netns)
        self._save_record()
        sh("ip", "netns", "add", h.netns)
        sh("ip", "netns", "exec", h.netns, "ip", "link", "set", "lo", "up")
        self._veth(h, bridge, ifname, cidr)
        if gw is not None:
            sh("ip", "netns", "exec", h.netns, "ip", "route", "add", "default", "via", str(gw))

    def _veth(self, h: FleetHost, bridge: str, ifname: str, cidr: str) -> None:
        outer = f"{h.tag}{ifname[-1]}"  # e.g. mft1a2b3h00: <= 15 characters
        self._link(
            outer,
            "ip",
            "link",
            "add",
            outer,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            h.netns,
        )
        sh("ip", "link", "set", outer, "master", bridge, "up")
        sh("ip", "netns", "exec", h.netns, "ip", "addr", "add", cidr, "dev", ifname)
        sh("ip", "netns", "exec", h.netns, "ip", "link", "set", ifname, "up")

    def _make_user(self, h: FleetHost) -> None:
        self.record["users"].append(h.user)
        self._save_record()
        sh("useradd", "--create-home", "--shell", "/bin/bash", "--user-group", h.user)
        sh("usermod", "-p", "*", h.user)  # useradd's account is locked; sshd without PAM refuses it
        ssh_dir = h.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(Path(str(self.key) + ".pub").read_text())
        auth.chmod(0o600)
        sh("chown", "-R", f"{h.user}:{h.user}", str(ssh_dir))

    def _write_sshd(self, h: FleetHost) -> None:
        h.bin_dir.mkdir(parents=True, mode=0o755)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(h.dir / "ssh_host_ed25519_key"))
        self._write_sshd_config(h)

    def _write_sshd_config(self, h: FleetHost) -> None:
        (h.dir / "sshd_config").write_text(f"""\
# sshd of megafleet test host {h.name} ({h.netns})
Port 22
ListenAddress 0.0.0.0
HostKey {h.dir}/ssh_host_ed25519_key
PidFile {h.dir}/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowUsers {h.user}
StrictModes yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
MaxStartups 100
MaxSessions 50
LogLevel VERBOSE
{"Subsystem sftp internal-sftp" if h.sftp else "# no sftp subsystem (set_sftp(False))"}
SetEnv PATH={h.bin_dir}:{HOST_PATH}
""")

    def _save_record(self) -> None:
        path = REGISTRY / f"{self.prefix}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(path)

    # -- using --------------------------------------------------------------------------------
    def ensure_up(self) -> None:
        """Undo what tests did to hosts: links up, sshd running with SFTP, no stub nvidia-smi."""
        for h in self.all_hosts:
            h.set_sftp(True)
            if "state UP" not in h.run("ip link show eth0", as_root=True).stdout:
                h.link_up()
            h.start_sshd()
            h.remove_stub_nvidia_smi()

    def write_inventory(
        self, home: Path, hosts: list[FleetHost] | None = None, **changes: dict
    ) -> Path:
        """Write `home`/hosts.yaml for `hosts` (default: all); `node0={"port": 2}` changes
        fields."""
        hosts = self.all_hosts if hosts is None else hosts
        path = Path(home) / "hosts.yaml"
        entries = {h.name: {**h.inventory_entry(), **changes.get(h.name, {})} for h in hosts}
        path.write_text(yaml.safe_dump({"hosts": entries}, sort_keys=False))
        path.chmod(0o600)
        return path

    def host_python(self) -> Path:
        """A python3 that every fleet user can run, seeing this checkout and the test
        process's site-packages (see the module docstring). Restarts sshd on first use."""
        if self._python:
            return self._python
        base = _world_python()
        if base is None:
            pytest.skip(
                f"no world-readable python{sys.version_info[0]}.{sys.version_info[1]} "
                "for the fleet users (install python3 of the test's version in /usr/bin)"
            )
        root = self.workdir / "python"
        mnt_site, mnt_repo = root / "mnt" / "site-packages", root / "mnt" / "repo"
        sh(base, "-m", "venv", "--without-pip", str(root / "venv"))
        site = sh(
            str(root / "venv" / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ).stdout.strip()
        Path(site, "megafleet-test.pth").write_text(f"{mnt_repo}\n{mnt_site}\n")
        for h in self.all_hosts:
            h.bind_mounts[sysconfig.get_paths()["purelib"]] = str(mnt_site)
            h.bind_mounts[str(REPO_ROOT)] = str(mnt_repo)
            h.stop_sshd()
            h.start_sshd()
        self._python = root / "venv" / "bin" / "python"
        return self._python

    # -- teardown -----------------------------------------------------------------------------
    def teardown(self) -> None:
        remove_recorded(self.record)
        (REGISTRY / f"{self.prefix}.json").unlink(missing_ok=True)


def _world_python() -> str | None:
    """A python of the test's version that other users can execute."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in (
        os.path.realpath(sys._base_executable),
        f"/usr/bin/python{want}",
        "/usr/bin/python3",
        f"/usr/local/bin/python{want}",
    ):
        if not os.path.exists(cand) or not _world_reachable(Path(cand)):
            continue
        out = subprocess.run(
            [cand, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if out.stdout.strip() == want:
            return cand
    return None


def _world_reachable(p: Path) -> bool:
    return all(os.stat(d).st_mode & 0o001 for d in list(p.resolve().parents)) and bool(
        os.stat(p.resolve()).st_mode & 0o005
    )


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


class _registry_lock:
    def __enter__(self):
        self.f = open(REGISTRY / ".lock", "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _free_subnets(n: int) -> list[ipaddress.IPv4Network]:
    """/24s in 10.64.0.0/10 that no interface, route or other fleet uses."""
    used = set()
    for rec in REGISTRY.glob("*.json"):
        try:
            used |= set(json.loads(rec.read_text()).get("subnets", []))
        except (OSError, ValueError):
            continue
    routes = sh("ip", "-4", "route", "show", "table", "all").stdout
    nets = [
        ipaddress.ip_network(w, strict=False) for w in routes.split() if "/" in w and w[0].isdigit()
    ]
    out: list[ipaddress.IPv4Network] = []
    while len(out) < n:
        cand = ipaddress.ip_network(f"10.{random.randint(64, 127)}.{random.randint(0, 255)}.0/24")
        if str(cand) in used or cand in out or any(cand.overlaps(x) for x in nets):
            continue
        out.append(cand)
    return out


def remove_recorded(rec: dict) -> None:
    """Remove everything a fleet record lists: processes, namespaces, links, users, files."""
    for ns in rec.get("netns", []):
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (OSError, ValueError):
                pass
    for user in rec.get("users", []):
        pids = sh("pgrep", "-u", user, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (OSError, ValueError):
                pass
    time.sleep(0.05 if rec.get("netns") else 0)
    for ns in rec.get("netns", []):
        sh("ip", "netns", "delete", ns, check=False)
    for link in reversed(rec.get("links", [])):
        if sh("ip", "link", "show", link, check=False).returncode == 0:
            sh("ip", "link", "delete", link, check=False)
    for user in rec.get("users", []):
        # not `userdel --remove`: its home may hold venvs with torch (the setup test), and
        # deleting those under sh()'s 30 s timeout failed the session's teardown on a loaded
        # machine; rmtree below removes the home without a limit
        sh("userdel", user, check=False)
        shutil.rmtree(Path("/home") / user, ignore_errors=True)
        shutil.rmtree(Path("/tmp") / f"torchinductor_{user}", ignore_errors=True)  # torch's cache
    if rec.get("workdir", "").startswith("/tmp/mft"):
        shutil.rmtree(rec["workdir"], ignore_errors=True)


def clean_stale() -> None:
    """Remove fleets whose test process is gone (a crashed or killed earlier run)."""
    for path in REGISTRY.glob("mft*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(rec.get("owner", -1)) == rec.get("owner_start") and rec.get("owner_start"):
            continue  # its test process is still running
        remove_recorded(rec)
        path.unlink(missing_ok=True)


# -- pytest fixtures --------------------------------------------------------------------------


def pytest_collection_modifyitems(items):
    """A test that uses the fleet is a `fleet` test (skipped, or failed in CI, without root,
    sshd or iproute2: see tests/conftest.py), marked or not."""
    for item in items:
        if {"fleet", "fleet_home"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fleet)


@pytest.fixture(scope="session")
def fleet():
    """The session's test fleet: node0..node2 reachable, inner0 only through node0."""
    f = Fleet(size=3, hidden=1).build()
    try:
        yield f
    finally:
        f.teardown()


@pytest.fixture
def fleet_home(fleet, megafleet_home):
    """MEGAFLEET_HOME with an inventory of every fleet host (and no pinned host keys yet)."""
    fleet.ensure_up()
    fleet.write_inventory(megafleet_home)
    return megafleet_home


def main(argv: list[str]) -> int:
    """`python -m tests.fleet_fixture check [ARGS]`: build a throwaway 3-host fleet (plus one
    host behind a jump host), run `megafleet hosts check ARGS` against it, tear it down.
    Needs root, sshd and iproute2 (`./dev run python -m tests.fleet_fixture check`)."""
    import tempfile

    if argv[:1] != ["check"]:
        print(main.__doc__)
        return 2
    from tests.conftest import _fleet_missing

    reason = _fleet_missing()
    if reason:
        print(f"cannot build a test fleet: {reason}", file=sys.stderr)
        return 2
    f = Fleet(size=3, hidden=1).build()
    try:
        with tempfile.TemporaryDirectory(prefix="megafleet-home-") as home:
            f.write_inventory(Path(home))
            env = dict(
                os.environ,
                MEGAFLEET_HOME=home,
                PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            )
            return subprocess.run(
                [sys.executable, "-m", "megafleet", "hosts", "check", *argv[1:]], env=env, cwd=home
            ).returncode
    finally:
        f.teardown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
