"""The SSH layer: identity checks (keys), pinned host keys (known_hosts), pooled connections
(connection) and the command pump (channel). Most callers use `megafleet.runner` instead:
`SSHRunner(host, pool)` and `run_on_hosts(...)`.

Importing this package pulls in paramiko; `megafleet --help` never does.
"""

from megafleet.ssh.connection import (
    Connection,
    ConnectionPool,
    connect,
    default_pool,
    fetch_host_key,
)
from megafleet.ssh.errors import (
    AuthFailed,
    Disconnected,
    HostKeyChanged,
    HostUnreachable,
    IdentityProblem,
    SSHError,
)
from megafleet.ssh.keys import Identity, load_identity
from megafleet.ssh.known_hosts import KnownHosts, host_id

__all__ = [
    "AuthFailed",
    "Connection",
    "ConnectionPool",
    "Disconnected",
    "HostKeyChanged",
    "HostUnreachable",
    "Identity",
    "IdentityProblem",
    "KnownHosts",
    "SSHError",
    "connect",
    "default_pool",
    "fetch_host_key",
    "host_id",
    "load_identity",
]
