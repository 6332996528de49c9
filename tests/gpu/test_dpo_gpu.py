"""The preference loss functions run on the GPU without a host sync (one would stall the CPU
once per micro-batch until the forward pass finished). Runs only where CUDA is available."""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


@pytest.mark.parametrize("rlhf_type", ["dpo", "simpo", "orpo"])
def test_preference_loss_function_has_no_host_sync(rlhf_type):
    from remote_runtime.data.batches import collate_thd
    from remote_runtime.train.dpo import DpoSettings, dpo_loss_func

    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 100, n), np.ones(n, np.uint8)) for n in (300, 250, 400, 120)]
    mb = collate_thd(docs, num_samples=2, pad_token_id=0, pad_to_multiple_of=64)
    mb.ref_logps = -torch.rand(4) * 100
    mb = mb.to("cuda")
    per_token = torch.rand(mb.tokens.shape, device="cuda", requires_grad=True)
    settings = DpoSettings(rlhf_type=rlhf_type, rpo_alpha=0.5 if rlhf_type == "dpo" else None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, pairs, reports = dpo_loss_func(mb, settings, 0.01, per_token)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(pairs) == 2 and reports["dpo"].shape[0] > 9 and per_token.grad.abs().sum() > 0
