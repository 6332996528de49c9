"""The agent skill is code: every `megafleet ...` command that SKILL.md and references/*.md show
must exist and take the options it is shown with; the ones in code blocks must read with
`--json` or change with `--dry-run`; the ones that can run without hosts are run (with
placeholders filled in) and must not be usage errors. The skill never tells an agent to turn
off host-key checking."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from megafleet.cli import cli
from megafleet.errors import EXIT_CODES, EXIT_USAGE
from tests.conftest import REPO_ROOT, run_cli

SKILL = REPO_ROOT / "SKILL.md"
REFERENCES = sorted((REPO_ROOT / "references").glob("*.md"))
FILES = [SKILL, *REFERENCES]
PEOPLE_ONLY = {(), ("wizard",)}  # interactive: shown for people, not for agents to run
HELP = {"-h", "--help"}


@dataclass(frozen=True)
class Shown:
    file: str
    line: int
    text: str
    in_block: bool  # in a fenced code block (else an inline `code` span)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def shown_commands() -> list[Shown]:
    out = []
    for path in FILES:
        text = path.read_text()
        in_block = False
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block and line.strip().startswith("megafleet"):
                out.append(Shown(path.name, number, line.strip(), True))
            elif not in_block:
                out += [
                    Shown(path.name, number, m, False)
                    for m in re.findall(r"`(megafleet(?: [^`]*)?)`", line)
                ]
    return out


COMMANDS = shown_commands()


def resolve(tokens: list[str]) -> tuple[tuple[str, ...], click.Command, list[str]]:
    """(command path, the click command, its arguments) of `megafleet ...` tokens."""
    ctx = click.Context(cli)
    command, path, rest = cli, [], tokens[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise AssertionError(f"unknown command: megafleet {' '.join(path + rest[:1])}")
        command, path, rest = sub, path + [rest[0]], rest[1:]
    return tuple(path), command, rest


def option_names(command: click.Command) -> set[str]:
    names = set(HELP)
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts + p.secondary_opts)
    return names


def options_used(args: list[str]) -> list[str]:
    used = []
    for a in args:
        if a == "--":
            break  # runtime flags for `launch`, checked by the runtime
        if a.startswith("-") and len(a) > 1 and not re.fullmatch(r"-\d+(\.\d+)?", a):
            used.append(a.split("=", 1)[0])
    return used


def test_the_skill_has_its_frontmatter_checklist_and_references():
    text = SKILL.read_text()
    front = re.match(r"\A---\n(.*?)\n---\n", text, re.S)
    assert front, "SKILL.md must start with YAML frontmatter"
    import yaml

    meta = yaml.safe_load(front.group(1))
    assert meta["name"] == "megafleet"
    for phrase in ("fine-tune", "train on my GPU boxes", "EC2", "Megatron"):
        assert phrase in meta["description"], phrase
    assert "## First-answer checklist" in text and "## Workflow" in text
    for ref in (
        "megatron-guide",
        "dataset-formats",
        "job-templates",
        "troubleshooting",
        "ec2-guide",
    ):
        assert (REPO_ROOT / "references" / f"{ref}.md").is_file()
        assert f"{ref}.md" in text
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", text, re.M)}
    assert codes == set(EXIT_CODES), "the exit code table must match megafleet.errors"


def test_the_skill_never_disables_host_key_checking():
    forbidden = [
        r"StrictHostKeyChecking",
        r"UserKnownHostsFile\s*=?\s*/dev/null",
        r"AutoAddPolicy",
        r"ssh-keygen\s+-R",
        r">>?\s*\S*known_hosts",
        r"rm\s+\S*known_hosts",
        r"GlobalKnownHostsFile",
        r"CheckHostIP\s*=?\s*no",
    ]
    for path in FILES:
        for pattern in forbidden:
            hit = re.search(pattern, path.read_text(), re.M | re.I)
            assert hit is None, f"{path.name}: {hit.group(0)!r}"
    text = " ".join(SKILL.read_text().split())
    assert "megafleet hosts trust NAME --replace --fingerprint SHA256:..." in text
    assert "Never turn off or work around SSH host-key checking" in text


def test_every_shown_command_exists_with_its_options():
    assert len(COMMANDS) > 40
    problems = []
    for shown in COMMANDS:
        tokens = shlex.split(shown.text, comments=True)
        try:
            path, command, args = resolve(tokens)
        except AssertionError as exc:
            problems.append(f"{shown}: {exc}")
            continue
        unknown = [o for o in options_used(args) if o not in option_names(command)]
        if unknown:
            problems.append(
                f"{shown}: unknown option(s) {', '.join(unknown)} for megafleet {' '.join(path)}"
            )
        used = set(options_used(args))
        if shown.in_block and path not in PEOPLE_ONLY and not used & {"--json", "--dry-run"}:
            problems.append(
                f"{shown}: an agent's command must read with --json or change with --dry-run"
            )
    assert not problems, "\n".join(problems)


def test_every_shown_command_answers_help():
    paths = sorted({resolve(shlex.split(s.text, comments=True))[0] for s in COMMANDS})
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(cli, [*path, "--help"], obj={})
        assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)


# ---- running what runs without hosts ------------------------------------------------------

RUNNABLE = {("hosts", "list"), ("runs",), ("plan",), ("render",), ("env", "check")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A model (its config.json), a dataset and an SSH key, shared; placeholders -> values."""
    from megafleet.model_shape import NAMED_CONFIGS
    from remote_runtime.data.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("skill")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(NAMED_CONFIGS["qwen3-1.7b"]))
    write_demo_dataset(root / "train.jsonl", 20)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "key")], check=True
    )
    return {
        "DIR": str(root / "model"),
        "FILE": str(root / "train.jsonl"),
        "NAME1,NAME2": "gpu1,gpu2",
        "NAME": "gpu1",
        "USER@ADDRESS": "ubuntu@203.0.113.7",
        "~/.ssh/KEY": str(root / "key"),
    }


