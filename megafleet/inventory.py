"""The host inventory: which machines megafleet may use and how to reach them over SSH.

Stored as human-editable YAML (see `megafleet.paths.inventory_path`: a project-local
`./megafleet.yaml` wins over `$MEGAFLEET_HOME/hosts.yaml`):

    hosts:
      gpu1:
        address: 203.0.113.7          # required: IP or DNS name the operator connects to
        user: ubuntu                  # default: the local user name
        port: 22
        identity_file: ~/.ssh/id_ed25519   # relative paths are relative to this file
        private_address: 10.0.1.7     # how the nodes reach each other (optional)
        jump_host: bastion            # another host's name, or user@host:port (optional)
        tags: {role: trainer}

Loading validates every host and reports every problem at once, each naming the file line,
the host and the field. Saving rewrites the file atomically with mode 0600.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from megafleet import paths
from megafleet.errors import FieldProblem, UsageError, ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
ADDRESS_RE = re.compile(r"^[A-Za-z0-9._:%-]+$")  # DNS name, IPv4, IPv6 (no brackets)
FIELDS = ("address", "user", "port", "identity_file", "private_address", "jump_host", "tags")

HEADER = """\
# megafleet host inventory (edit freely; `megafleet hosts add|remove` rewrite this file and
# drop comments). Per host: address (required), user, port (22), identity_file (relative paths
# are relative to this file), private_address (how nodes reach each other), jump_host (another
# host's name or user@host:port), tags (key: value). Check with: megafleet hosts check
"""


@dataclass
class Host:
    """One machine reachable over SSH. `identity_file` is absolute (or None: SSH agent and
    ~/.ssh/id_* keys); `jump_host` is another inventory host's name or `user@host:port`."""

    name: str
    address: str
    user: str = field(default_factory=getpass.getuser)
    port: int = 22
    identity_file: str | None = None
    private_address: str | None = None
    jump_host: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """`user@address:port`, for messages."""
        return f"{self.user}@{self.address}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"address": self.address, "user": self.user, "port": self.port}
        for key in ("identity_file", "private_address", "jump_host"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.tags:
            d["tags"] = dict(self.tags)
        return d

    def validate(self) -> list[FieldProblem]:
        """Field problems of this host, named `hosts.NAME.FIELD` (no file line: see load)."""
        return [
            FieldProblem(f"hosts.{self.name}.{f}" if f else f"hosts.{self.name}", m)
            for f, m in _host_problems(self)
        ]


def parse_target(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]address[:port]` -> (user, address, port); IPv6 needs brackets with a port."""
    user, _, rest = spec.rpartition("@")
    port = None
    m = re.fullmatch(r"\[(.+)\](?::(\d+))?", rest)
    if m:
        rest, port = m.group(1), m.group(2)
    elif rest.count(":") == 1:
        rest, port = rest.split(":")
    if port is not None and not str(port).isdigit():
        raise ValueError(f"port {port!r} in {spec!r} is not a number")
    return (user or None), rest, (int(port) if port is not None else None)


def _host_problems(h: Host) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not NAME_RE.match(h.name or ""):
        out.append(("", "host names use letters, digits, '.', '_' and '-' (at most 63)"))
    if not isinstance(h.address, str) or not ADDRESS_RE.match(h.address):
        out.append(("address", f"{h.address!r} is not a host name or IP address"))
    if not isinstance(h.user, str) or not USER_RE.match(h.user):
        out.append(("user", f"{h.user!r} is not a valid user name"))
    if isinstance(h.port, bool) or not isinstance(h.port, int) or not 1 <= h.port <= 65535:
        out.append(("port", f"{h.port!r} must be a whole number from 1 to 65535"))
    if h.private_address is not None and (
        not isinstance(h.private_address, str) or not ADDRESS_RE.match(h.private_address)
    ):
        out.append(("private_address", f"{h.private_address!r} is not a host name or IP address"))
    if h.identity_file is not None and not isinstance(h.identity_file, str):
        out.append(("identity_file", "must be a file path"))
    if h.jump_host is not None:
        if not isinstance(h.jump_host, str) or not h.jump_host:
            out.append(("jump_host", "must be a host name from the inventory or user@host:port"))
        elif h.jump_host == h.name:
            out.append(("jump_host", "a host cannot be its own jump host"))
    if not isinstance(h.tags, dict) or not all(isinstance(v, str) for v in h.tags.values()):
        out.append(("tags", "must be a mapping of names to plain values"))
    return out


class Inventory:
    """The hosts of one inventory file. Build with `Inventory.load()`; change with `add` and
    `remove`, then `save()`."""

    def __init__(self, hosts: Iterable[Host] = (), path: Path | None = None):
        self.path = Path(path) if path else paths.inventory_path()
        self.hosts: dict[str, Host] = {h.name: h for h in hosts}

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None) -> "Inventory":
        """Read and validate the inventory; a missing file is an empty inventory."""
        from remote_runtime.spec.yamlio import YamlSyntaxError, load_with_lines

        p = Path(path) if path else paths.inventory_path()
        if not p.exists():
            return cls(path=p)
        try:
            data, lines = load_with_lines(p)
        except YamlSyntaxError as exc:
            raise ValidationError(
                [FieldProblem("(yaml)", str(exc).split(": ", 1)[-1], str(p), exc.line)],
                hint="fix the YAML syntax on that line (indentation, colons, quotes)",
            )
        duplicates = _duplicate_hosts(p)
        if duplicates:
            raise ValidationError(
                duplicates,
                hint=f"keep one entry per name in {p} (YAML keeps only the last one silently)",
            )
        return cls(_hosts_from_data(data, lines, p), path=p)

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self):
        return iter(self.hosts.values())

    def names(self) -> list[str]:
        return list(self.hosts)

    def get(self, name: str) -> Host:
        if name not in self.hosts:
            raise UsageError(f"no host named {name!r} in {self.path}", hint=self._known_hint())
        return self.hosts[name]

    def select(self, names: Iterable[str] | None = None) -> list[Host]:
        """The hosts named (all of them when `names` is None), in the order given."""
        if names is None:
            return list(self.hosts.values())
        wanted = [n.strip() for n in names if n.strip()]
        unknown = [n for n in wanted if n not in self.hosts]
        if unknown:
            raise UsageError(
                f"unknown host(s): {', '.join(unknown)} (inventory {self.path})",
                hint=self._known_hint(),
            )
        return [self.hosts[n] for n in dict.fromkeys(wanted)]

    def jump_for(self, host: Host) -> Host | None:
        """The Host to tunnel through for `host`, or None. A jump host that is not an inventory
        name is parsed as `[user@]host[:port]` and uses `host`'s identity file."""
        spec = host.jump_host
        if not spec:
            return None
        if spec in self.hosts:
            return self.hosts[spec]
        user, address, port = parse_target(spec)
        return Host(
            name=spec,
            address=address,
            user=user or host.user,
            port=port or 22,
            identity_file=host.identity_file,
        )

    def _known_hint(self) -> str:
        if not self.hosts:
            return "the inventory is empty; add one with: megafleet hosts add NAME USER@ADDRESS"
        return f"known hosts: {', '.join(self.hosts)} (megafleet hosts list)"

    # -- changing ----------------------------------------------------------------------------
    def add(self, host: Host, replace: bool = False) -> None:
        problems = host.validate() + self._jump_problems(host)
        if problems:
            raise ValidationError(problems)
        if host.name in self.hosts and not replace:
            raise UsageError(
                f"host {host.name!r} is already in {self.path}",
                hint=f"use --replace to overwrite it, or megafleet hosts remove {host.name}",
            )
        self.hosts[host.name] = host

    def remove(self, name: str) -> Host:
        self.get(name)  # an unknown name is an error naming the inventory file
        users = [h.name for h in self.hosts.values() if h.jump_host == name]
        if users:
            raise UsageError(
                f"host {name!r} is the jump host of {', '.join(users)}",
                hint="remove or change those hosts first",
            )
        return self.hosts.pop(name)

    def _jump_problems(self, host: Host) -> list[FieldProblem]:
        seen, cur = {host.name}, host
        while cur.jump_host and cur.jump_host in {**self.hosts, host.name: host}:
            nxt = host if cur.jump_host == host.name else self.hosts[cur.jump_host]
            if nxt.name in seen:
                return [
                    FieldProblem(
                        f"hosts.{host.name}.jump_host",
                        f"jump hosts form a loop through {nxt.name!r}",
                    )
                ]
            seen.add(nxt.name)
            cur = nxt
        return []

    def save(self) -> Path:
        """Write the inventory atomically (temp file + rename), mode 0600."""
        body = yaml.safe_dump(
            {"hosts": {h.name: h.to_dict() for h in self.hosts.values()}},
            sort_keys=False,
            default_flow_style=False,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hosts-", suffix=".yaml", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(HEADER + body)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path


def _duplicate_hosts(path: Path) -> list[FieldProblem]:
    """Host names given twice under `hosts:` (PyYAML would keep the last one without a word)."""
    root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return []
    hosts = next((v for k, v in root.value if k.value == "hosts"), None)
    if not isinstance(hosts, yaml.MappingNode):
        return []
    seen: dict[str, list[int]] = {}
    for key, _ in hosts.value:
        seen.setdefault(str(key.value), []).append(key.start_mark.line + 1)
    return [
        FieldProblem(
            f"hosts.{name}",
            f"defined {len(at)} times (lines {', '.join(map(str, at))})",
            str(path),
            at[-1],
        )
        for name, at in seen.items()
        if len(at) > 1
    ]


def _hosts_from_data(data: Any, lines: dict[str, int], path: Path) -> list[Host]:
    src = str(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValidationError(
            [FieldProblem("(top level)", "must be a mapping with a `hosts:` key", src, 1)]
        )
    problems = [
        FieldProblem(k, "unknown top-level key (expected `hosts`)", src, lines.get(k))
        for k in data
        if k != "hosts"
    ]
    raw = data.get("hosts") or {}
    if not isinstance(raw, dict):
        problems.append(
            FieldProblem("hosts", "must map host names to their settings", src, lines.get("hosts"))
        )
        raise ValidationError(problems)
    hosts = []
    for name, entry in raw.items():
        host, host_problems = _host_from_entry(str(name), entry, lines, path)
        problems += host_problems
        if host:
            hosts.append(host)
    inv = Inventory(hosts, path=path)
    for h in hosts:
        for p in inv._jump_problems(h):
            p.source, p.line = src, lines.get(f"hosts.{h.name}.jump_host")
            problems.append(p)
    if problems:
        raise ValidationError(problems, hint=f"edit {src} or use megafleet hosts add --replace")
    return hosts


def _host_from_entry(name: str, entry: Any, lines: dict[str, int], path: Path):
    src, key = str(path), f"hosts.{name}"
    if not isinstance(entry, dict):
        return None, [
            FieldProblem(key, "must be a mapping (address, user, port, ...)", src, lines.get(key))
        ]
    problems = [
        FieldProblem(
            f"{key}.{k}",
            f"unknown field (known: {', '.join(FIELDS)})",
            src,
            lines.get(f"{key}.{k}"),
        )
        for k in entry
        if k not in FIELDS
    ]
    if "address" not in entry:
        problems.append(FieldProblem(f"{key}.address", "is required", src, lines.get(key)))
    tags = entry.get("tags") or {}
    if isinstance(tags, dict):
        tags = {
            str(k): (str(v) if isinstance(v, (str, int, float, bool)) else v)
            for k, v in tags.items()
        }
    identity = entry.get("identity_file")
    if isinstance(identity, str) and identity:
        identity = str((path.parent / Path(identity).expanduser()).resolve())
    host = Host(
        name=name,
        address=entry.get("address", ""),
        user=entry.get("user") or getpass.getuser(),
        port=entry.get("port", 22),
        identity_file=identity or None,
        private_address=entry.get("private_address"),
        jump_host=entry.get("jump_host"),
        tags=tags,
    )
    for fname, msg in _host_problems(host):
        if fname == "address" and "address" not in entry:
            continue
        dotted = f"{key}.{fname}" if fname else key
        problems.append(FieldProblem(dotted, msg, src, lines.get(dotted, lines.get(key))))
    return host, problems
