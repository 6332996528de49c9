"""The memory model's MoE activation terms against what the real MoE layer saves for backward.

A tiny Qwen3-MoE (8 experts, top 2) through the runtime's model (remote_runtime/model/moe.py) at
TP=1 on CPU, bf16: the bytes autograd keeps per token and layer (saved_bytes_worker's hooks,
one and two layers, the difference) against `activation_bytes_per_token`, whose routed term
counts top-k copies of every token through the expert FFNs plus the router's fp32 scores. The
same check on a dense layer of the same attention keeps the comparison honest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megafleet.memory import Parallel, activation_bytes_per_token
from megafleet.model_shape import shape_from_hf_config
from tests.conftest import REPO_ROOT, cli_env
from tests.runtime.test_memory_saved_tensors import CONFIG, CPU  # the dense check's settings

pytestmark = pytest.mark.runtime

MOE = dict(
    CONFIG,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,
)
DENSE = dict(CONFIG, intermediate_size=256)  # the dense FFN as wide as the two routed experts
MEASURE = """
import json, sys
from remote_runtime import platform
from tests.runtime.saved_bytes_worker import saved_bytes_per_token
dist = platform.init_distributed("cpu", 1)
out = {}
for name, config in json.loads(sys.argv[1]).items():
    one, two = (saved_bytes_per_token(config, n, False, "none", dist) for n in (1, 2))
    out[name] = two - one
print(json.dumps(out))
platform.shutdown()
"""


@pytest.fixture(scope="module")
def measured() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps({"moe": MOE, "dense": DENSE})],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,config,rel", [("dense", DENSE, 0.02), ("moe", MOE, 0.05)])
def test_per_layer_saved_bytes(measured, name, config, rel):
    shape = shape_from_hf_config(dict(config, num_hidden_layers=1))
    modelled = activation_bytes_per_token(shape, Parallel(), CPU)["layer"]
    assert measured[name] == pytest.approx(modelled, rel=rel)
    if name == "moe":  # the routed term is most of the difference to the dense layer
        assert measured["moe"] > measured["dense"]