def workdir(tmp_path: Path, tokens: list[str], values: dict) -> Path:
    """An empty MEGAFLEET_HOME and working directory; job.yaml in it when the command reads
    one (rendered from the shipped template, as the skill's workflow does)."""
    (tmp_path / "home").mkdir(mode=0o700)
    reads_job = any(
        t == "job.yaml" and prev not in ("-o", "--output") for prev, t in zip([""] + tokens, tokens)
    )
    if reads_job:
        proc = run_cli(
            "render",
            "sft-full",
            "--set",
            f"model={values['DIR']}",
            "--set",
            f"dataset={values['FILE']}",
            "-o",
            "job.yaml",
            cwd=tmp_path,
            env={"MEGAFLEET_HOME": str(tmp_path / "home")},
        )
        assert proc.returncode == 0, proc.stderr
    return tmp_path


def fill(tokens: list[str], values: dict) -> list[str]:
    out = []
    for t in tokens:
        for placeholder, value in values.items():
            if t == placeholder or t.endswith("=" + placeholder):
                t = t[: len(t) - len(placeholder)] + value
        out.append(t)
    return out


def runnable(shown: Shown) -> bool:
    tokens = shlex.split(shown.text, comments=True)
    try:
        path, _, args = resolve(tokens)
    except AssertionError:  # reported by test_every_shown_command_exists_with_its_options
        return False
    if path == ("env", "check"):
        return "--local" in args
    if path == ("hosts", "add"):
        return "--dry-run" in args
    return path in RUNNABLE


@pytest.mark.parametrize("shown", [s for s in COMMANDS if s.in_block and runnable(s)], ids=str)
def test_shown_commands_that_need_no_hosts_run(shown, assets, tmp_path):
    tokens = fill(shlex.split(shown.text, comments=True), assets)
    root = workdir(tmp_path, tokens, assets)
    proc = run_cli(*tokens[1:], cwd=root, env={"MEGAFLEET_HOME": str(root / "home")}, timeout=240)
    assert proc.returncode != EXIT_USAGE, f"{shown}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode in (0, 1), f"{shown}\n{proc.stderr[-2000:]}"
    if "--json" in tokens:
        json.loads(proc.stdout)


def test_the_skill_gives_the_shortest_path_cpu_hosts_and_small_datasets():
    """An agent with only SKILL.md: fewer than 15 commands from two hosts to a fetched model,
    and what to set on hosts without GPUs and on a small dataset."""
    text = SKILL.read_text()
    section = text.split("## The shortest path", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    steps = [line for line in block.splitlines() if line.startswith("megafleet ")]
    assert len(steps) < 15 and steps[-1].startswith("megafleet fetch")
    assert any(s.startswith("megafleet launch") and "--dry-run" in s for s in steps)
    flat = " ".join(section.split())
    for needle in (
        "--cpu-ok",
        "--device cpu",
        "--global_batch_size",
        "--max_length",
        "--with-state",
    ):
        assert needle in flat, needle
