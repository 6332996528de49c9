"""Node-side building blocks of `megafleet setup` (standard library only, Python >= 3.8).

Layout on a node (paths relative to the user's home unless given absolute):
    megafleet/venv/                       the default venv (JobConfig().launch.venv)
    megafleet/bin/check_megatron_env.py   the environment check (written by setup and env check)
    megafleet/setup/setup.lock            flock()ed while a setup runs; holds the holder's pid
    megafleet/setup/state/<venv-id>.json  the marker: what each step installed, from which inputs
    megafleet/setup/logs/setup-<UTC time>-<pid>.log, latest.log -> newest
    megafleet/setup/wheels/               the project wheel uploaded by the operator
    megafleet/setup/wheelhouse/           the uploaded wheelhouse (--wheelhouse)
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import json
import os
import pwd
import re
import shlex
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

EVENT_MARK = "@@megafleet-setup "
MARKER_FORMAT = "megafleet.setup/1"
NODE_HOME = "megafleet"
SETUP_DIR = NODE_HOME + "/setup"
BIN_DIR = NODE_HOME + "/bin"
TAIL_LINES = 200  # kept per step for the failure report (the operator shows the last 30)

# Environment that must not leak into installs: it would redirect pip/uv to other indexes or
# make the venv's python load foreign code. An offline (wheelhouse) install also drops every
# PIP_*/UV_* variable and all config files.
ALWAYS_UNSET = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONSTARTUP")
ALWAYS_SET = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1"}
OFFLINE_SET = {"PIP_CONFIG_FILE": os.devnull, "UV_NO_CONFIG": "1", "UV_OFFLINE": "1"}


def emit(event: dict) -> None:
    """One progress event for the operator (stdout carries nothing else)."""
    sys.stdout.write(EVENT_MARK + json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


def expand(path: str, home: str) -> str:
    """An absolute path: `~/x` and relative paths are under `home`."""
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(home, path))


def normalize(name: str) -> str:
    """PEP 503 name: `Megatron_Core` -> `megatron-core`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return normalize(m.group(1)) if m else spec


def installed_dists(site_dirs: Sequence[str]) -> Dict[str, str]:
    """{normalized name: version} of everything installed in `site_dirs`, read from the
    dist-info directory names (no import, no subprocess: milliseconds)."""
    found: Dict[str, str] = {}
    for sp in site_dirs:
        try:
            entries = os.listdir(sp)
        except OSError:
            continue
        for entry in entries:
            for suffix in (".dist-info", ".egg-info"):
                if entry.endswith(suffix) and "-" in entry:
                    name, version = entry[: -len(suffix)].split("-", 1)
                    if suffix == ".egg-info":
                        version = version.split("-py")[0]
                    found.setdefault(normalize(name), version)
    return found


def torch_cuda(site_dirs: Sequence[str]) -> Optional[str]:
    """The CUDA version an installed torch was built for ("13.0"), None for a CPU build or no
    torch; read from torch/version.py without importing torch."""
    for sp in site_dirs:
        try:
            with open(os.path.join(sp, "torch", "version.py"), encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        return m.group(1) if m else None
    return None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_manifest(path: str) -> Dict[str, List]:
    """{file name: [size, sha256]} of the plain files directly in `path` ({} if none)."""
    out: Dict[str, List] = {}
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return out
    for name in names:
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.endswith(".mfpart"):
            out[name] = [os.path.getsize(full), sha256_file(full)]
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def venv_id(venv: str) -> str:
    """A file name for the marker of one venv: readable, unique per absolute path."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", venv).strip("-")[-40:]
    return "%s-%s" % (slug, hashlib.sha256(venv.encode()).hexdigest()[:8])


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ lock


class LockBusy(Exception):
    def __init__(self, holder: dict):
        super().__init__("another setup is running on this host")
        self.holder = holder


class SetupLock:
    """An flock() on setup.lock: the kernel releases it when the holder dies, however it dies,
    so a killed setup never leaves a stale lock. The file holds the holder's pid and start time
    for the message the next setup shows."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self, info: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockBusy(read_lock_holder(self.path))
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_lock_holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}


