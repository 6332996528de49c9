"""SSH connections: one authenticated paramiko transport per host, reused through a pool.

Rules, whatever the caller asks: no password or keyboard-interactive authentication (nothing
can ever prompt), host keys checked against megafleet's known_hosts (trust on first use, a
changed key refused), the identity file checked before connecting. A host behind a jump host
is reached through a `direct-tcpip` channel of the jump host's own pooled connection.

    pool = ConnectionPool(inventory)
    conn = pool.get(host)          # connects on first use, raises an SSHError subclass
    conn.client.exec_command(...)  # usually through megafleet.runner.SSHRunner instead
"""

from __future__ import annotations

import atexit
import errno
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paramiko

from megafleet.inventory import Host
from megafleet.ssh.errors import (
    AuthFailed,
    HostKeyChanged,
    HostUnreachable,
    IdentityProblem,
    SSHError,
)
from megafleet.ssh.keys import Identity, candidate_keys, load_identity
from megafleet.ssh.known_hosts import KnownHosts, PinOnFirstUse, describe_key

# paramiko logs a failed handshake (e.g. a port that accepts but never sends an SSH banner) with
# a traceback from its transport thread; with no handler configured, Python's last-resort
# handler prints it to the terminal. The failure reaches the caller as an SSHError anyway.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

DEFAULT_CONNECT_TIMEOUT = 10.0
CONNECT_TIMEOUT_ENV = "MEGAFLEET_CONNECT_TIMEOUT"  # seconds; the job commands' SSH connect timeout


def default_connect_timeout() -> float:
    """MEGAFLEET_CONNECT_TIMEOUT (seconds) when set, else 10: how long `status`, `logs`, `stop`
    and the other job commands wait for a node that does not answer."""
    from megafleet.errors import UsageError

    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(
            f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds above 0",
            hint=f"unset it (default {DEFAULT_CONNECT_TIMEOUT:g} s) or set e.g. "
            f"{CONNECT_TIMEOUT_ENV}=20",
        )
    return value


DEFAULT_KEEPALIVE = 15  # seconds between keepalive packets on idle connections


