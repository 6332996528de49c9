"""Paths of the files megafleet ships beside its code: the node-side environment check script,
job templates and the agent skill.

In a checkout (or an editable install) they are read from the repository (`scripts/`,
`templates/`, `SKILL.md`, `references/`); in an installed wheel from `megafleet/_bundled/`,
where pyproject.toml's force-include puts them.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent
_BUNDLED = _PACKAGE_DIR / "_bundled"

# repository path -> path inside the wheel's _bundled folder
_LAYOUT = {
    "scripts/check_megatron_env.py": "check_megatron_env.py",
    "scripts/check_megatron_env.schema.json": "check_megatron_env.schema.json",
    "templates": "templates",
    "SKILL.md": "SKILL.md",
    "references": "references",
}


def resource_path(repo_relative: str) -> Path:
    """Where a shipped file or folder is, given its path in the repository."""
    top = repo_relative.split("/")[0]
    for key, bundled in _LAYOUT.items():
        if repo_relative == key or (key == top and "/" in repo_relative):
            repo_candidate = _REPO_ROOT / repo_relative
            if repo_candidate.exists():
                return repo_candidate
            rest = repo_relative[len(key) :].lstrip("/")
            return _BUNDLED / bundled / rest if rest else _BUNDLED / bundled
    raise KeyError(f"{repo_relative} is not a shipped resource (known: {', '.join(_LAYOUT)})")


def check_script_path() -> Path:
    return resource_path("scripts/check_megatron_env.py")


def check_schema_path() -> Path:
    return resource_path("scripts/check_megatron_env.schema.json")


def templates_dir() -> Path:
    return resource_path("templates")
