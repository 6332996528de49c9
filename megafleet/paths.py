"""Where megafleet keeps its files on the operator machine.

- Inventory: `./megafleet.yaml` in the current project if it exists (a project-local file wins),
  else `$MEGAFLEET_HOME/hosts.yaml` (default `~/.config/megafleet/hosts.yaml`).
- megafleet's own known_hosts (pinned host keys): `$MEGAFLEET_HOME/known_hosts`.
- Run records: `$MEGAFLEET_HOME/runs/<run-id>/`.

`MEGAFLEET_HOME` exists so tests (and people with several setups) can point everything
elsewhere; it is the only environment variable read for configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_INVENTORY = "megafleet.yaml"


def home() -> Path:
    env = os.environ.get("MEGAFLEET_HOME")
    base = Path(env) if env else Path.home() / ".config" / "megafleet"
    return base.expanduser()


def ensure_home() -> Path:
    h = home()
    h.mkdir(parents=True, exist_ok=True, mode=0o700)
    return h


def inventory_path(cwd: Path | None = None) -> Path:
    """The inventory file in use: project-local `megafleet.yaml` wins over the user's file."""
    local = (cwd or Path.cwd()) / PROJECT_INVENTORY
    if local.exists():
        return local
    return home() / "hosts.yaml"


def known_hosts_path() -> Path:
    return home() / "known_hosts"


def runs_dir() -> Path:
    return home() / "runs"
