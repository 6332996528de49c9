"""The node's dry run hands its problems to the operator as data: field, message and hint survive
the trip (JSON on stdout), instead of stderr lines that the operator would have to parse."""

import json
import subprocess
import sys

from megafleet.jobs.launch import config_problems
from remote_runtime.spec.errors import ConfigError
from remote_runtime.spec.shape import ModelShape
from remote_runtime.tiny import TINY_SHAPES


def test_dry_run_problems_arrive_as_fields_with_hints(tmp_path):
    hf = dict(
        TINY_SHAPES["qwen3"][1],
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=301,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelShape.from_hf_config(hf).num_attention_heads == 4
    job = (
        f"model: {tmp_path}\ndataset: [d.jsonl]\ntrain_iters: 2\n"
        "tensor_model_parallel_size: 3\nglobal_batch_size: 5\nmicro_batch_size: 1\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remote_runtime",
            "sft",
            "--config",
            "/dev/stdin",
            "--dry_run",
            "true",
        ],
        input=job,
        capture_output=True,
        text=True,
        env={"WORLD_SIZE": "6", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr  # people still get a readable line
    err = ConfigError.from_dict(json.loads(proc.stdout))
    by_field = {}
    for p in err.problems:
        by_field.setdefault(p.field, []).append(p)
    assert "does not divide num_attention_heads=4" in " ".join(
        p.message for p in by_field["parallel.tensor_model_parallel_size"]
    )
    batch = by_field["train.global_batch_size"][0]
    assert batch.hint == "use a multiple of 2"  # world 6 / TP 3 = DP 2
    shown = config_problems(err, where="node0 dry run")
    assert {p.field for p in shown.problems} == set(by_field)
    assert "use a multiple of 2" in shown.hint
    assert all(p.source == "node0 dry run" for p in shown.problems)
