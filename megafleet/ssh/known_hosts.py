"""megafleet's own pinned host keys: trust on first use, refuse a changed key.

The file (`megafleet.paths.known_hosts_path()`) is in OpenSSH known_hosts format, so
`ssh -o UserKnownHostsFile=...` can read it too. Entries are keyed like OpenSSH: `address` for
port 22, `[address]:port` otherwise. Several threads and processes may pin keys at once; each
pin re-reads the file under a lock and replaces it atomically.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import paramiko

from megafleet import paths

_thread_lock = threading.Lock()


def host_id(address: str, port: int) -> str:
    """The known_hosts key of a server, as OpenSSH writes it."""
    return address if port == 22 else f"[{address}]:{port}"


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class KnownHosts:
    """Pinned host keys in one known_hosts file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else paths.known_hosts_path()

    def load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            keys.load(str(self.path))
        return keys

    def lookup(self, hid: str) -> dict[str, paramiko.PKey]:
        """Pinned keys for a server, by key type (empty if none)."""
        found = self.load().lookup(hid)
        return dict(found) if found else {}

    def pin(self, hid: str, key: paramiko.PKey, replace: bool = False) -> None:
        """Record `key` for `hid`. With `replace`, drop every other key pinned for it first."""
        with self._locked():
            keys = self.load()
            while replace and hid in keys:
                del keys[hid]
            keys.add(hid, key.get_name(), key)
            self._write(keys)

    def forget(self, hid: str) -> bool:
        with self._locked():
            keys = self.load()
            if hid not in keys:
                return False
            while hid in keys:
                del keys[hid]
            self._write(keys)
            return True

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _thread_lock, open(self.path.parent / ".known_hosts.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, keys: paramiko.HostKeys) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".known_hosts-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                for entry in keys._entries:  # HostKeys.save() is not atomic; write the same lines
                    line = entry.to_line()
                    if line:
                        f.write(line)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """paramiko policy for a server with no pinned key: pin the offered key and go on.
    A server whose key differs from a pinned one never reaches this policy: paramiko raises
    BadHostKeyException, which the connection turns into HostKeyChanged."""

    def __init__(self, store: KnownHosts):
        self.store = store
        self.pinned: str | None = None  # the fingerprint pinned by the last call, if any

    def missing_host_key(self, client, hostname, key):
        self.store.pin(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.pinned = key.fingerprint
