"""The contract between operator and nodes is `remote_runtime.spec`, and it stays torch-free.

- `megafleet` (the operator package, installed without torch) imports nothing from
  `remote_runtime` but `remote_runtime.spec` (the demo, which runs the runtime locally, excepted);
- `remote_runtime.spec` imports neither torch, megatron nor transformers, directly or through
  anything it imports.
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import remote_runtime.spec

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_RUNTIME_USERS = {"megafleet/demo.py"}  # runs a real training job on this machine
HEAVY = ("torch", "megatron", "transformers")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_operator_imports_only_the_spec_from_the_runtime():
    offenders = {}
    for path in sorted((ROOT / "megafleet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED_RUNTIME_USERS:
            continue
        bad = sorted(
            m
            for m in imported_modules(path)
            if m.startswith("remote_runtime")
            and m != "remote_runtime"
            and not m.startswith("remote_runtime.spec")
        )
        if bad:
            offenders[rel] = bad
    assert not offenders, f"megafleet must import only remote_runtime.spec: {offenders}"


def test_spec_source_names_no_heavy_package():
    for path in sorted(Path(remote_runtime.spec.__file__).parent.rglob("*.py")):
        heavy = sorted(m for m in imported_modules(path) if m.split(".")[0] in HEAVY)
        assert not heavy, f"{path.name} imports {heavy}"


def test_importing_every_spec_module_loads_no_heavy_package():
    modules = [
        m.name for m in pkgutil.walk_packages(remote_runtime.spec.__path__, "remote_runtime.spec.")
    ]
    assert (
        "remote_runtime.spec.families.qwen3" in modules and "remote_runtime.spec.shape" in modules
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
