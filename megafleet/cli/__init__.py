"""The `megafleet` command: a click group whose subcommands are imported on first use.

Subcommand modules live beside this file and are listed in `COMMANDS`; none is imported for
`megafleet --help`, so the heavy dependencies they pull (paramiko, boto3, questionary) never
slow down a plain help or version call. torch and megatron are never imported by the operator.

Conventions every command follows (see README "Exit codes"):
- read commands take `--json` (one JSON document on stdout, nothing else there);
- commands that change something take `--dry-run` and `--yes`;
- failures are `MegafleetError`s, printed without a traceback unless `--debug`.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from megafleet import __version__
from megafleet.errors import EXIT_INTERRUPTED, MegafleetError

# name -> (module under megafleet.cli, attribute, one-line help shown by `megafleet --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "hosts": ("hosts", "hosts", "Manage and check the SSH hosts megafleet uses."),
    "env": (
        "env",
        "env",
        "Check the Megatron training environment (torch, GPUs, CUDA, TE, megatron-core).",
    ),
    "ec2": ("ec2", "ec2", "Find, check, import, start and stop EC2 GPU instances."),
    "plan": (
        "plan",
        "plan_command",
        "Propose parallel sizes, recompute and batch sizes that fit in GPU memory.",
    ),
    "render": (
        "render",
        "render",
        "Render a job template as a job file, runtime flags or torchrun command.",
    ),
    "setup": ("setup", "setup", "Install the Megatron stack on every host (venv, torch, TE, ...)."),
    "launch": ("jobs", "launch", "Validate a job, upload its data and start it on every node."),
    "resume": ("jobs", "resume", "Continue a run from its newest checkpoint on the same nodes."),
    "logs": ("jobs", "logs", "Stream the logs of every node of a run."),
    "status": ("jobs", "status", "Show a run's state on every node (or list the runs)."),
    "runs": ("jobs", "runs", "List the recorded runs."),
    "stop": ("jobs", "stop", "Stop a run on every node and check nothing of it is left."),
    "fetch": ("jobs", "fetch", "Download a run's Hugging Face checkpoint."),
    "demo": (
        "demo",
        "demo",
        "Fine-tune a tiny model locally, end to end (no GPU or hosts needed).",
    ),
    "wizard": ("wizard", "wizard", "Interactive questions from your machines to a running job."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module, attr, _ = COMMANDS[name]
            return getattr(importlib.import_module(f"megafleet.cli.{module}"), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from COMMANDS so listing commands imports nothing.
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MegafleetError as exc:
            from megafleet import ui

            ui.print_error(
                exc, debug=ctx.obj.get("debug", False), as_json=ctx.meta.get("json", False)
            )
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            from megafleet import ui

            ui.err_console.print("[yellow]interrupted[/yellow]")
            ctx.exit(EXIT_INTERRUPTED)


def json_option(f):
    """`--json`: machine-readable output; also makes errors come out as JSON."""

    def remember(ctx: click.Context, _param, value):
        if value:
            ctx.meta["json"] = True
        return value

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=remember,
        expose_value=True,
        is_eager=True,
        help="Print one JSON document on stdout.",
    )(f)


def dry_run_option(f):
    return click.option(
        "--dry-run",
        is_flag=True,
        help="Show what would be done (commands, files, hosts) and change nothing.",
    )(f)


def yes_option(f):
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(f)


@click.group(
    cls=LazyGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="megafleet")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune large language models with megatron-core on your own GPU machines.

    Run `megafleet` with no command for the interactive wizard.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if ctx.invoked_subcommand is None:
        if "wizard" in COMMANDS:
            ctx.invoke(ctx.command.get_command(ctx, "wizard"))
        else:
            click.echo(ctx.get_help())


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C must raise KeyboardInterrupt (logs -f detaches, setup and the wizard stop cleanly)
    # even when the parent started us with SIGINT ignored, as a non-interactive shell does for
    # its background commands and Python then leaves it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="megafleet")