@dataclass
class Connection:
    """An authenticated SSH connection to one host."""

    host: Host
    client: paramiko.SSHClient
    identity: Identity
    connect_seconds: float
    host_key: str  # "type SHA256:..." of the server's key
    pinned_now: bool = False  # the host key was first seen (and pinned) by this connection
    jump: "Connection | None" = None
    _sftp: paramiko.SFTPClient | None = field(default=None, repr=False)
    sftp_available: bool | None = None  # None until has_sftp() asked the server
    sftp_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def transport(self) -> paramiko.Transport:
        return self.client.get_transport()

    def is_active(self) -> bool:
        t = self.client.get_transport()
        return bool(t and t.is_active())

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once). Hold `sftp_lock` while using it."""
        if self._sftp is None or self._sftp.sock.closed:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def has_sftp(self) -> bool:
        """Whether the server offers the SFTP subsystem (asked once). Without it, transfers
        stream over the exec channel (megafleet.ssh.streamcopy)."""
        if self.sftp_available is None:
            with self.sftp_lock:
                try:
                    self.sftp()
                    self.sftp_available = True
                except paramiko.SSHException:  # "Channel closed.": no sftp Subsystem in sshd
                    if not self.is_active():
                        raise
                    self.sftp_available = False
        return self.sftp_available

    def ping(self) -> float:
        """One SSH round trip (a global request, no process started), in seconds."""
        start = time.monotonic()
        self.transport.global_request("keepalive@openssh.com", wait=True)
        return time.monotonic() - start

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # its channel went first (e.g. with the jump host's connection)
        finally:
            self.client.close()


def connect(
    host: Host,
    *,
    jump: Connection | None = None,
    known_hosts: KnownHosts | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    keepalive: int = DEFAULT_KEEPALIVE,
) -> Connection:
    """Open and authenticate one connection (through `jump` if given). Raises SSHError."""
    identity = load_identity(host.identity_file, host.name)
    keys = candidate_keys(identity)
    if not keys:
        raise IdentityProblem(
            host.name,
            "no key to offer: no identity_file is set, the SSH agent "
            "holds no keys and there is no unencrypted ~/.ssh/id_*",
            hint=f"megafleet hosts add {host.name} ... --identity-file KEY",
            problem="no_keys",
        )
    store = known_hosts or KnownHosts()
    client = paramiko.SSHClient()
    if store.path.exists():  # only megafleet's own file; never ~/.ssh/known_hosts
        client.get_host_keys().load(str(store.path))
    policy = PinOnFirstUse(store)
    client.set_missing_host_key_policy(policy)
    start = time.monotonic()
    sock = _tunnel(host, jump, timeout) if jump else None
    try:
        client.connect(
            host.address,
            port=host.port,
            username=host.user,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=sock,
            auth_strategy=_PublicKeysOnly(host.user, keys),
        )
        if not client.get_transport().is_authenticated():
            raise AuthFailed(
                host.name,
                "the server asked for a second factor (password or "
                "keyboard-interactive) after the key; megafleet never prompts",
                hint="allow key-only login for this user (AuthenticationMethods)",
            )
    except BaseException as exc:
        client.close()
        raise _translate(exc, host, identity, store, timeout, jump) from None
    transport = client.get_transport()
    transport.set_keepalive(keepalive)
    if sock is None:
        transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return Connection(
        host,
        client,
        identity,
        time.monotonic() - start,
        describe_key(transport.get_remote_server_key()),
        pinned_now=policy.pinned is not None,
        jump=jump,
    )


class _PublicKeysOnly(paramiko.AuthStrategy):
    """Offer public keys and nothing else: no password, no keyboard-interactive, no prompt."""

    def __init__(self, user: str, keys: list[paramiko.PKey]):
        super().__init__(ssh_config=None)
        self.user, self.keys = user, keys

    def get_sources(self):
        for key in self.keys:
            yield paramiko.auth_strategy.InMemoryPrivateKey(self.user, key)


def _tunnel(host: Host, jump: Connection, timeout: float) -> paramiko.Channel:
    try:
        return jump.transport.open_channel(
            "direct-tcpip", (host.address, host.port), ("127.0.0.1", 0), timeout=timeout
        )
    except (paramiko.ChannelException, paramiko.SSHException, OSError) as exc:
        raise HostUnreachable(
            host.name,
            f"jump host {jump.host.name} could not open a connection "
            f"to {host.address}:{host.port} ({exc})",
            hint=f"check that {jump.host.name} can reach {host.address} and "
            "allows TCP forwarding (AllowTcpForwarding)",
        ) from None


def _translate(
    exc: BaseException,
    host: Host,
    identity: Identity,
    store: KnownHosts,
    timeout: float,
    jump: Connection | None,
) -> BaseException:
    """A paramiko/socket failure as an SSHError that names the host and says what to do."""
    where = f"{host.address}:{host.port}" + (f" via {jump.host.name}" if jump else "")
    if isinstance(exc, SSHError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return _changed_key(host, exc, store)
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthFailed(
            host.name,
            f"{where} refused login as {host.user!r} with {identity.describe()}",
            hint=f"add the public key to ~{host.user}/.ssh/authorized_keys on "
            f"{host.name}, or fix user/identity_file in the inventory",
        )
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {e.errno for e in exc.errors.values()}
        if errno.ECONNREFUSED in codes:
            return HostUnreachable(
                host.name,
                f"connection refused at {where} (no SSH server "
                "listening: host starting up, sshd stopped, or wrong port)",
            )
        return HostUnreachable(host.name, f"no route to {where} (host down or network unreachable)")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return HostUnreachable(
            host.name,
            f"no answer from {where} within {timeout:g}s (host down, "
            "wrong address, or a firewall dropping SSH)",
        )
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(host.name, f"cannot resolve {host.address!r} ({exc.strerror})")
    if isinstance(exc, OSError):
        return HostUnreachable(host.name, f"cannot connect to {where}: {exc.strerror or exc}")
    if isinstance(exc, paramiko.SSHException):
        return HostUnreachable(host.name, f"SSH handshake with {where} failed: {exc}")
    return exc


def _changed_key(
    host: Host, exc: paramiko.BadHostKeyException, store: KnownHosts
) -> HostKeyChanged:
    new = exc.key
    return HostKeyChanged(
        host.name,
        f"HOST KEY CHANGED for {host.address}:{host.port}: pinned {describe_key(exc.expected_key)}"
        f" in {store.path}, but the server offered {describe_key(new)}. The machine may have been"
        " rebuilt, or someone may be intercepting the connection; megafleet refused to connect",
        hint=f"if you know why it changed, check the new fingerprint out of band, then run: "
        f"megafleet hosts trust {host.name} --replace --fingerprint {new.fingerprint}",
    )


def fetch_host_key(
    host: Host, jump: Connection | None = None, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> paramiko.PKey:
    """The key a server offers, without authenticating or checking it (for `hosts trust`)."""
    sock = _tunnel(host, jump, timeout) if jump else None
    try:
        if sock is None:
            sock = socket.create_connection((host.address, host.port), timeout=timeout)
        t = paramiko.Transport(sock)
        t.banner_timeout = timeout
        try:
            t.start_client(timeout=timeout)
            return t.get_remote_server_key()
        finally:
            t.close()
    except SSHError:
        raise
    except BaseException as exc:
        raise _translate(
            exc, host, Identity(None, None, "default"), KnownHosts(), timeout, jump
        ) from None


class ConnectionPool:
    """One live connection per host, shared by every runner that uses this pool.

    `jump_for(host)` returns the Host to tunnel through (usually `Inventory.jump_for`); jump
    hosts get pooled connections of their own. Thread-safe: different hosts connect in parallel.
    """

    def __init__(
        self,
        jump_for: Callable[[Host], Host | None] | None = None,
        known_hosts: KnownHosts | None = None,
        connect_timeout: float | None = None,
        keepalive: int = DEFAULT_KEEPALIVE,
    ):
        self.jump_for = jump_for or _jump_from_spec
        self.known_hosts = known_hosts
        self.connect_timeout = (
            default_connect_timeout() if connect_timeout is None else connect_timeout
        )
        self.keepalive = keepalive
        self._conns: dict[tuple, Connection] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, host: Host, _seen: tuple[str, ...] = ()) -> Connection:
        """The pooled connection to `host`, (re)connecting if needed. Raises SSHError."""
        key = (host.name, host.user, host.address, host.port, host.jump_host, host.identity_file)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            conn = self._conns.get(key)
            if conn is not None and conn.is_active():
                return conn
            if conn is not None:
                conn.close()
            jump_host = self.jump_for(host)
            jump = None
            if jump_host is not None:
                if jump_host.name in _seen + (host.name,):
                    raise HostUnreachable(host.name, f"jump hosts loop through {jump_host.name}")
                try:
                    jump = self.get(jump_host, _seen + (host.name,))
                except SSHError as exc:
                    raise type(exc)(host.name, f"via jump host {exc}", exc.hint) from None
            conn = connect(
                host,
                jump=jump,
                known_hosts=self.known_hosts or KnownHosts(),
                timeout=self.connect_timeout,
                keepalive=self.keepalive,
            )
            self._conns[key] = conn
            return conn

    def drop(self, host: Host) -> None:
        """Close and forget the connection to `host` (if any)."""
        with self._guard:
            for key in [k for k in self._conns if k[0] == host.name]:
                self._conns.pop(key).close()

    def close(self) -> None:
        with self._guard:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()


def _jump_from_spec(host: Host) -> Host | None:
    """Without an inventory given: a jump host name is looked up in the current inventory
    file; anything else is read as `user@host:port`."""
    from megafleet.errors import MegafleetError
    from megafleet.inventory import Inventory

    if not host.jump_host:
        return None
    try:
        return Inventory.load().jump_for(host)
    except MegafleetError:
        return Inventory([], path=None).jump_for(host)


_default: ConnectionPool | None = None
_default_lock = threading.Lock()


def default_pool() -> ConnectionPool:
    """The process-wide pool (jump host names resolve through the current inventory file)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ConnectionPool()
            atexit.register(_default.close)
        return _default
