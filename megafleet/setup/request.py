"""What `megafleet setup` installs, as options (`SetupOptions`) and as the JSON request the
node agent receives (`build_request`). Standard library only, so the by-hand entry point
`python -m megafleet.setup.node` works with any Python on a GPU machine.

The version ranges come from one place, scripts/check_megatron_env.py (SUPPORTED_MEGATRON_CORE,
RUNTIME_REQUIREMENTS), which the environment check enforces afterwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from megafleet.errors import UsageError
from megafleet.setup.node.core import SETUP_DIR
from megafleet.setup.node.steps import STEP_IDS

# megatron-core 0.16.1 declares `transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0` in its
# dev extra: the TE releases it is tested with. {cuda_major} becomes 12 or 13 from torch's CUDA.
TE_SPEC = "transformer_engine[pytorch,core_cu{cuda_major}]>=2.9,<2.12"
APEX_SOURCE = "git+https://github.com/NVIDIA/apex.git"
# The runtime imports numpy and yaml itself (pyproject's runtime extra and base dependencies).
# psutil: megatron-core's distributed-checkpoint writer needs it but does not declare it
NODE_EXTRA_REQUIREMENTS = ("numpy>=1.26", "pyyaml>=6.0", "psutil>=5.9")
NODE_WHEELS = SETUP_DIR + "/wheels"
NODE_WHEELHOUSE = SETUP_DIR + "/wheelhouse"
INSTALLERS = ("auto", "uv", "pip")


@functools.lru_cache(maxsize=1)
def _check():
    from megafleet.envcheck import load_check_script

    return load_check_script()


def node_requirements() -> list[str]:
    """megatron-core (the supported range), transformers, safetensors, tokenizers, numpy, pyyaml,
    psutil."""
    check = _check()
    reqs = ["megatron-core" + check.SUPPORTED_MEGATRON_CORE]
    reqs += [name + spec for name, spec in check.RUNTIME_REQUIREMENTS.items() if name != "torch"]
    return reqs + list(NODE_EXTRA_REQUIREMENTS)


def torch_requirement() -> str:
    return "torch" + _check().RUNTIME_REQUIREMENTS["torch"]


def default_venv() -> str:
    from remote_runtime.spec.config import JobConfig  # torch-free

    return JobConfig().launch.venv


@dataclass
class SetupOptions:
    """Everything that decides what setup does on a node (see `megafleet setup --help`)."""

    venv: str = field(default_factory=default_venv)  # on the node; relative to its home
    with_te: bool = False
    with_apex: bool = False
    with_flash_attn: bool = False
    wheelhouse: str | None = None  # a local folder of wheels: offline install
    base_python: str = "python3"  # the node interpreter the venv is made from
    installer: str = "auto"  # auto: uv when the node has it, else python -m venv + pip
    torch_spec: str = field(default_factory=torch_requirement)
    torch_index: str | None = None  # cpu, cu130, ... or a URL; None: from the node's driver
    max_jobs: int | None = None  # parallel compile jobs; None: from cores and free memory
    force: tuple[str, ...] = ()  # step ids to redo even if satisfied ("all" for every step)
    te_spec: str = TE_SPEC
    apex_source: str = APEX_SOURCE

    def validate(self) -> None:
        if self.installer not in INSTALLERS:
            raise UsageError(f"--installer {self.installer}: choose one of {', '.join(INSTALLERS)}")
        bad = sorted(set(self.force) - set(STEP_IDS) - {"all"})
        if bad:
            raise UsageError(f"--force {', '.join(bad)}: steps are {', '.join(STEP_IDS)} or all")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise UsageError("--max-jobs must be at least 1")
        if not self.venv.strip():
            raise UsageError("--venv must not be empty")
        if (self.with_apex or self.with_flash_attn or self.with_te) and self.torch_index == "cpu":
            raise UsageError(
                "--with-te/--with-apex/--with-flash-attn need a CUDA torch, not --torch-index cpu"
            )


def build_request(
    options: SetupOptions,
    mode: str,
    project_wheel: dict | None = None,
    wheelhouse: dict | None = None,
    check_sha256: str | None = None,
) -> dict:
    """The JSON request for the node agent. `project_wheel` {"name", "sha256"} (uploaded to
    NODE_WHEELS); `wheelhouse` {"files": [names], "digest"} when installing offline."""
    req = {
        "mode": mode,
        "venv": options.venv,
        "base_python": options.base_python,
        "installer": options.installer,
        "with_te": options.with_te,
        "with_apex": options.with_apex,
        "with_flash_attn": options.with_flash_attn,
        "torch_spec": options.torch_spec,
        "torch_index": options.torch_index,
        "requirements": node_requirements(),
        "te_spec": options.te_spec,
        "apex_source": options.apex_source,
        "max_jobs": options.max_jobs,
        "force": list(options.force),
        "check_sha256": check_sha256,
        "project_wheel": None,
        "wheelhouse": None,
    }
    if project_wheel:
        req["project_wheel"] = {
            "path": f"{NODE_WHEELS}/{project_wheel['name']}",
            "sha256": project_wheel["sha256"],
        }
    if wheelhouse is not None:
        req.update(
            wheelhouse=NODE_WHEELHOUSE,
            wheelhouse_files=sorted(wheelhouse["files"]),
            wheelhouse_digest=wheelhouse["digest"],
        )
    return req
