"""LoRA on mixture-of-experts models (tiny Qwen3-MoE and Qwen2-MoE: 8 experts, top 2) on CPU,
fp32, against PEFT 0.21 and transformers 5.

The adapter is a random per-expert one as PEFT saves it (init_lora_weights=False: A and B as
nn.Linear) on q/k/v/o, every routed expert's gate/up/down and Qwen2-MoE's shared expert, written
here (`base_model.model.model.layers.L.mlp.experts.N.gate_proj.lora_A.weight`, ...); our runtime
continues it (`--adapters`), at EP1 (one process), TP2 + SP (expert TP 2) and EP2 (two gloo
processes; `lora_worker.py`, modes single-moe and parallel-moe).

The reference: for Qwen3-MoE, PEFT itself (`PeftModel.from_pretrained` converts the per-expert
adapter onto transformers 5's fused experts: gate/up a rank-2r block-diagonal adapter on
`gate_up_proj`); its gradients are mapped back to per-expert gate/up/down. For Qwen2-MoE PEFT 0.21.2
cannot: its conversion table has no entry for qwen2_moe itself (only for models mapped onto it),
and the shared expert's gate_proj would collide with the experts' name; there the reference is
transformers on the merged weights W + scale·B·A as functions of the adapter (autograd gives the
adapter gradients), checked against PEFT on Qwen3-MoE (`test_merged_weight_reference_is_peft`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runtime.test_bridge import _run_worker as run_worker
from tests.runtime.test_lora import (
    _ref,
    _tensors,
    assert_gradients_match,
    assert_lean,
    assert_merged_matches,
)
from tests.runtime.test_lora import _vocab as _flat

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("lora_worker.py")
FAMILIES = ("qwen3_moe", "qwen2_moe")
CASES = [(layout, f) for layout in ("ep1", "tp2sp", "ep2") for f in FAMILIES]
RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK
TOL = 1e-4
PEFT_LOADS = "qwen3_moe"  # the family PEFT 0.21.2 converts per-expert adapters for
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _hf(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)


def adapter_shapes(model) -> dict[str, tuple[int, int]]:
    """{HF module: (out, in)} of every module an all-linear adapter covers, the routed experts
    one by one (v4 names, as PEFT saves them)."""
    cfg = model.config
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear) and leaf in ATTENTION + MLP:
            shapes[name] = tuple(mod.weight.shape)
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            for leaf, shape in zip(MLP, ((f, h), (f, h), (h, f))):
                shapes[f"model.layers.{layer}.mlp.experts.{e}.{leaf}"] = shape
    return shapes


def key(module: str, which: str) -> str:
    return f"base_model.model.{module}.lora_{which}.weight"


def random_adapter(model, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """A per-expert adapter as PEFT writes one with init_lora_weights=False."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in adapter_shapes(model).items():
        for which, shape in (("A", (RANK, cols)), ("B", (rows, RANK))):
            bound = 1 / shape[1] ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5))
            tensors[key(module, which)] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model.name_or_path),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(ATTENTION + MLP),
        "bias": "none",
        "init_lora_weights": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def merged_state(model, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights plus scale·B·A of every adapted module, in transformers 5's layout
    (experts fused: gate_up_proj [E, 2F, H], down_proj [E, H, F]); differentiable in the adapter."""
    state = dict(model.state_dict())
    cfg = model.config

    def delta(module):
        return SCALE * adapter[key(module, "B")] @ adapter[key(module, "A")]

    for module in adapter_shapes(model):
        if ".mlp.experts." not in module:
            state[module + ".weight"] = state[module + ".weight"] + delta(module)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        experts = range(cfg.num_experts)
        gate_up = [
            torch.cat([delta(f"{p}{e}.gate_proj"), delta(f"{p}{e}.up_proj")]) for e in experts
        ]
        state[p + "gate_up_proj"] = state[p + "gate_up_proj"] + torch.stack(gate_up)
        down = torch.stack([delta(f"{p}{e}.down_proj") for e in experts])
        state[p + "down_proj"] = state[p + "down_proj"] + down
    return state


def mean_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Our runtime's loss on the worker's batch (labels rolled, every token counted)."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.roll(tokens, -1, 1).reshape(-1)
    )


def merged_reference(model, adapter: dict, tokens: torch.Tensor) -> dict:
    """Logits and adapter gradients of transformers on the merged weights."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
    logits = torch.func.functional_call(model, merged_state(model, leaves), (tokens,)).logits
    mean_loss(logits, tokens).backward()
    return {"logits": logits.detach(), **{f"grad/{k}": v.grad for k, v in leaves.items()}}


def peft_per_expert_grads(model, cfg) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients under per-expert names: the fused gate_up_proj adapter (A
    [E·2r, H] rows expert-major, B [2F, 2r·E] columns rank-major, block-diagonal in gate/up) and
    down_proj's ([E·r, F], [H, r·E]) cut back into each expert's gate/up/down pairs."""
    e, r, f = cfg.num_experts, RANK, cfg.moe_intermediate_size
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace(".default", "")
        if ".mlp.experts." not in name:
            out["grad/" + name] = p.grad
            continue
        prefix, which = name.split(".mlp.experts.")[0], name.split(".lora_")[1][0]
        fused = ".base_layer." in name  # gate_up_proj (the inner wrapper), else down_proj
        g = p.grad
        n = 2 * r if fused else r
        g = g.view(e, n, -1) if which == "A" else g.view(g.shape[0], n, e).permute(2, 0, 1)
        for x in range(e):
            module = f"{prefix}.mlp.experts.{x}.".replace("base_model.model.", "")
            if not fused:
                out["grad/" + key(module + "down_proj", which)] = g[x]
                continue
            for j, leaf in enumerate(("gate_proj", "up_proj")):
                ranks = slice(j * r, (j + 1) * r)
                block = g[x, ranks] if which == "A" else g[x, j * f : (j + 1) * f, ranks]
                out["grad/" + key(module + leaf, which)] = block
    return out


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(base), str(adapter), is_trainable=True)


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> Path:
    """Base models (aux loss off: the reference loss is the LM loss), a random per-expert
    adapter each, and the reference logits and gradients (PEFT's for Qwen3-MoE too)."""
    from safetensors.torch import save_file

    from remote_runtime.tiny import build_model, build_tokenizer
    from tests.runtime.lora_worker import batch_tokens

    root = tmp_path_factory.mktemp("lora-moe")
    build_tokenizer(root / "tokenizer")
    for seed, family in enumerate(FAMILIES):
        base = root / family
        build_model(
            family, base, tokenizer_dir=root / "tokenizer", seed=seed, router_aux_loss_coef=0.0
        )
        model = _hf(base)
        adapter = random_adapter(model, root / f"adapter-{family}", seed=20 + seed)
        tokens = batch_tokens(model.config.vocab_size)
        ref = merged_reference(model, adapter, tokens)
        if family == PEFT_LOADS:
            peft = peft_model(base, root / f"adapter-{family}")
            logits = peft(tokens).logits
            mean_loss(logits, tokens).backward()
            ref["peft_logits"] = logits.detach()
            ref.update(
                {"peft_" + k: v for k, v in peft_per_expert_grads(peft, model.config).items()}
            )
        save_file(
            {k: v.contiguous() for k, v in ref.items()}, str(root / f"ref-{family}.safetensors")
        )
    return root


@pytest.fixture(scope="session")
def moe_runs(moe_models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora-moe-out")
    results = run_worker("single-moe", moe_models, out, WORKER)
    results.update(run_worker("parallel-moe", moe_models, out, WORKER))
    return out, results


def _reference_logits(models: Path, family: str, adapter: Path) -> torch.Tensor:
    """transformers' logits with an adapter directory: through PEFT where it loads one."""
    from safetensors.torch import load_file

    from tests.runtime.lora_worker import batch_tokens

    base = models / family
    with torch.no_grad():
        if family == PEFT_LOADS:
            model = peft_model(base, adapter).eval()
            return model(batch_tokens(model.config.vocab_size)).logits
        model = _hf(base)
        state = merged_state(model, load_file(str(adapter / "adapter_model.safetensors")))
        tokens = batch_tokens(model.config.vocab_size)
        return torch.func.functional_call(model, state, (tokens,)).logits


def test_merged_weight_reference_is_peft(moe_models):
    """On Qwen3-MoE PEFT loads the per-expert adapter onto the fused experts (rank 2r on
    gate_up_proj) and its logits and gradients equal the merged-weight reference's."""
    ref = _ref(moe_models, PEFT_LOADS)
    assert (ref["peft_logits"] - ref["logits"]).abs().max() <= TOL
    grads = {k: v for k, v in ref.items() if k.startswith("grad/")}
    assert sorted("peft_" + k for k in grads) == sorted(k for k in ref if k.startswith("peft_g"))
    assert any(".mlp.experts.7.up_proj.lora_B" in k for k in grads)
    scale = max(g.abs().max().item() for g in grads.values())
    assert max((ref["peft_" + k] - g).abs().max().item() for k, g in grads.items()) <= TOL * scale


@pytest.mark.parametrize("layout,family", CASES)
def test_logits_equal_reference(moe_models, moe_runs, layout, family):
    ours, ref = _tensors(moe_runs[0], layout, family), _ref(moe_models, family)
    expected = ref.get("peft_logits", ref["logits"])
    assert expected.abs().max() > 1.0
    assert (_flat(ours["logits"]) - _flat(expected)).abs().max() <= TOL


@pytest.mark.parametrize("layout,family", CASES)
def test_adapter_gradients_equal_reference(moe_models, moe_runs, layout, family):
    ours, ref = _tensors(moe_runs[0], layout, family), _ref(moe_models, family)
    prefix = "peft_grad/" if family == PEFT_LOADS else "grad/"
    grads = {k.removeprefix("peft_"): v for k, v in ref.items() if k.startswith(prefix)}
    experts = 2 * 8 * 3 * 2  # layers x experts x gate/up/down x A/B
    assert len(grads) == experts + 2 * 2 * (7 if family == "qwen2_moe" else 4)
    assert_gradients_match(ours, grads)


@pytest.mark.parametrize("layout,family", CASES)
def test_trained_adapter_loads_in_peft_and_reproduces_our_logits(
    moe_models, moe_runs, layout, family
):
    out = moe_runs[0]
    ours = _tensors(out, layout, family)
    adapter = out / f"adapter-{layout}-{family}"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ATTENTION + MLP)
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert (_flat(ours["trained"]) - _flat(ours["logits"])).abs().max() > 1e-2  # it trained
    logits = _reference_logits(moe_models, family, adapter)
    assert (_flat(logits) - _flat(ours["trained"])).abs().max() <= TOL


def test_saved_adapter_has_the_per_expert_layout(moe_models, moe_runs):
    """The names PEFT and vLLM read: every expert's gate/up/down pairs, nothing fused."""
    from safetensors import safe_open

    for layout, family in CASES:
        path = moe_runs[0] / f"adapter-{layout}-{family}" / "adapter_model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        ref = _ref(moe_models, family)
        assert keys == {k.removeprefix("grad/") for k in ref if k.startswith("grad/")}
        assert "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight" in keys


@pytest.mark.parametrize("layout,family", CASES)
def test_frozen_weights_are_bit_identical_after_training(moe_runs, layout, family):
    r = moe_runs[1][f"{layout}/{family}"]
    assert r["frozen_count"] > 0 and r["frozen_changed"] == []


@pytest.mark.parametrize("layout,family", CASES)
def test_merged_model_equals_peft_merge_and_unload(moe_models, moe_runs, layout, family):
    from safetensors.torch import load_file

    out = moe_runs[0]
    ours = _hf(out / f"merged-{layout}-{family}").state_dict()
    adapter = out / f"adapter-{layout}-{family}"
    base = moe_models / family
    if family == PEFT_LOADS:
        ref = peft_model(base, adapter).merge_and_unload().state_dict()
    else:
        model = _hf(base)
        with torch.no_grad():
            ref = merged_state(model, load_file(str(adapter / "adapter_model.safetensors")))
    assert_merged_matches(ours, ref, _tensors(out, layout, family))


def test_frozen_moe_base_is_lean(moe_runs):
    """bf16 Qwen3-MoE base: no gradient buffer, optimizer entry or main_grad for frozen
    weights (experts included); expert adapters are in DDP's expert buffer."""
    assert_lean(moe_runs[1]["lean"])


def test_grouped_gemm_path_equals_the_loop_and_skips_the_frozen_weight_gradient(monkeypatch):
    """The GPU path of an expert adapter (torch._grouped_mm with the experts' offsets; its bf16
    forward and backward run on CPU too) equals the per-expert loop, adds no weight-gradient
    GEMM for the frozen expert weight, and keeps the off-diagonal gate/up blocks of B at zero."""
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
    settings = LoraSettings(4, 8.0, 0.0, False, "false", [target])
    weight = torch.randn(4, 2 * 24, 32, dtype=torch.bfloat16)  # 4 local experts, F=24, H=32
    lay = Layout(1, 1, 1, 1, 1, tp=1, tp_rank=0, num_experts=8, ep=2, ep_rank=1)
    adapter = LoraAdapter(target, 3, settings, weight, lay, False)
    init_adapter(adapter, "false", 0)
    assert adapter.pairs()[0][0] == "model.layers.3.mlp.experts.4.gate_proj"  # EP rank 1
    assert adapter.lora_A.shape == (4, 8, 32) and adapter.lora_A.allreduce is False
    tokens_per_expert = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(16, 48, dtype=torch.bfloat16)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for offsets in (moe._offsets(tokens_per_expert, x.device), None):
        for t in (x, adapter.lora_A, adapter.lora_B):
            t.grad = None
        base = moe.grouped_linear(x, weight, tokens_per_expert, offsets, fuse_wgrad=True)
        adapter.add_grouped(x, base, tokens_per_expert, offsets).backward(dy)
        results.append([x.grad, adapter.lora_A.grad, adapter.lora_B.grad])
    # forward: W, A, B; backward: dx for all three, dA and dB, nothing for the frozen W
    assert len(calls) == 3 + 5
    for grouped, loop in zip(*results):
        torch.testing.assert_close(grouped, loop, rtol=0, atol=0)
    gate_up_b = results[0][2].view(4, 2, 24, 2, 4)  # [expert, gate/up rows, F, gate/up cols, r]
    assert gate_up_b[:, 0, :, 1].abs().max() == 0 and gate_up_b[:, 1, :, 0].abs().max() == 0
    assert gate_up_b[:, 0, :, 0].abs().max() > 0


def test_runtime_trains_saves_merges_and_resumes_lora_at_ep2(tmp_path):
    """`torchrun -m remote_runtime sft --train_type lora --expert_model_parallel_size 2`: the
    checkpoint is a per-expert PEFT adapter that PEFT loads, `--merge_lora` writes a model
    transformers loads with the same logits, and `--resume auto` continues the adapter and its
    optimizer state (expert adapters sharded by EP) to the same losses."""
    import shutil

    from tests.runtime.train_helpers import base_args, check, losses, make_assets, run_runtime

    model, data = make_assets(tmp_path, "qwen3_moe")
    lora = dict(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2)
    lora.update(train_iters=4, save_steps=2, expert_model_parallel_size=2)
    out = tmp_path / "out"
    check(run_runtime(base_args(model, data, out, merge_lora="true", **lora), nproc=2))
    ckpt = out / "checkpoint-4"
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        plain = _hf(model)(ids).logits
        adapted = peft_model(model, ckpt).eval()(ids).logits
        merged = _hf(out / "checkpoint-4-merged")(ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    assert (merged - adapted).abs().max() <= TOL
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    check(run_runtime(base_args(model, data, resumed, resume="auto", **lora), nproc=2))
    full, cont = losses(out), losses(resumed)
    assert sorted(cont) == [3, 4]
    for step in (3, 4):
        assert abs(cont[step] - full[step]) <= 1e-5 * abs(full[step]), (step, cont, full)
