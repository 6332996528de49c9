"""LoRA on megatron-core against PEFT 0.21 on CPU (fp32), tiny Llama, Qwen2 and Qwen3.

PEFT makes an adapter with random A and B (init_lora_weights=False) on every linear layer; our
runtime continues it (`--adapters`), so both sides start from the same weights. At TP=1, TP=2,
TP=2 with sequence parallelism and PP=2: the logits equal PEFT's, the adapter gradients of one
mean-loss backward equal PEFT's, after three Adam steps PEFT loading our saved adapter gives our
logits, no frozen weight changed, and our merged model equals PEFT's merge_and_unload().

The megatron side runs in `lora_worker.py` (one process, then two gloo processes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runtime.test_bridge import _run_worker as run_worker

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("lora_worker.py")
FAMILIES = ("qwen3", "qwen2", "llama")
# qwen3-qv: adapters on q_proj, v_proj and down_proj only (k_proj's rows of the fused B stay 0)
ADAPTERS = {**{f: "all-linear" for f in FAMILIES}, "qwen3-qv": ["q_proj", "v_proj", "down_proj"]}
TOL = 1e-4
CASES = (
    [("tp1", f) for f in ADAPTERS]
    + [("tp2", f) for f in ADAPTERS]
    + [("pp2", f) for f in FAMILIES]
    + [("tp2sp", "qwen3")]
)


def _peft(base_dir: Path, adapter: Path | None = None, **config):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter is not None:
        return PeftModel.from_pretrained(base, str(adapter))
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **config))


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory) -> Path:
    """Base models, a PEFT adapter with random A and B for each, and PEFT's reference logits and
    adapter gradients on the worker's batch."""
    from safetensors.torch import save_file

    from remote_runtime.tiny import build_model, build_tokenizer
    from tests.runtime.lora_worker import batch_tokens

    root = tmp_path_factory.mktemp("lora-models")
    build_tokenizer(root / "tokenizer")
    for seed, (name, targets) in enumerate(ADAPTERS.items()):
        base = root / name.split("-")[0]
        if not base.exists():
            build_model(base.name, base, tokenizer_dir=root / "tokenizer", seed=seed)
        torch.manual_seed(10 + seed)
        model = _peft(
            base,
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=targets,
            init_lora_weights=False,
        )
        model.save_pretrained(str(root / f"adapter-{name}"))
        tokens = batch_tokens(model.config.vocab_size)
        out = model(tokens, labels=tokens)  # HF shifts; ours uses the rolled labels (below)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.roll(tokens, -1, 1).reshape(-1)
        )
        loss.backward()
        ref = {"logits": logits.detach()}
        for pname, p in model.named_parameters():
            if p.requires_grad:
                ref["grad/" + pname.replace(".default", "")] = p.grad
        save_file(ref, str(root / f"ref-{name}.safetensors"))
    return root


@pytest.fixture(scope="session")
def lora_runs(lora_models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora-out")
    results = run_worker("single", lora_models, out, WORKER)
    results.update(run_worker("parallel", lora_models, out, WORKER))
    return out, results


def _tensors(out: Path, tag: str, family: str) -> dict:
    from safetensors.torch import load_file

    found = {}
    for path in out.glob(f"{tag}-{family}-rank*.safetensors"):
        found.update(load_file(str(path)))
    return found


def _ref(models: Path, family: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(models / f"ref-{family}.safetensors"))


def _vocab(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("layout,family", CASES)
def test_logits_equal_peft(lora_models, lora_runs, layout, family):
    ours, ref = _tensors(lora_runs[0], layout, family), _ref(lora_models, family)
    assert ref["logits"].abs().max() > 1.0
    assert (_vocab(ours["logits"]) - _vocab(ref["logits"])).abs().max() <= TOL


@pytest.mark.parametrize("layout,family", CASES)
def test_adapter_gradients_equal_peft(lora_models, lora_runs, layout, family):
    ours, ref = _tensors(lora_runs[0], layout, family), _ref(lora_models, family)
    grads = {k: v for k, v in ref.items() if k.startswith("grad/")}
    assert len(grads) == 2 * 2 * (3 if family.endswith("-qv") else 7)
    assert_gradients_match(ours, grads)


def assert_gradients_match(ours: dict, grads: dict) -> None:
    """Our `grad/<PEFT key>` tensors are exactly `grads`' keys, each within TOL of the largest
    reference gradient."""
    assert sorted(k for k in ours if k.startswith("grad/")) == sorted(grads)
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 1e-3
    worst = max((ours[k] - g).abs().max().item() for k, g in grads.items())
    assert worst <= TOL * scale, (worst, scale)


@pytest.mark.parametrize("layout,family", CASES)
def test_trained_adapter_loads_in_peft_and_reproduces_our_logits(
    lora_models, lora_runs, layout, family
):
    from tests.runtime.lora_worker import batch_tokens

    out = lora_runs[0]
    ours = _tensors(out, layout, family)
    adapter = out / f"adapter-{layout}-{family}"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8
    base = lora_models / family.split("-")[0]
    assert config["base_model_name_or_path"] == str(base)
    model = _peft(base, adapter).eval()
    with torch.no_grad():
        logits = model(batch_tokens(model.config.vocab_size)).logits
    assert (_vocab(ours["trained"]) - _vocab(ours["logits"])).abs().max() > 1e-2  # it trained
    assert (_vocab(logits) - _vocab(ours["trained"])).abs().max() <= TOL


@pytest.mark.parametrize("layout,family", CASES)
def test_frozen_weights_are_bit_identical_after_training(lora_runs, layout, family):
    r = lora_runs[1][f"{layout}/{family}"]
    assert r["frozen_count"] > 0 and r["frozen_changed"] == []


@pytest.mark.parametrize("layout,family", CASES)
def test_merged_model_equals_peft_merge_and_unload(lora_models, lora_runs, layout, family):
    from transformers import AutoModelForCausalLM

    out = lora_runs[0]
    ours = AutoModelForCausalLM.from_pretrained(
        str(out / f"merged-{layout}-{family}"), dtype=torch.float32
    ).state_dict()
    base = lora_models / family.split("-")[0]
    ref = _peft(base, out / f"adapter-{layout}-{family}").merge_and_unload()
    assert_merged_matches(ours, ref.state_dict(), _tensors(out, layout, family))


def assert_merged_matches(ours: dict, ref: dict, logits: dict) -> None:
    """Our merged HF state dict equals the reference's; our model's logits after merging equal
    those with the adapters."""
    assert sorted(ours) == sorted(ref)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    assert (_vocab(logits["merged"]) - _vocab(logits["trained"])).abs().max() <= TOL


def test_frozen_base_is_lean(lora_runs):
    """bf16 base: no gradient buffer, no optimizer entry, no main_grad for frozen weights."""
    assert_lean(lora_runs[1]["lean"])


def assert_lean(r: dict) -> None:
    """What lora_worker.lean_base measured: only the adapters hold gradients and states."""
    assert r["frozen_bf16"] and r["frozen_with_main_grad"] == 0
    assert r["grad_buffer_numel"] == r["lora_numel"] > 0
    assert r["optimizer_numel"] == r["lora_numel"]
