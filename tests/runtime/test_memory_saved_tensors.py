"""The memory model's activation terms against what the real model saves for backward.

saved_bytes_worker.py counts, with autograd's saved-tensor hooks, the bytes megatron-core and
the runtime's layers keep per token (CPU, bf16, padded batch; eager SwiGLU as on CPU). The
planner's per-layer formula (`megafleet.memory.activation_bytes_per_token`) must match it for
no / selective / full recompute, at TP=1 and at TP=2 with and without sequence parallelism.
Skipped until the runtime's model builder (remote_runtime.model) is present.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megafleet.memory import GIB, Assumptions, Parallel, activation_bytes_per_token, estimate_memory
from megafleet.model_shape import shape_from_hf_config
from remote_runtime.spec.resolve import padded_vocab_size
from tests.conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("saved_bytes_worker.py")
SEQ = 256  # the worker's sequence length
CPU = Assumptions(
    attention_layout="padded", swiglu_impl="eager", norm_impl="eager", qk_impl="separate"
)
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 768,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    if importlib.util.find_spec("remote_runtime.model") is None:
        pytest.skip("the runtime's model builder (remote_runtime.model) is not in this checkout")
    out = tmp_path_factory.mktemp("saved") / "saved.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
        json.dumps(CONFIG),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def expected(tp: int, sp: bool) -> dict:
    shape = shape_from_hf_config(dict(CONFIG, num_hidden_layers=1))
    return activation_bytes_per_token(shape, Parallel(tp=tp, sequence_parallel=sp), CPU)


@pytest.mark.parametrize(
    "recompute,key", [("none", "layer"), ("selective", "layer_selective"), ("full", "checkpoint")]
)
def test_per_layer_bytes_at_tp1(measured, recompute, key):
    per_layer = measured[f"tp1-{recompute}-L2"] - measured[f"tp1-{recompute}-L1"]
    assert per_layer == pytest.approx(expected(1, False)[key], rel=0.02)


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("recompute,key", [("none", "layer"), ("full", "checkpoint")])
def test_per_layer_bytes_at_tp2(measured, sp, recompute, key):
    name = f"tp2{'-sp' if sp else ''}-{recompute}"
    per_layer = measured[f"{name}-L2"] - measured[f"{name}-L1"]
    assert per_layer == pytest.approx(expected(2, sp)[key], rel=0.02)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)])
def test_whole_model_saved_bytes(measured, tp, sp):
    """One layer plus the last stage's final norm, output-layer input and the fp32 softmax the
    cross entropy keeps (the saved part of the logits term)."""
    shape = shape_from_hf_config(dict(CONFIG, num_hidden_layers=1))
    est = estimate_memory(shape, Parallel(tp=tp, sequence_parallel=sp), SEQ, 1, assumptions=CPU)
    softmax = 4 * padded_vocab_size(CONFIG["vocab_size"], tp) / tp
    modelled = est.components["activations"] * GIB / SEQ + softmax
    key = f"tp{tp}{'-sp' if sp else ''}-none-L1"
    assert measured[key] == pytest.approx(modelled, rel=0.02)
