"""The wizard's second half: task, model, dataset, training length, and the planner's layout.

The job starts from the task's template defaults (templates/sft-full.yaml, pt.yaml), so a job
the wizard writes is the same job `megafleet render` would, with the answers filled in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.markup import escape

from megafleet import ui
from megafleet.errors import UsageError
from megafleet.wizard.ask import Asker
from megafleet.wizard.machines import GpuFacts
from megafleet.wizard.state import WizardState

TASKS = [
    ("sft", "Supervised fine-tuning (SFT), all parameters"),
    ("sft-lora", "SFT with LoRA adapters"),
    ("pt", "Pre-training (continued), on plain text"),
]
TEMPLATE_FOR = {"sft": "sft-full", "sft-lora": "sft-lora", "pt": "pt"}
CHAT_FORMATS = ("messages", "sharegpt", "alpaca", "query_response")
CPU_MAX_LENGTH = 512


def ask_task(ask: Asker, state: WizardState):
    from megafleet.templates import get_template, job_from_template

    task = ask.select("task", "What kind of training?", TASKS, default="sft")
    state.template = TEMPLATE_FOR[task]
    state.job = job_from_template(get_template(state.template))
    return state.job


# -- model ---------------------------------------------------------------------------------------


def describe_model(ref: str) -> tuple[dict, str]:
    """(config.json, one-line summary) for a model directory, config.json, hub id or shape name;
    raises UsageError naming the problem (unsupported family, not found, bad JSON)."""
    from megafleet.model_shape import load_model_config, shape_from_hf_config
    from remote_runtime.spec.config import ConfigError

    try:
        hf = load_model_config(ref.strip())
        shape = shape_from_hf_config(hf)
    except ConfigError as exc:
        raise UsageError("; ".join(p.message for p in exc.problems)) from None
    moe = (
        f" ({shape.active_params() / 1e9:.2f}B active: {shape.num_experts} experts, "
        f"top {shape.moe_router_topk})"
        if shape.is_moe
        else ""
    )
    return hf, (
        f"{shape.family}, {shape.total_params() / 1e9:.2f}B parameters{moe}, "
        f"{shape.num_layers} layers, hidden {shape.hidden_size}"
    )


def _model_problem(text: str) -> str | None:
    if not text.strip():
        return "give a model directory or hub id"
    try:
        describe_model(text)
    except UsageError as exc:
        return exc.message
    return None


def default_model() -> str:
    here = sorted(p.parent for p in Path.cwd().glob("*/config.json"))
    return str(here[0]) if here else "Qwen/Qwen3-1.7B"


def ask_model(ask: Asker, state: WizardState) -> dict:
    """The model, its family checked; a model that is not here must already be on the nodes."""
    ref = ask.text(
        "model",
        "Model: a Hugging Face checkpoint directory here, or a hub id (Qwen/Qwen3-8B):",
        default=default_model(),
        validate=_model_problem,
        path=True,
    ).strip()
    hf, summary = describe_model(ref)
    ui.check_row("ok", f"model {escape(ref)}", summary)
    local = Path(ref).expanduser()
    if local.is_dir():
        state.job.model.model = str(local.resolve())
        return hf
    ui.info(
        f"{escape(ref)} is not on this machine: download it to the same path on every node "
        f"first (e.g. `huggingface-cli download {escape(ref)} --local-dir PATH`)."
    )
    home = _node_home(state)
    default = f"{home}/models/{ref.rstrip('/').split('/')[-1]}" if home else ""
    state.job.model.model = ask.text(
        "model_on_nodes",
        "Path of the model directory on the nodes:",
        default=default,
        validate=lambda t: None if t.strip().startswith("/") else "give an absolute path",
    ).strip()
    return hf


def _node_home(state: WizardState) -> str | None:
    for name in state.nodes:
        workdir = (state.rows.get(name) or {}).get("workdir") or ""
        if workdir.endswith("/megafleet"):
            return workdir[: -len("/megafleet")]
    return None


# -- dataset -------------------------------------------------------------------------------------


def first_row(path: Path) -> tuple[object, int]:
    """(the first row, the number of rows) of a .jsonl / .json file; raises UsageError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not rows:
            raise UsageError(f"{path}: the file has no rows")
        return rows[0], len(rows)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"{path}: the file has no rows")
    number, line = lines[0]
    try:
        return json.loads(line), len(lines)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{number}: invalid JSON ({exc.msg}, column {exc.colno})") from None


def inspect_dataset(spec: str, task: str) -> tuple[str, object, int]:
    """(format, the first row as the runtime reads it, rows) of a dataset file; UsageError if
    the file is missing, unreadable, of no known format, or plain text for SFT (pre-training
    takes text rows, and chat rows with the loss on every token)."""
    from remote_runtime.spec.errors import RowError
    from remote_runtime.spec.formats import detect_format, row_to_example

    path = Path(spec.rpartition("#")[0] if re.search(r"#\d+$", spec) else spec).expanduser()
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .json")
    row, count = first_row(path)
    try:
        fmt = detect_format(row)
        example = row_to_example(row, fmt)
    except RowError as exc:
        raise UsageError(f"{path}:1: {exc}") from None
    if task == "sft" and fmt not in CHAT_FORMATS:
        raise UsageError(
            f"{path}: rows are plain text; SFT needs conversations "
            "(messages, sharegpt, alpaca or query/response rows)"
        )
    return fmt, example, count


def default_dataset() -> str:
    here = sorted(Path.cwd().glob("*.jsonl"))
    return str(here[0]) if here else "train.jsonl"