def lock_is_held(path: str) -> bool:
    """Whether a setup holds the lock now (read-only test: a shared lock attempt)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- marker


class Marker:
    """What each step installed and from which inputs, for one venv; rewritten atomically
    after every step, so a setup killed mid-step redoes only that step."""

    def __init__(self, path: str, venv: str):
        self.path, self.venv = path, venv
        self.data = {"format": MARKER_FORMAT, "venv": venv, "steps": {}}
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = json.load(fh)
            if loaded.get("format") == MARKER_FORMAT and loaded.get("venv") == venv:
                self.data = loaded
        except (OSError, ValueError):
            pass

    def record(self, step: str) -> Optional[dict]:
        return self.data["steps"].get(step)

    def save_step(self, step: str, record: dict) -> None:
        self.data["steps"][step] = record
        self.data["updated"] = utc_now()
        write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", 0o600)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------- log, redaction

URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@")


class Redactor:
    """Removes secrets from everything written to the log or sent back: credentials in URLs
    and the values of environment variables whose names look secret (SECRET_NAME)."""

    def __init__(self, environ: Dict[str, str], secret_name: "re.Pattern"):
        values = {v for k, v in environ.items() if secret_name.search(k) and len(v) >= 4}
        self.values = sorted(values, key=len, reverse=True)
        self.secret_name = secret_name

    def __call__(self, text: str) -> str:
        text = URL_CREDENTIALS.sub(r"\1****@", text)
        for v in self.values:
            text = text.replace(v, "****")
        return text

    def env_for_display(self, env: Dict[str, str]) -> Dict[str, str]:
        return {k: ("****" if self.secret_name.search(k) else self(v)) for k, v in env.items()}


class StepLog:
    """The run's log file (append, line-buffered) plus the tail of the current step."""

    def __init__(self, path: str, redact: Redactor):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.redact = path, redact
        self.fh = open(path, "a", encoding="utf-8", buffering=1)
        os.chmod(path, 0o600)
        self.tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        latest = os.path.join(os.path.dirname(path), "latest.log")
        try:
            if os.path.islink(latest) or os.path.exists(latest):
                os.unlink(latest)
            os.symlink(os.path.basename(path), latest)
        except OSError:
            pass

    def line(self, text: str, keep: bool = True) -> str:
        text = self.redact(text.rstrip("\n"))
        self.fh.write(text + "\n")
        if keep:
            self.tail.append(text)
        return text

    def new_step(self) -> None:
        self.tail.clear()

    def close(self) -> None:
        self.fh.close()


# -------------------------------------------------------------------------------- commands


def child_env(
    set_vars: Dict[str, str], offline: bool, base: Optional[Dict[str, str]] = None
) -> Dict[str, str]:
    """The environment of an install command: the node's own, minus what would redirect it,
    plus `set_vars`. Offline (wheelhouse) installs see no PIP_*/UV_* variable and no pip or
    uv config file (e.g. an /etc/pip.conf that adds find-links or extra index URLs)."""
    env = dict(os.environ if base is None else base)
    for key in ALWAYS_UNSET:
        env.pop(key, None)
    if offline:
        for key in [k for k in env if k.startswith(("PIP_", "UV_"))]:
            del env[key]
        env.update(OFFLINE_SET)
    env.update(ALWAYS_SET)
    env.update(set_vars)
    return env


def display_command(argv: Sequence[str], env_set: Dict[str, str], redact: Redactor) -> str:
    pairs = " ".join(
        "%s=%s" % (k, shlex.quote(v)) for k, v in redact.env_for_display(env_set).items()
    )
    return redact((pairs + " " if pairs else "") + " ".join(shlex.quote(a) for a in argv))


def run_logged(
    argv: Sequence[str],
    env: Dict[str, str],
    log: StepLog,
    on_line: Optional[Callable[[str], None]] = None,
    cwd: Optional[str] = None,
) -> int:
    """Run a command with its output (stdout and stderr together) going to the log; returns
    the exit code (negative: killed by that signal; 127: not found)."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    except OSError as exc:
        log.line("error: cannot run %s: %s" % (argv[0], exc))
        return 127
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        text = log.line(raw.decode("utf-8", "replace"))
        if on_line:
            on_line(text)
    return proc.wait()


def host_identity() -> dict:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return {
        "hostname": socket.gethostname(),
        "user": user,
        "pid": os.getpid(),
        "started": utc_now(),
    }
