"""LoRA on a MoE model through the real runtime on one GPU: megatron's Router builds its weight
on the CPU (megatron-core 0.16: "TODO: Add support for GPU initialization") and DDP moves only
trainable parameters into its GPU buffers, so a frozen router must be moved by build_model."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_moe_trains_on_one_gpu(tmp_path, train_type):
    from tests.runtime.train_helpers import base_args, check, losses, make_assets, run_runtime

    model, data = make_assets(tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    args = base_args(model, data, out, device="cuda", torch_dtype="bfloat16", train_iters=3)
    check(run_runtime(args + ["--train_type", train_type, "--lr", "1e-2"]))
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    saved = out / "checkpoint-3"
    name = "adapter_model.safetensors" if train_type == "lora" else "config.json"
    assert (saved / name).exists(), sorted(p.name for p in saved.iterdir())
