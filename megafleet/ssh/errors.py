"""Why a host could not be used: each error names the host and says what to do.

All are `UnreachableError`s (exit code 3): the host could not be reached or authenticated.
`kind` is the stable machine-readable reason, also used as `Result.error`.
"""

from __future__ import annotations

from megafleet.errors import UnreachableError


class SSHError(UnreachableError):
    """A host could not be reached or logged into. `kind` says why."""

    kind = "unreachable"

    def __init__(self, host: str, message: str, hint: str | None = None):
        super().__init__(f"{host}: {message}", hint)
        self.host = host
        self.reason = message

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(kind=self.kind, host=self.host)
        return d


class HostUnreachable(SSHError):
    """No SSH server answered: refused, timed out, no route, unknown name."""

    kind = "unreachable"


class AuthFailed(SSHError):
    """The server refused our key."""

    kind = "auth"


class HostKeyChanged(SSHError):
    """The server's host key differs from the pinned one; never connected."""

    kind = "host_key"


class IdentityProblem(SSHError):
    """The identity (private key) file cannot be used. `problem` says which way: "missing",
    "not_a_file", "public_key", "permissions", "owner", "passphrase", "unsupported_type",
    "unreadable", "no_keys"."""

    kind = "identity"

    def __init__(
        self, host: str, message: str, hint: str | None = None, problem: str = "unreadable"
    ):
        super().__init__(host, message, hint)
        self.problem = problem


class Disconnected(SSHError):
    """The connection dropped while a command or transfer was running."""

    kind = "disconnected"
