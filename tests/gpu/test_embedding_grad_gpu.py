"""The word embedding's gradient by rows (model/embedding.py) on a GPU, tied and untied: the same
losses as megatron's dense embedding gradient, and finite. A tied model (Qwen3-0.6B's shape cut
to 2 layers) is the case that first gave NaN losses (the placeholder summed into the output
layer's zero one); the untied Qwen3-8B shape cut to 2 layers is the plain path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

ROOT = Path(__file__).resolve().parents[2]


def _mean_loss(tmp_path, shape: str, fused: bool) -> float:
    out = tmp_path / f"{shape}-{fused}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--shape", shape]
    cmd += ["--num-layers", "2", "--seq-len", "512", "--global-batch", "4", "--warmup", "1"]
    cmd += ["--steps", "3", "--impl", "runtime", "--json", str(out)]
    cmd += ["--option", f"fused_embedding_grad={str(fused).lower()}"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    return json.loads(out.read_text())[0]["runs"][0]["mean_loss"]


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "qwen3-8b"])
def test_embedding_gradient_by_rows_trains_like_the_dense_one(tmp_path, shape):
    rows, dense = _mean_loss(tmp_path, shape, True), _mean_loss(tmp_path, shape, False)
    assert torch.isfinite(torch.tensor(rows)) and torch.isfinite(torch.tensor(dense))
    assert abs(rows - dense) <= 2e-3 * abs(dense)
