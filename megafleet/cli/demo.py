"""`megafleet demo`: train a tiny model on this machine through the real lifecycle."""

from __future__ import annotations

from pathlib import Path

import click

from megafleet import ui
from megafleet.cli import json_option


@click.command()
@click.option(
    "--dir",
    "workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("megafleet-demo"),
    show_default=True,
    help="Workspace for the model, data and fetched checkpoint (reused if present).",
)
@click.option("--steps", type=click.IntRange(5, 1000), default=30, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@json_option
def demo(workspace: Path, steps: int, device: str, as_json: bool) -> None:
    """Fine-tune a tiny Qwen3-shaped model locally (no GPU, hosts or network needed).

    Builds the model, tokenizer and a chat dataset, runs `sft` through torchrun and megatron-core
    exactly as on a cluster (this machine is the only node), shows the loss falling, fetches the
    Hugging Face checkpoint and asks it a question from the training data.
    """
    from megafleet.demo import run_demo

    show_line = (
        None
        if as_json
        else (
            lambda line: ui.log_line(
                line.prefix.ljust(7), ui.node_colour(line.node), line.text, dim=line.progress
            )
        )
    )
    say = (lambda msg: None) if as_json else (lambda msg: ui.check_row("info", msg))
    result = run_demo(workspace, steps=steps, device=device, on_line=show_line, say=say)
    if as_json:
        ui.emit_json(result.to_dict())
        return
    ui.check_row("pass", f"loss {result.first_loss:.3f} -> {result.last_loss:.3f} in {steps} steps")
    ui.check_row("pass", f"Hugging Face checkpoint fetched to {result.checkpoint}")
    ui.info(f"\n[bold]Q:[/bold] {result.prompt}\n[bold]A:[/bold] {result.answer}\n")
    ui.check_row(
        "pass" if result.learned else "warn",
        "the answer is the one in the training data"
        if result.learned
        else f"expected: {result.expected}",
        f"{result.seconds:.0f} s in all",
    )
    ui.hint(
        "megafleet hosts add NAME ADDRESS --user USER --key ~/.ssh/id_ed25519",
        "megafleet hosts check",
        "megafleet plan --model DIR --gpus 8 --gpu-mem 80",
        f"megafleet logs {result.run_id}",
        title="Next, on your own machines",
    )
