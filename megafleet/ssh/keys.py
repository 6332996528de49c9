"""The identity (private key) used to log into a host, checked before any connection is made.

OpenSSH refuses keys that others can read, and an interactive passphrase prompt would hang an
agent or CI run, so problems are found up front and explained with the exact fix:

- the file is missing, or is a public key (`.pub`);
- its permissions let group/others read it (`chmod 600 /abs/path`);
- it is passphrase-protected: the SSH agent is used if it holds the key, else `ssh-add` it;
- its type is not one paramiko supports (ed25519, ECDSA, RSA).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import paramiko

from megafleet.ssh.errors import IdentityProblem

SUPPORTED = "ed25519, ecdsa or rsa"


@dataclass
class Identity:
    """What to authenticate with. `pkey` None means: agent keys and ~/.ssh/id_* (no file given)."""

    path: str | None
    pkey: paramiko.PKey | None
    source: str  # "file" | "agent" (passphrase-protected file, key held by the agent) | "default"
    fingerprint: str | None = None

    def describe(self) -> str:
        if self.source == "default":
            return "the SSH agent's keys and ~/.ssh/id_* (no identity_file set)"
        via = " via the SSH agent" if self.source == "agent" else ""
        return f"key {self.path} ({self.fingerprint}){via}"


def candidate_keys(identity: Identity) -> list[paramiko.PKey]:
    """The keys to offer, in order: the identity's key, or (no identity_file) the agent's keys
    then the unencrypted ~/.ssh/id_ed25519, id_ecdsa and id_rsa."""
    if identity.pkey is not None:
        return [identity.pkey]
    keys: list[paramiko.PKey] = (
        list(paramiko.Agent().get_keys()) if os.environ.get("SSH_AUTH_SOCK") else []
    )
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        p = Path.home() / ".ssh" / name
        try:
            keys.append(paramiko.PKey.from_path(str(p)))
        except (
            OSError,
            TypeError,
            ValueError,
            paramiko.SSHException,
            paramiko.pkey.UnknownKeyType,
        ):
            continue  # absent, passphrase-protected (the agent covers those) or unreadable
    return keys


def fingerprint_of_blob(blob: bytes) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a public key blob."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def load_identity(path: str | None, host: str) -> Identity:
    """Check and load the identity for `host`; raise IdentityProblem with the fix if unusable."""
    if not path:
        return Identity(None, None, "default")
    p = Path(path).expanduser().absolute()
    _check_file(p, host)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography's DSA deprecation warning
            key = paramiko.PKey.from_path(str(p))
    except TypeError:  # cryptography: "password-protected" / "private key is encrypted"
        return _agent_identity(p, host)
    except paramiko.pkey.UnknownKeyType as exc:
        kind = getattr(exc.key_type, "__name__", str(exc.key_type)).replace("PrivateKey", "")
        raise IdentityProblem(
            host,
            f"identity file {p} holds a {kind} key, which is not supported",
            hint=f"use an {SUPPORTED} key, e.g.: ssh-keygen -t ed25519",
            problem="unsupported_type",
        ) from None
    except (ValueError, paramiko.SSHException) as exc:
        raise IdentityProblem(
            host,
            f"identity file {p} is not a private key megafleet can read "
            f"({str(exc).split('. ')[0]})",
            hint=f"point identity_file at an {SUPPORTED} private key in OpenSSH or PEM format",
        ) from None
    return Identity(str(p), key, "file", key.fingerprint)


def _check_file(p: Path, host: str) -> None:
    if not p.exists():
        raise IdentityProblem(
            host,
            f"identity file {p} does not exist",
            hint="fix identity_file in the inventory (megafleet hosts list)",
            problem="missing",
        )
    if not p.is_file():
        raise IdentityProblem(host, f"identity file {p} is not a file", problem="not_a_file")
    head = p.read_bytes()[:64]
    if head.startswith((b"ssh-", b"ecdsa-", b"sk-")):
        raise IdentityProblem(
            host,
            f"identity file {p} is a public key",
            hint=f"use the private key: {str(p).removesuffix('.pub')}",
            problem="public_key",
        )
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise IdentityProblem(
            host,
            f"identity file {p} has permissions {mode:04o}, which let "
            "other users read it; SSH refuses such keys",
            hint=f"chmod 600 {p}",
            problem="permissions",
        )
    if p.stat().st_uid != os.geteuid():
        raise IdentityProblem(
            host,
            f"identity file {p} belongs to another user",
            hint=f"chown {os.geteuid()} {p}",
            problem="owner",
        )


def _agent_identity(p: Path, host: str) -> Identity:
    """A passphrase-protected key is usable only through an agent that already holds it."""
    blob = public_blob(p)
    agent_keys = paramiko.Agent().get_keys() if os.environ.get("SSH_AUTH_SOCK") else ()
    for key in agent_keys:
        if blob is not None and key.asbytes() == blob:
            return Identity(str(p), key, "agent", fingerprint_of_blob(blob))
    why = (
        "no SSH agent is running (SSH_AUTH_SOCK is not set)"
        if not os.environ.get("SSH_AUTH_SOCK")
        else "the SSH agent does not hold it"
    )
    raise IdentityProblem(
        host,
        f"identity file {p} is protected by a passphrase and {why}; "
        "megafleet never prompts for passphrases",
        hint=f'eval "$(ssh-agent -s)" && ssh-add {p}' if "not set" in why else f"ssh-add {p}",
        problem="passphrase",
    )


def public_blob(p: Path) -> bytes | None:
    """The public key of a private key file: from `FILE.pub`, or from the unencrypted header of
    an OpenSSH-format private key. None if neither is available (e.g. encrypted PEM alone)."""
    pub = Path(str(p) + ".pub")
    if pub.exists():
        parts = pub.read_text().split()
        if len(parts) >= 2:
            return base64.b64decode(parts[1])
    text = p.read_text(errors="replace")
    if "BEGIN OPENSSH PRIVATE KEY" not in text:
        return None
    body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
    data = base64.b64decode(body)
    magic = b"openssh-key-v1\x00"
    if not data.startswith(magic):
        return None
    msg = paramiko.Message(data[len(magic) :])
    msg.get_string(), msg.get_string(), msg.get_string()  # cipher, kdf, kdf options
    return msg.get_binary() if msg.get_int() >= 1 else None