def ask_dataset(ask: Asker, state: WizardState) -> None:
    task = state.job.task

    def problem(text: str) -> str | None:
        if not text.strip():
            return "give a .jsonl or .json file"
        try:
            inspect_dataset(text.strip(), task)
        except UsageError as exc:
            return exc.message
        return None

    spec = ask.text(
        "dataset",
        "Dataset file (.jsonl or .json):",
        default=default_dataset(),
        validate=problem,
        path=True,
    ).strip()
    fmt, example, count = inspect_dataset(spec, task)
    path, sep, n = spec.rpartition("#") if re.search(r"#\d+$", spec) else (spec, "", "")
    state.job.data.dataset = [str(Path(path).expanduser().resolve()) + sep + n]
    ui.check_row("ok", f"dataset {escape(spec)}", f"{count} rows, format {fmt}")
    show_example(example)


def show_example(example) -> None:
    ui.info("[bold]First row, as the model will see it:[/bold]")
    if isinstance(example, str):
        ui.plain("  " + _short(example))
        return
    for msg in example:
        ui.info(f"  [cyan]{msg['role']}:[/cyan] {escape(_short(msg['content']))}")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- training length and the plan ----------------------------------------------------------------


def parse_length(text: str) -> tuple[str, float]:
    """'2 epochs' | '500 steps' | '3' (epochs) -> ("num_train_epochs" | "train_iters", value)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(epochs?|steps?|iters?)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError("write a number of epochs (e.g. 1 or 2 epochs) or steps (e.g. 500 steps)")
    unit = m.group(2) or "epochs"
    if unit.startswith("epoch"):
        return "num_train_epochs", float(m.group(1))
    if not m.group(1).isdigit():
        raise ValueError("steps are a whole number")
    return "train_iters", int(m.group(1))


def _length_problem(text: str) -> str | None:
    try:
        parse_length(text)
    except ValueError as exc:
        return str(exc)
    return None


def ask_max_length(ask: Asker, state: WizardState, hf: dict, gpus: GpuFacts) -> None:
    job = state.job
    longest = int(hf.get("max_position_embeddings") or job.data.max_length)
    default = min(job.data.max_length, longest, CPU_MAX_LENGTH if not gpus.per_node else 10**9)
    seq = ask.text(
        "max_length",
        "Tokens per training row (max_length):",
        default=str(default),
        validate=lambda t: (
            None if t.strip().isdigit() and int(t) > 0 else "a whole number of tokens"
        ),
    )
    job.data.max_length = int(seq)


def ask_schedule(ask: Asker, state: WizardState) -> None:
    """How long, how fast, and where checkpoints go."""
    job = state.job
    length = ask.text(
        "train_length",
        "How long to train (epochs or steps):",
        default="1 epoch",
        validate=_length_problem,
    )
    field, value = parse_length(length)
    job.train.num_train_epochs, job.train.train_iters = None, None
    job.set(f"train.{field}", value)
    lr = ask.text(
        "lr",
        "Learning rate:",
        default=f"{job.optim.lr:g}",
        validate=lambda t: None if _positive_float(t) else "a number > 0, e.g. 1e-5",
    )
    job.optim.lr = float(lr)
    job.optim.min_lr = min(job.optim.min_lr, job.optim.lr)
    out = ask.text(
        "output_dir",
        "Where the nodes write checkpoints (output_dir, relative to the run directory):",
        default=job.checkpoint.output_dir,
        validate=lambda t: None if t.strip() else "give a directory",
    )
    job.checkpoint.output_dir = out.strip()


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def cpu_settings(state: WizardState) -> None:
    """No GPU on the nodes: one CPU process per node, fp32 (a smoke run for tiny models)."""
    job = state.job
    job.model.device, job.model.torch_dtype = "cpu", "float32"
    job.launch.nproc_per_node = 1
    job.train.micro_batch_size = 1
    ui.check_row("info", "CPU run: 1 process per node, float32, no memory planning")


def plan_layout(ask: Asker, state: WizardState, hf: dict, gpus: GpuFacts) -> str:
    """Run the planner for the nodes' GPUs and apply its layout: "ok"; when nothing fits, the
    answer to change ("length" or "model"), or a cancel."""
    from megafleet.cli.plan import show_plan
    from megafleet.planner import apply_plan, plan
    from remote_runtime.spec.config import ConfigError

    job, nodes = state.job, len(state.nodes)
    ui.info(
        f"[bold]Planning[/bold] for {nodes} node(s) × {gpus.per_node} {escape(gpus.name)} "
        f"({gpus.mem_gib:g} GiB each, from the {gpus.source})"
    )
    try:
        result = plan(
            hf,
            gpus.per_node * nodes,
            gpus.mem_gib,
            gpus.per_node,
            job.data.max_length,
            job.task,
            global_batch_size=job.train.global_batch_size,
        )
    except ConfigError as exc:
        raise UsageError("; ".join(f"{p.field}: {p.message}" for p in exc.problems)) from None
    show_plan(result, job.model.model, details=False)
    if result.feasible:
        state.job = apply_plan(job, result)
        return "ok"
    ui.check_row("fail", escape(result.reason or "the model does not fit"))
    what = ask.select(
        "plan_failed",
        "Nothing fits. What now?",
        [
            ("length", "Try a shorter sequence length"),
            ("model", "Choose another model"),
            ("cancel", "Cancel"),
        ],
        default="length",
    )
    if what == "cancel":
        raise KeyboardInterrupt
    return what
