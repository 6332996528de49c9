"""The context of one setup request on a node: resolved paths, the installer (uv or pip), GPU
facts, and the `Command`s steps are made of (standard library only, Python >= 3.8)."""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional

from . import CHECK
from .core import (
    ALWAYS_SET,
    ALWAYS_UNSET,
    BIN_DIR,
    OFFLINE_SET,
    SETUP_DIR,
    display_command,
    expand,
    installed_dists,
    venv_id,
)


class StepError(Exception):
    """A step cannot run here (found before running anything): what and how to fix it."""

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        self.message, self.fix = message, fix


class CommandFailed(Exception):
    def __init__(self, command: "Command", exit_code: int):
        super().__init__("%s exited with %d" % (command.title or command.argv[0], exit_code))
        self.command, self.exit_code = command, exit_code


class Command:
    """One command of a step (or, with `write`, a file it writes): argv, the variables it
    sets, and whether it is an offline install (isolated from pip/uv configuration)."""

    def __init__(
        self,
        argv: List[str],
        env: Optional[Dict[str, str]] = None,
        offline: bool = False,
        title: str = "",
        write: Optional[tuple] = None,
    ):
        self.argv, self.env, self.offline = argv, env or {}, offline
        self.title, self.write = title, write

    def env_set(self) -> Dict[str, str]:
        return dict(ALWAYS_SET, **(OFFLINE_SET if self.offline else {}), **self.env)

    def env_unset(self, environ: Dict[str, str]) -> List[str]:
        gone = [k for k in ALWAYS_UNSET if k in environ]
        if self.offline:
            gone += sorted(
                k for k in environ if k.startswith(("PIP_", "UV_")) and k not in self.env_set()
            )
        return gone

    def to_dict(self, ctx: "Ctx") -> dict:
        if self.write:
            return {"title": self.title, "write": self.write[0], "content": self.write[1]}
        return {
            "title": self.title,
            "argv": [ctx.redact(a) for a in self.argv],
            "env": ctx.redact.env_for_display(self.env_set()),
            "unset": self.env_unset(ctx.environ),
            "shell": display_command(self.argv, self.env, ctx.redact),
        }


class Ctx:
    """One setup request on this node: resolved paths, the installer, GPU facts."""

    def __init__(self, req: dict, redact, environ: Optional[Dict[str, str]] = None):
        self.req, self.redact = req, redact
        self.environ = dict(os.environ if environ is None else environ)
        self.home = os.path.expanduser("~")
        self.venv = expand(req.get("venv") or "megafleet/venv", self.home)
        self.python = os.path.join(self.venv, "bin", "python")
        self.setup_dir = expand(SETUP_DIR, self.home)
        self.bin_dir = expand(BIN_DIR, self.home)
        self.check_script = os.path.join(self.bin_dir, "check_megatron_env.py")
        state = os.path.join(self.setup_dir, "state", venv_id(self.venv))
        self.marker_path, self.constraints = state + ".json", state + ".constraints.txt"
        self.wheelhouse = expand(req["wheelhouse"], self.home) if req.get("wheelhouse") else None
        self.offline = bool(self.wheelhouse)
        self.base_python = self.which(req.get("base_python") or "python3")
        self.uv = self.find_uv() if req.get("installer", "auto") != "pip" else None
        self.installer = "uv" if self.uv else "pip"
        self._smi: Optional[dict] = None
        self._versions: Dict[str, Optional[str]] = {}

    # -- facts ------------------------------------------------------------------------------
    def which(self, name: str) -> Optional[str]:
        if os.sep in name:
            path = expand(name, self.home)
            return path if os.access(path, os.X_OK) else None
        return shutil.which(name, path=self.environ.get("PATH"))

    def find_uv(self) -> Optional[str]:
        for cand in (
            self.which("uv"),
            os.path.join(self.home, ".local", "bin", "uv"),
            os.path.join(self.home, ".cargo", "bin", "uv"),
        ):
            if cand and os.access(cand, os.X_OK):
                return cand
        return None

    def python_version(self, python: Optional[str]) -> Optional[str]:
        if not python or not os.access(python, os.X_OK):
            return None
        if python not in self._versions:
            res = CHECK.run_command(
                [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], 30
            )
            self._versions[python] = res.stdout.strip() if res.ok else None
        return self._versions[python]

    def forget_versions(self) -> None:
        self._versions.clear()

    def smi(self) -> dict:
        if self._smi is None:
            self._smi = CHECK.query_nvidia_smi(30)
        return self._smi

    def has_gpu(self) -> bool:
        return bool(self.smi()["gpus"])

    def site_dirs(self) -> List[str]:
        found = CHECK.venv_site_packages(self.venv)
        if found:
            return found
        mm = CHECK.major_minor(self.python_version(self.base_python))  # the venv to be made
        return [os.path.join(self.venv, "lib", "python%d.%d" % mm, "site-packages")] if mm else []

    def dists(self) -> Dict[str, str]:
        return installed_dists(self.site_dirs())

    # -- commands ---------------------------------------------------------------------------
    def installer_argv(self, verb: str) -> List[str]:
        if self.installer == "uv":
            return [self.uv, "pip", verb, "--python", self.python]
        # Like uv, no bytecode precompiling: it is three quarters of pip's time for torch, and
        # python compiles the few modules a job imports on first use.
        return [self.python, "-m", "pip", verb] + (["--no-compile"] if verb == "install" else [])

    def install(
        self,
        packages: List[str],
        extra: tuple = (),
        env: Optional[dict] = None,
        title: str = "",
        index_url: Optional[str] = None,
        constraints: bool = True,
    ) -> Command:
        argv = self.installer_argv("install")
        if self.offline:
            argv += ["--no-index", "--find-links", self.wheelhouse]
        elif index_url:
            argv += ["--index-url", index_url]
        if constraints:
            argv += ["-c", self.constraints]
        return Command(argv + list(extra) + list(packages), env, self.offline, title)

    def constraints_command(self) -> Command:
        """Pin the installed torch for every later install: nothing may swap the CUDA build."""
        version = self.dists().get("torch")
        if version is None and self.req.get("mode") != "plan":
            # The torch step ran but left no torch in this venv's own site-packages: pip must
            # have found one elsewhere on sys.path (a .pth file or PYTHONPATH into another
            # environment). Pinning nothing would let later installs swap it silently.
            raise StepError(
                "torch is not installed in %s itself, though pip considered it "
                "installed (a .pth file or PYTHONPATH shows another environment)" % self.venv,
                "remove that .pth file / PYTHONPATH entry, or set up into a new venv "
                "with --venv PATH",
            )
        version = version or "(the version the torch step installs)"
        return Command([], title="pin torch", write=(self.constraints, "torch==%s\n" % version))

    def max_jobs(self, plan_vars: Dict[str, str]) -> str:
        return str(self.req.get("max_jobs") or plan_vars.get("MAX_JOBS") or 1)

    def build_plan(self) -> dict:
        """check_megatron_env.py's TE build plan for this venv, with MAX_JOBS as requested."""
        plan = CHECK.plan_te_build(self.site_dirs(), self.environ)
        plan["vars"]["MAX_JOBS"] = self.max_jobs(plan["vars"])
        plan["export_lines"] = CHECK.export_lines(plan["vars"])
        return plan

    def source(self) -> str:
        """Where packages come from, as a marker input."""
        if self.offline:
            return "wheelhouse:" + str(self.req.get("wheelhouse_digest"))
        return "index"
