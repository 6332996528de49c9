"""`megafleet render TEMPLATE`: a job file, its runtime flags, or the torchrun command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from megafleet import templates, ui
from megafleet.cli import json_option, yes_option
from megafleet.errors import UsageError
from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.flags import to_flags


@click.command("render")
@click.argument("template", required=False)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a job field: leaf name (lr=2e-5) or dotted (optim.lr=2e-5); lists take "
    "a,b or [a, b]. Repeatable.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(templates.FORMATS),
    default="yaml",
    show_default=True,
    help="yaml: the job file; flags: runtime flags; command: torchrun line per node.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout."
)
@click.option("--list", "list_only", is_flag=True, help="List the templates.")
@yes_option
@json_option
def render(
    template: str | None,
    sets: tuple[str, ...],
    fmt: str,
    output: str | None,
    list_only: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Render a job TEMPLATE (a name from --list, or a template/job file) with --set values.

    \b
    megafleet render --list
    megafleet render sft-full --set model=/data/Qwen3-1.7B --set dataset=train.jsonl -o job.yaml
    megafleet render job.yaml --set tensor_model_parallel_size=2 --format command
    """
    if list_only:
        return _list(as_json)
    if not template:
        raise UsageError(
            "name a template (or a job file) to render", hint="megafleet render --list"
        )
    t = templates.get_template(template)
    try:
        job = templates.job_from_template(t, list(sets))
    except ConfigError as exc:
        raise templates.validation_error(exc) from None
    missing, invalid = templates.check_job(job)
    if invalid:
        raise templates.validation_error(ConfigError(invalid))
    text = templates.render(t, job, fmt)
    if output:
        templates.write_text_file(Path(output), text, yes)
    if as_json:
        ui.emit_json(
            {
                "template": t.name,
                "format": fmt,
                "task": job.task,
                "text": text,
                "output": output,
                "missing": missing,
                "job": job.to_dict(),
                "flags": to_flags(job),
                "commands": templates.torchrun_commands(job),
            }
        )
        return
    if not output:
        sys.stdout.write(text)  # the rendered job is data: written verbatim, no markup
        sys.stdout.flush()
    else:
        ui.check_row("ok", f"wrote {output}", f"{t.name}, {fmt}")
    if missing:
        fill = " ".join(f"--set {m.split('.')[-1]}=..." for m in missing)
        ui.warn(f"the job is incomplete: fill in {', '.join(missing)} before launching ({fill})")


def _list(as_json: bool) -> None:
    found = templates.list_templates()
    if as_json:
        ui.emit_json({"templates": [t.to_dict() for t in found]})
        return
    rows = [
        (
            t.name,
            "✓" if t.supported else "not yet",
            t.summary if t.supported else f"{t.summary} — {t.reason}",
        )
        for t in found
    ]
    ui.show(ui.table("Job templates", ["template", "supported", "what it does"], rows))
    ui.hint("megafleet render sft-full --set model=DIR --set dataset=FILE -o job.yaml")
