"""The steps of `megafleet setup` on one node (standard library only, Python >= 3.8).

Each step says which inputs it depends on (`inputs`), whether what it installed earlier is
still there (`verify`), the exact commands it would run now (`commands`) and what it left
installed (`outcome`). The agent skips a step when the marker holds the same inputs (plus the
outcomes of the steps before it) and `verify` finds nothing missing.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional

from . import CHECK
from .context import Command, CommandFailed, Ctx, StepError
from .core import (
    OFFLINE_SET,
    StepLog,
    child_env,
    display_command,
    expand,
    requirement_name,
    run_logged,
    torch_cuda,
    write_atomic,
)

MIN_PYTHON = (3, 10)
TE_BUILD_HELPERS = ["cmake", "ninja", "pybind11", "setuptools", "wheel", "packaging"]
FLASH_BUILD_HELPERS = ["ninja", "packaging", "psutil", "einops", "setuptools", "wheel"]
APEX_BUILD_HELPERS = ["ninja", "packaging", "setuptools", "wheel"]
PYTORCH_INDEX = "https://download.pytorch.org/whl/%s"


class Step:
    id = ""
    title = ""
    flag: Optional[str] = None  # the request key that selects an optional step

    def selected(self, ctx: Ctx) -> bool:
        return self.flag is None or bool(ctx.req.get(self.flag))

    def inputs(self, ctx: Ctx) -> dict:
        return {"source": ctx.source()}

    def verify(self, ctx: Ctx, outcome: dict) -> Optional[str]:
        """Why the recorded outcome no longer holds (None: it does)."""
        dists = ctx.dists()
        for name, version in outcome.get("dists", {}).items():
            if dists.get(name) != version:
                return "%s %s was recorded, now %s" % (name, version, dists.get(name) or "absent")
        return None

    def commands(self, ctx: Ctx) -> List[Command]:
        return []

    def outcome(self, ctx: Ctx) -> dict:
        return {}

    def nothing_to_do(self, ctx: Ctx) -> str:
        """Why running this step changes nothing (its commands are empty)."""
        return "nothing to install"

    def run(self, ctx: Ctx, log: StepLog, on_line: Callable[[str], None]) -> dict:
        commands = self.commands(ctx)
        if not commands:
            log.line(self.nothing_to_do(ctx))
        for cmd in commands:
            if cmd.write:
                log.line("$ write %s: %s" % (cmd.write[0], cmd.write[1].strip()))
                write_atomic(cmd.write[0], cmd.write[1])
                continue
            shown = dict(OFFLINE_SET, **cmd.env) if cmd.offline else cmd.env
            log.line("$ " + display_command(cmd.argv, shown, ctx.redact))
            code = run_logged(cmd.argv, child_env(cmd.env, cmd.offline, ctx.environ), log, on_line)
            if code != 0:
                raise CommandFailed(cmd, code)
        ctx.forget_versions()
        return self.outcome(ctx)

    def detail(self, outcome: dict) -> str:
        return ", ".join("%s %s" % kv for kv in sorted(outcome.get("dists", {}).items()))


def dists_of(ctx: Ctx, names: List[str]) -> dict:
    have = ctx.dists()
    return {"dists": {n: have[n] for n in names if n in have}}


class VenvStep(Step):
    id, title = "venv", "virtual environment"

    def inputs(self, ctx):
        return {"venv": ctx.venv}

    def verify(self, ctx, outcome):
        version = ctx.python_version(ctx.python)
        if version is None:
            return "no working python in %s" % ctx.venv
        if version != outcome.get("python"):
            return "its python is %s, %s was recorded" % (version, outcome.get("python"))
        if ctx.installer == "pip" and not _has_pip(ctx):
            return "the venv has no pip"
        return None

    def commands(self, ctx):
        if ctx.req.get("installer") == "uv" and not ctx.uv:
            raise StepError(
                "uv was asked for but is not on this node",
                "install uv with your package manager or `pip install --user uv`, "
                "or run setup with --installer pip",
            )
        if ctx.python_version(ctx.python):  # an existing venv is used as it is
            if ctx.installer == "pip" and not _has_pip(ctx):
                return [Command([ctx.python, "-m", "ensurepip", "--upgrade"], title="add pip")]
            return []
        base = ctx.base_python
        version = ctx.python_version(base)
        if not version:
            raise StepError(
                "no usable %s on this node" % (ctx.req.get("base_python") or "python3"),
                "install Python >= 3.10 (e.g. apt-get install python3 python3-venv) "
                "or pass --base-python /path/to/python3",
            )
        if CHECK.release_tuple(version)[:2] < MIN_PYTHON:
            raise StepError(
                "%s is Python %s; megatron-core needs >= %d.%d" % ((base, version) + MIN_PYTHON),
                "pass --base-python with a Python >= 3.10 (python3.12 works)",
            )
        if ctx.installer == "uv":
            return [
                Command(
                    [ctx.uv, "venv", "--python", base, ctx.venv],
                    {"UV_PYTHON_DOWNLOADS": "never"},
                    ctx.offline,
                    "create venv (uv)",
                )
            ]
        return [Command([base, "-m", "venv", ctx.venv], title="create venv")]

    def nothing_to_do(self, ctx):
        return "uses the existing venv (Python %s)" % ctx.python_version(ctx.python)

    def outcome(self, ctx):
        return {"python": ctx.python_version(ctx.python), "venv": ctx.venv}

    def detail(self, outcome):
        return "Python %s at %s" % (outcome.get("python"), outcome.get("venv"))


def _has_pip(ctx: Ctx) -> bool:
    return any(os.path.isdir(os.path.join(sp, "pip")) for sp in ctx.site_dirs())


class TorchStep(Step):
    id, title = "torch", "torch"

    def target(self, ctx) -> dict:
        smi = ctx.smi()
        max_cuda = smi["driver_cuda"] or CHECK.driver_max_cuda(smi["driver"])
        tag = ctx.req.get("torch_index")
        if not tag:
            tag = CHECK.torch_index_for_cuda(max_cuda) if smi["gpus"] else "cpu"
        if smi["gpus"] and not tag:
            raise StepError(
                "NVIDIA driver %s is too old for any CUDA build of torch" % smi["driver"],
                "upgrade the NVIDIA driver (>= 525 for CUDA 12)",
            )
        return {
            "gpu": bool(smi["gpus"]),
            "driver": smi["driver"],
            "max_cuda": max_cuda,
            "index": None if ctx.offline else tag,
        }

    def inputs(self, ctx):
        return dict(self.target(ctx), spec=ctx.req["torch_spec"], source=ctx.source())

    def verify(self, ctx, outcome):
        have = ctx.dists().get("torch")
        return None if have == outcome.get("torch") else "torch is now %s" % (have or "absent")

    def compatible(self, ctx, version: Optional[str], cuda: Optional[str]) -> Optional[str]:
        """Why an installed torch cannot stay (None: keep it)."""
        spec = ctx.req["torch_spec"][len(requirement_name(ctx.req["torch_spec"])) :].strip()
        if version is None:
            return "no torch yet"
        if spec and not CHECK.version_satisfies(version, spec):
            return "torch %s does not meet %s" % (version, spec)
        if not ctx.has_gpu():
            return None
        if not cuda:
            return "torch %s is a CPU build and this host has GPUs" % version
        smi = ctx.smi()
        status, why = CHECK.cuda_driver_compat(smi["driver"], cuda, smi["driver_cuda"])
        return None if status in ("pass", "warn") else why

    def commands(self, ctx):
        target = self.target(ctx)
        installed = ctx.dists().get("torch")
        if self.compatible(ctx, installed, torch_cuda(ctx.site_dirs())) is None:
            return []  # keep the compatible torch already there
        cmds = []
        if installed:
            cmds.append(
                Command(
                    ctx.installer_argv("uninstall")
                    + ([] if ctx.installer == "uv" else ["-y"])
                    + ["torch"],
                    title="remove incompatible torch %s" % installed,
                )
            )
        index = (
            None
            if ctx.offline
            else (target["index"] if "://" in target["index"] else PYTORCH_INDEX % target["index"])
        )
        cmds.append(
            ctx.install(
                [ctx.req["torch_spec"]], title="install torch", index_url=index, constraints=False
            )
        )
        return cmds

    def nothing_to_do(self, ctx):
        cuda = torch_cuda(ctx.site_dirs())
        return "keeps the installed torch %s (%s), compatible with this host" % (
            ctx.dists().get("torch"),
            "CUDA " + cuda if cuda else "CPU build",
        )

    def outcome(self, ctx):
        return {"torch": ctx.dists().get("torch"), "cuda": torch_cuda(ctx.site_dirs())}

    def detail(self, outcome):
        return "torch %s (%s)" % (
            outcome.get("torch"),
            "CUDA " + outcome["cuda"] if outcome.get("cuda") else "CPU",
        )


class PackagesStep(Step):
    id, title = "packages", "megatron-core, transformers, ..."

    def inputs(self, ctx):
        return {"requirements": ctx.req["requirements"], "source": ctx.source()}

    def commands(self, ctx):
        return [
            ctx.constraints_command(),
            ctx.install(list(ctx.req["requirements"]), title="install runtime packages"),
        ]

    def outcome(self, ctx):
        return dists_of(ctx, [requirement_name(r) for r in ctx.req["requirements"]])


class ProjectStep(Step):
    id, title = "project", "megafleet runtime"

    def wheel(self, ctx) -> str:
        return expand(ctx.req["project_wheel"]["path"], ctx.home)

    def inputs(self, ctx):
        return {"sha256": ctx.req["project_wheel"]["sha256"]}

    def commands(self, ctx):
        flags = ("--no-deps", "--reinstall" if ctx.installer == "uv" else "--force-reinstall")
        return [
            ctx.install(
                [self.wheel(ctx)],
                flags,
                title="install the operator's megafleet",
                constraints=False,
            )
        ]

    def outcome(self, ctx):
        return dict(dists_of(ctx, ["megafleet"]), sha256=ctx.req["project_wheel"]["sha256"])

    def detail(self, outcome):
        return "megafleet %s (wheel %s)" % (
            outcome.get("dists", {}).get("megafleet"),
            outcome.get("sha256", "")[:12],
        )


class TEStep(Step):
    id, title, flag = "te", "transformer-engine", "with_te"

    def inputs(self, ctx):
        return {
            "spec": ctx.req["te_spec"],
            "source": ctx.source(),
            "max_jobs": ctx.req.get("max_jobs"),
        }

    def commands(self, ctx):
        cuda = torch_cuda(ctx.site_dirs())
        if not cuda:
            raise StepError(
                "transformer-engine needs a CUDA build of torch; this venv has %s"
                % ("CPU torch" if ctx.dists().get("torch") else "no torch"),
                "run setup on a host with an NVIDIA GPU (torch then comes from the "
                "CUDA index), or leave out --with-te",
            )
        plan = ctx.build_plan()
        if plan["missing"]:
            raise StepError(
                "cannot build transformer-engine: missing " + ", ".join(plan["missing"]),
                missing_fix(ctx, plan["missing"], cuda),
            )
        spec = ctx.req["te_spec"].replace("{cuda_major}", cuda.split(".")[0])
        return [
            ctx.constraints_command(),
            ctx.install(TE_BUILD_HELPERS, title="install build tools"),
            ctx.install(
                [spec],
                ("--no-build-isolation", "-v"),
                plan["vars"],
                title="build transformer-engine",
            ),
        ]

    def outcome(self, ctx):
        have = ctx.dists()
        return {"dists": {n: v for n, v in have.items() if n.startswith("transformer-engine")}}


def missing_fix(ctx: Ctx, missing: List[str], cuda: str) -> str:
    tag = "cu%s" % cuda.split(".")[0]
    pip = "%s -m pip install" % ctx.python
    lines = []
    for what in missing:
        if what == "cudnn.h":
            lines.append(
                "%s nvidia-cudnn-%s   # cudnn.h: <site-packages>/nvidia/cudnn/include" % (pip, tag)
            )
        elif what == "nccl.h":
            lines.append(
                "%s nvidia-nccl-%s    # nccl.h: <site-packages>/nvidia/nccl/include" % (pip, tag)
            )
        elif what == "nvcc":
            lines.append(
                "install the CUDA %s toolkit (nvcc), e.g. apt-get install "
                "cuda-toolkit-%s, and set CUDA_HOME=/usr/local/cuda-%s"
                % (cuda, cuda.replace(".", "-"), cuda)
            )
    return "\n".join(lines)


class ApexStep(Step):
    id, title, flag = "apex", "apex (CUDA extensions)", "with_apex"

    def inputs(self, ctx):
        return {
            "source": ctx.source() if ctx.offline else ctx.req["apex_source"],
            "max_jobs": ctx.req.get("max_jobs"),
        }

    def commands(self, ctx):
        plan = ctx.build_plan()
        cuda = torch_cuda(ctx.site_dirs())
        if not cuda or "nvcc" in plan["missing"]:
            raise StepError(
                "apex's CUDA extensions need a CUDA torch and nvcc",
                missing_fix(ctx, ["nvcc"], cuda or "12.8"),
            )
        jobs = plan["vars"]["MAX_JOBS"]
        env = {k: v for k, v in plan["vars"].items() if k != "NVTE_FRAMEWORK"}
        env.update({"APEX_CPP_EXT": "1", "APEX_CUDA_EXT": "1", "APEX_PARALLEL_BUILD": jobs})
        source = "apex" if ctx.offline else ctx.req["apex_source"]
        return [
            ctx.constraints_command(),
            ctx.install(APEX_BUILD_HELPERS, title="install build tools"),
            ctx.install([source], ("--no-build-isolation", "-v"), env, title="build apex"),
        ]

    def outcome(self, ctx):
        return dists_of(ctx, ["apex"])


class FlashAttnStep(Step):
    id, title, flag = "flash_attn", "flash-attn", "with_flash_attn"

    def spec(self, ctx) -> str:
        package_dir = next(
            (
                os.path.join(sp, "transformer_engine")
                for sp in ctx.site_dirs()
                if os.path.isdir(os.path.join(sp, "transformer_engine"))
            ),
            None,
        )
        limits = CHECK.te_flash_attn_limits(package_dir) if package_dir else {}
        caps = [g.get("compute_cap") or "0.0" for g in ctx.smi()["gpus"]]
        return "flash-attn" + CHECK.flash_attn_spec(limits, caps)

    def inputs(self, ctx):
        return {"source": ctx.source(), "max_jobs": ctx.req.get("max_jobs")}

    def commands(self, ctx):
        plan = ctx.build_plan()
        if "nvcc" in plan["missing"]:
            raise StepError(
                "flash-attn builds need nvcc",
                missing_fix(ctx, ["nvcc"], torch_cuda(ctx.site_dirs()) or "12.8"),
            )
        env = {k: v for k, v in plan["vars"].items() if k != "NVTE_FRAMEWORK"}
        return [
            ctx.constraints_command(),
            ctx.install(FLASH_BUILD_HELPERS, title="install build tools"),
            ctx.install(
                [self.spec(ctx)],
                ("--no-build-isolation", "-v"),
                env,
                title="install flash-attn (newest that transformer-engine accepts)",
            ),
        ]

    def outcome(self, ctx):
        return dists_of(ctx, ["flash-attn"])


class CheckStep(Step):
    id, title = "check", "environment check"

    def argv(self, ctx) -> List[str]:
        argv = [ctx.python, ctx.check_script, "--json", "--workdir", ctx.home]
        if not ctx.has_gpu():
            argv.append("--cpu-ok")  # no GPU here: CPU torch was installed on purpose
        if ctx.req.get("with_te"):
            argv.append("--require-te")
        return argv

    def inputs(self, ctx):
        return {
            "script": ctx.req.get("check_sha256"),
            "gpu": ctx.has_gpu(),
            "require_te": bool(ctx.req.get("with_te")),
        }

    def verify(self, ctx, outcome):
        return None

    def commands(self, ctx):
        return [Command(self.argv(ctx), title="check_megatron_env.py")]

    def run(self, ctx, log, on_line):
        argv = self.argv(ctx)
        log.line("$ " + display_command(argv, {}, ctx.redact))
        res = CHECK.run_command(argv, 1800, child_env({}, False, ctx.environ))
        for line in res.stderr.splitlines():
            log.line(line)
        try:
            report = json.loads(res.stdout)
        except ValueError:
            for line in res.stdout.splitlines()[-50:]:
                log.line(line)
            raise CommandFailed(
                Command(argv, title="check_megatron_env.py"),
                res.returncode if res.returncode is not None else -1,
            )
        summary = report.get("summary", {})
        log.line(
            "environment check: %s (%s)"
            % ("ok" if summary.get("ok") else "FAILED", summary.get("counts"))
        )
        return {
            "ok": bool(summary.get("ok")),
            "exit_code": res.returncode,
            "failed_required": summary.get("failed_required", []),
            "report": report,
        }

    def detail(self, outcome):
        if outcome.get("ok"):
            return "all required checks pass"
        return "failed: " + ", ".join(outcome.get("failed_required") or ["?"])


STEPS = (
    VenvStep(),
    TorchStep(),
    PackagesStep(),
    ProjectStep(),
    TEStep(),
    ApexStep(),
    FlashAttnStep(),
    CheckStep(),
)
STEP_IDS = tuple(s.id for s in STEPS)


def selected_steps(ctx: Ctx) -> List[Step]:
    return [s for s in STEPS if s.selected(ctx)]
