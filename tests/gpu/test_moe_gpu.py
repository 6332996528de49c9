"""The MoE experts' GPU path (torch._grouped_mm, Triton SwiGLU, sync-free dispatch) against the
exact per-expert loop in fp32, values and gradients. Runs only where CUDA is available."""

import types

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


def _experts(grouped: bool, activation: str):
    from remote_runtime.model.moe import GroupedExperts

    config = types.SimpleNamespace(
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        moe_ffn_hidden_size=768,
        hidden_size=2048,
        params_dtype=torch.bfloat16,
        perform_initialization=False,
        init_method=None,
        output_layer_init_method=None,
    )
    with torch.device("cuda"):
        torch.cuda.current_device()
        return GroupedExperts(16, config, activation=activation, grouped=grouped).cuda()


@pytest.mark.parametrize("activation", ["eager", "triton"])
def test_grouped_experts_match_the_per_expert_loop(activation):
    from remote_runtime.model.moe import LocalDispatch

    torch.manual_seed(0)
    fast, ref = _experts(True, activation), _experts(False, "eager")
    with torch.no_grad():
        for m in (fast, ref):
            m.linear_fc1.weight.copy_(torch.randn_like(m.linear_fc1.weight) * 0.02)
            m.linear_fc2.weight.copy_(torch.randn_like(m.linear_fc2.weight) * 0.02)
        ref.load_state_dict(fast.state_dict())
    n, k = 1000, 4
    x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 12, (n, k), device="cuda")  # experts 12-15 get no token
    w = torch.rand(n, k, device="cuda")
    outs, grads = [], []
    for m in (fast, ref.float()):
        # the Triton slot sums (un-permutation, and the permutation's backward) with the Triton
        # SwiGLU; the reference gathers and sums with index ops
        d = LocalDispatch(idx, 16, fused=m is fast and activation == "triton")
        # the tokens and the router weights get gradients too
        xm = (x if m is fast else x.float()).clone().requires_grad_(True)
        wm = w.clone().requires_grad_(True)
        rows, probs = d.permute(xm, wm)
        y, _ = m(rows, d.tokens_per_expert, probs)
        out = d.unpermute(y)
        out.float().square().sum().backward()
        outs.append(out.float())
        weights = [m.linear_fc1.weight.grad.float(), m.linear_fc2.weight.grad.float()]
        grads.append([*weights, wm.grad, xm.grad.float()])
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() < 2e-2 * scale
    for g, r in zip(grads[0], grads[1]):
        assert (g - r).abs().max() < 3e-2 * r.abs().max()
    assert grads[0][0][12:].abs().max() == 0  # experts without tokens: zero gradient


def test_fused_weight_gradient_lands_in_main_grad():
    """With megatron DDP's fp32 main_grad on the weights, the Triton grouped GEMM adds the
    weight gradients there (on top of what was in it) and autograd gets only a placeholder."""
    from remote_runtime.model.moe import LocalDispatch

    torch.manual_seed(0)
    fused, ref = _experts(True, "triton"), _experts(True, "eager")
    with torch.no_grad():
        for w in (fused.linear_fc1.weight, fused.linear_fc2.weight):
            w.copy_(torch.randn_like(w) * 0.02)
        ref.load_state_dict(fused.state_dict())
    start = []
    for w in (fused.linear_fc1.weight, fused.linear_fc2.weight):
        w.main_grad = torch.randn(w.shape, device="cuda")
        w.grad_added_to_main_grad = False
        start.append(w.main_grad.clone())
    n, k = 2000, 8
    x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 16, (n, k), device="cuda")
    w8 = torch.rand(n, k, device="cuda")
    for m in (fused, ref):
        d = LocalDispatch(idx, 16)
        rows, probs = d.permute(x, w8)
        y, _ = m(rows, d.tokens_per_expert, probs)
        d.unpermute(y).float().square().sum().backward()
    for w, r, s in zip(
        (fused.linear_fc1.weight, fused.linear_fc2.weight),
        (ref.linear_fc1.weight, ref.linear_fc2.weight),
        start,
    ):
        assert w.grad_added_to_main_grad
        got = w.main_grad - s
        assert (got - r.grad.float()).abs().max() < 2e-2 * r.grad.float().abs().max()


