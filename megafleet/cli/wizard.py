"""`megafleet wizard` (also plain `megafleet`): questions from machines to a running job."""

from __future__ import annotations

import click

from megafleet.cli import dry_run_option

ANSWER_KEYS = """\b
Answers file keys (any subset; the rest is asked):
  where: local | ssh | ec2          hosts: [inventory names]
  new_hosts: [{address, user, key, name}]   add_host, host_failed: retry|keep|drop
  ec2_region, ec2_tags, ec2_user, ec2_key, keep_unreachable
  distribute: all | first           cpu_ok: true
  task: sft | pt                    model, model_on_nodes, dataset
  max_length, plan_failed: length|model|cancel, train_length ("1 epoch", "500 steps"),
  lr, output_dir, job_file, confirm: launch|save|cancel, setup, follow
"""


@click.command("wizard", epilog=ANSWER_KEYS)
@click.option(
    "--answers",
    "answers_file",
    type=click.Path(dir_okay=False, exists=True),
    metavar="FILE",
    help="Take answers from this YAML file (question id: answer).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for each host to answer.",
)
@dry_run_option
@click.pass_context
def wizard(ctx: click.Context, answers_file, timeout, dry_run) -> None:
    """Walk from your machines to a running training job, one question at a time.

    Where training runs (this machine, SSH hosts, EC2 instances by tag), the hosts (each
    checked at once), task, model, dataset, the planner's layout, then the job file and the
    command that runs it. Nothing is written before you confirm; Ctrl-C cancels at any step.
    The saved job replays with `megafleet launch FILE`.
    """
    import sys

    from megafleet.errors import UsageError
    from megafleet.wizard import Asker, load_answers, run_wizard

    if not answers_file and not sys.stdin.isatty():
        raise UsageError(
            "the wizard asks questions and needs a terminal",
            hint="run it in a terminal, pass --answers FILE, or use the commands "
            "(megafleet --help; agents: SKILL.md)",
        )
    answers = load_answers(answers_file) if answers_file else None
    ctx.exit(run_wizard(Asker(answers, answers_file), timeout=timeout, dry_run=dry_run))
