"""`megafleet demo`: the whole product on this machine, in about a minute, with no GPU, hosts or
network.

It builds a tiny random Qwen3-shaped model and a tokenizer, writes a small instruction dataset,
launches a real SFT job through the same lifecycle a cluster uses (local mode: this machine is
the only node; torchrun; the megatron-core runtime; GPU when present, else CPU), follows its
logs while the loss falls, fetches the Hugging Face checkpoint, loads it with `transformers` and
answers a question from the training data.

Everything lives in one workspace directory (default `./megafleet-demo`); run records go where
every run's record goes (`$MEGAFLEET_HOME/runs`).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from megafleet.errors import MegafleetError, UsageError

RUNTIME_PACKAGES = ("torch", "megatron.core", "transformers", "safetensors", "tokenizers")


@dataclass
class DemoResult:
    workspace: str
    run_id: str
    exit_code: int | None
    first_loss: float | None = None
    last_loss: float | None = None
    checkpoint: str | None = None
    prompt: str = ""
    answer: str = ""
    expected: str = ""
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return self.answer.strip() == self.expected.strip()

    def to_dict(self) -> dict:
        return {**self.__dict__, "learned": self.learned}


def check_runtime_installed() -> None:
    import importlib.util

    missing = [m for m in RUNTIME_PACKAGES if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise UsageError(
            f"the demo trains locally and needs the runtime: {', '.join(missing)} not installed",
            hint="pip install 'megafleet[runtime]' (or ./dev demo)",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_assets(workspace: Path) -> tuple[Path, Path]:
    """(model dir, dataset file), reused when already built."""
    from remote_runtime.data.demo_data import demo_corpus, write_demo_dataset
    from remote_runtime.tiny import build_model, build_tokenizer

    model = workspace / "model"
    if not (model / "config.json").exists():
        tok = workspace / "tokenizer"
        build_tokenizer(tok, corpus=demo_corpus())
        build_model("qwen3", model, tokenizer_dir=tok, seed=0)
    data = workspace / "data.jsonl"
    if not data.exists():
        write_demo_dataset(data, num_rows=200, seed=0)
    return model, data


def demo_job(model: Path, data: Path, steps: int, device: str):
    """The SFT job: ms-swift flags, exactly what a user could pass to `megafleet launch`."""
    from remote_runtime.spec.flags import job_from_argv

    flags = [
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--device",
        device,
        "--max_length",
        "256",
        "--micro_batch_size",
        "2",
        "--global_batch_size",
        "16",
        "--train_iters",
        str(steps),
        "--lr",
        "3e-3",
        "--min_lr",
        "3e-4",
        "--lr_warmup_iters",
        "2",
        "--weight_decay",
        "0.0",
        "--logging_steps",
        "5",
        "--save_steps",
        str(steps),
        "--save_total_limit",
        "1",
        "--no_save_optim",
        "true",
        "--seed",
        "0",
        "--hosts",
        "local",
        "--master_port",
        str(free_port()),
    ]
    if device == "cpu":
        flags += ["--torch_dtype", "float32"]
    return job_from_argv(flags, task="sft")


def answer(checkpoint: Path, prompt: str) -> str:
    """Greedy answer of the trained Hugging Face checkpoint, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(
    workspace: Path, steps: int = 30, device: str = "auto", on_line=None, say=lambda msg: None
) -> DemoResult:
    """Build, train, fetch, answer. `on_line(LogLine)` sees the run's log lines as they come."""
    import json

    from megafleet.jobs.fetch import fetch_checkpoint
    from megafleet.jobs.launch import LaunchOptions, launch_job
    from megafleet.jobs.logs import follow_logs
    from remote_runtime.data.demo_data import DEMO_ANSWER, DEMO_PROMPT

    check_runtime_installed()
    start = time.monotonic()
    timings = {}
    workspace = workspace.expanduser().resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    say(f"building a tiny Qwen3-shaped model, tokenizer and 200-row chat dataset in {workspace}")
    model, data = build_assets(workspace)
    timings["assets_s"] = round(time.monotonic() - start, 1)
    run = launch_job(
        demo_job(model, data, steps, _device(device)), LaunchOptions(local=True, say=say)
    )
    say(f"run {run.run_id}: torchrun -m remote_runtime sft on this machine")
    losses = []

    def collect(line):
        if line.text.startswith("step ") and "| loss " in line.text:
            losses.append(float(line.text.split("| loss ")[1].split()[0]))
        if on_line:
            on_line(line)

    t0 = time.monotonic()
    exit_code, _ = follow_logs(run, collect)
    timings["train_s"] = round(time.monotonic() - t0, 1)
    result = DemoResult(
        str(workspace),
        run.run_id,
        exit_code,
        losses[0] if losses else None,
        losses[-1] if losses else None,
        prompt=DEMO_PROMPT,
        expected=DEMO_ANSWER,
    )
    if exit_code != 0:
        raise MegafleetError(
            f"the demo run {run.run_id} ended with exit code {exit_code}",
            hint=f"megafleet logs {run.run_id}",
        )
    got = fetch_checkpoint(run, "latest", to=workspace / "checkpoint")
    result.checkpoint = str(workspace / "checkpoint")
    t0 = time.monotonic()
    result.answer = answer(Path(result.checkpoint), DEMO_PROMPT)
    timings["answer_s"] = round(time.monotonic() - t0, 1)
    result.seconds = round(time.monotonic() - start, 1)
    result.timings = timings
    (workspace / "result.json").write_text(
        json.dumps({**result.to_dict(), "fetched": got}, indent=2, default=str)
    )
    return result


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