def test_expert_lora_grouped_path_matches_the_loop_on_gpu():
    """LoRA on the experts (Qwen3-30B-A3B's expert fc1 at r=16): torch._grouped_mm with the
    experts' offsets against the per-expert loop in fp32, output and the gradients of x, A and B;
    the frozen expert weight gets no gradient."""
    from remote_runtime.bridge.transforms import Layout
    from remote_runtime.model import moe
    from remote_runtime.model.lora import LoraAdapter, init_adapter
    from remote_runtime.spec.tuner import LoraSettings, LoraTarget

    experts = "model.layers.{layer}.mlp.experts.{expert}."
    target = LoraTarget(
        "decoder.layers.{layer}.mlp.experts.linear_fc1",
        "expert_gate_up",
        (experts + "gate_proj", experts + "up_proj"),
        (True, True),
    )
    settings = LoraSettings(16, 32.0, 0.0, False, "false", [target])
    torch.manual_seed(0)
    e, f, h = 16, 768, 2048
    weight = (torch.randn(e, 2 * f, h, device="cuda") * 0.02).bfloat16()
    lay = Layout(1, 1, 1, 1, 1, tp=1, tp_rank=0, num_experts=e, ep=1, ep_rank=0)
    adapter = LoraAdapter(target, 0, settings, weight, lay, False).cuda()
    init_adapter(adapter, "false", 0)
    tokens_per_expert = torch.randint(0, 600, (e,), device="cuda")
    tokens_per_expert[3] = 0  # an expert with no tokens
    n = int(tokens_per_expert.sum())
    x = torch.randn(n, h, device="cuda").bfloat16().requires_grad_()
    dy = torch.randn(n, 2 * f, device="cuda").bfloat16()
    results = []
    for offsets in (moe._offsets(tokens_per_expert, x.device), None):
        for t in (x, adapter.lora_A, adapter.lora_B):
            t.grad = None
        base = moe.grouped_linear(x, weight, tokens_per_expert, offsets, fuse_wgrad=True)
        out = adapter.add_grouped(x, base, tokens_per_expert, offsets)
        out.backward(dy)
        results.append([out.float(), x.grad.float(), adapter.lora_A.grad, adapter.lora_B.grad])
    assert weight.grad is None
    for grouped, loop in zip(*results):
        scale = loop.abs().max()
        assert scale > 0
        assert (grouped.float() - loop.float()).abs().max() <= 2e-2 * scale


def test_deferred_weight_gradients_equal_the_immediate_ones():
    """Qwen3-30B-A3B's expert shapes, 5 micro-batches at depth 4: main_grad is untouched
    after the first 3, and after the step's last equals the undeferred path's (fp32, up to the
    rounding order of the sums)."""
    from remote_runtime.model.expert_wgrad import WgradDeferral
    from remote_runtime.model.moe import GroupedExperts, LocalDispatch

    torch.manual_seed(0)
    deferral = WgradDeferral(4)
    immediate = _experts(True, "triton")
    config = immediate.config
    with torch.device("cuda"):
        deferred = GroupedExperts(16, config, activation="triton", wgrad_deferral=deferral).cuda()
    with torch.no_grad():
        for w in (immediate.linear_fc1.weight, immediate.linear_fc2.weight):
            w.copy_(torch.randn_like(w) * 0.02)
        deferred.load_state_dict(immediate.state_dict())
    for m in (immediate, deferred):
        for w in (m.linear_fc1.weight, m.linear_fc2.weight):
            w.main_grad = torch.zeros(w.shape, device="cuda")
            w.grad_added_to_main_grad = False
    batches = []
    for _ in range(5):
        n = 1500
        batches.append(
            (
                torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16),
                torch.randint(0, 16, (n, 8), device="cuda"),
                torch.rand(n, 8, device="cuda"),
            )
        )
    deferral.begin_step(len(batches))
    for i, (x, idx, probs) in enumerate(batches):
        for m in (immediate, deferred):
            d = LocalDispatch(idx, 16)
            rows, row_probs = d.permute(x, probs)
            y, _ = m(rows, d.tokens_per_expert, row_probs)
            d.unpermute(y).float().square().sum().backward()
        if i < 3:
            assert deferred.linear_fc1.weight.main_grad.abs().max() == 0
    deferral.end_step()
    for a, b in (
        (immediate.linear_fc1.weight, deferred.linear_fc1.weight),
        (immediate.linear_fc2.weight, deferred.linear_fc2.weight),
    ):
        scale = a.main_grad.abs().max()
        assert scale > 0
        assert (a.main_grad - b.main_grad).abs().max() <= 1e-5 * scale
