"""DPO with LoRA on the real runtime (CPU, fp32) against TRL 1.16's DPOTrainer on a PEFT model.

PEFT makes an adapter with random A and B (init_lora_weights=False: the gradients of A and B
are both non-zero, and the policy differs from the base) and the runtime continues it
(`--adapters`). The reference without `--ref_model` is the base model, the policy with its
adapters disabled (ms-swift's choice; TRL 1.16 instead copies a continued adapter into a "ref"
adapter, so TRL's side drops that copy and takes its own adapters-disabled path, the one it
uses for a fresh adapter). With `--ref_model` the reference is that model on both sides.
Adapter gradients come from one Adam step as in test_dpo.py (checkpoints are PEFT adapters).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remote_runtime.spec.layout import DPO_METRICS_FIELDS
from tests.runtime.test_dpo import EPS, LR, dpo_args, our_tokens, reference_cache, trl_trainer_step
from tests.runtime.train_helpers import check, read_log, run_runtime

pytestmark = [pytest.mark.runtime]

ADAPTER = "adapter_model.safetensors"
# name -> (runtime flags, whether --ref_model is given); hinge shares ipo's and sigmoid's path
# (pair_losses, compared with TRL for full fine-tuning in test_dpo.py)
VARIANTS = {
    "sigmoid": ({"merge_lora": "true"}, False),
    "ipo": ({"loss_type": "ipo", "beta": 0.5}, True),
}
METRICS = DPO_METRICS_FIELDS


def _peft_policy(model_dir, adapter_dir=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    return get_peft_model(base, config)


@pytest.fixture(scope="module")
def random_adapter(dpo_assets, tmp_path_factory):
    model, _, _ = dpo_assets
    path = tmp_path_factory.mktemp("dpo-lora") / "adapter"
    torch.manual_seed(3)
    _peft_policy(model).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lora_runs(dpo_assets, random_adapter, tmp_path_factory):
    """run(variant, **extra) -> output directory; each distinct run happens once per module."""
    model, ref, pairs = dpo_assets
    root, done = tmp_path_factory.mktemp("dpo-lora-runs"), {}

    def run(variant: str, nproc: int = 1, **extra):
        key = (variant, nproc, tuple(sorted(extra.items())))
        if key not in done:
            flags, separate_ref = VARIANTS[variant]
            out = root / f"{variant}-{len(done)}"
            args = dpo_args(
                model,
                pairs,
                out,
                train_type="lora",
                adapters=random_adapter,
                lora_dropout=0,
                **flags,
                **({"ref_model": ref} if separate_ref else {}),
                **extra,
            )
            proc = run_runtime(args, nproc=nproc, task="rlhf")
            check(proc)
            done[key] = (out, proc.stdout)
        return done[key]

    return run


def _trl(dpo_assets, adapter, variant, tmp_path) -> dict:
    from transformers import AutoModelForCausalLM

    model, ref, pairs = dpo_assets
    flags, separate_ref = VARIANTS[variant]
    reference = (
        AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32)
        if separate_ref
        else None
    )

    def base_as_reference(trainer):
        # TRL 1.16 copies a continued adapter as the reference; drop the copy so that its
        # reference is the base (adapters disabled), as for a fresh adapter
        if reference is None:
            assert "ref" in trainer.model.peft_config
            trainer.model.delete_adapter("ref")

    return trl_trainer_step(
        model,
        _peft_policy(model, adapter),
        reference,
        our_tokens(model, pairs),
        [flags.get("loss_type", "sigmoid")],
        None,
        flags.get("beta", 0.1),
        tmp_path,
        prepare=base_as_reference,
    )


def _adapter_gradients(before, after) -> dict:
    """PEFT-named gradients from one Adam step with eps >> |g| (see test_dpo.our_gradients)."""
    from safetensors.torch import load_file

    w0, w1 = load_file(str(before / ADAPTER)), load_file(str(after / ADAPTER))
    assert sorted(w0) == sorted(w1)
    grads = {}
    for name, value in w0.items():
        u = value.double() - w1[name].double()
        grads[name] = u.sign() * u.abs() * EPS / (LR - u.abs())
    return grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_step_zero_matches_trl_with_a_peft_model(
    dpo_assets, random_adapter, lora_runs, variant, tmp_path
):
    out, stdout = lora_runs(variant)
    assert "LoRA r=4" in stdout and f"adapter from {random_adapter}" in stdout
    ours, theirs = read_log(out)[0], _trl(dpo_assets, random_adapter, variant, tmp_path)

    # per-document reference log-probs: the base (adapters disabled) or --ref_model
    np.testing.assert_allclose(reference_cache(out), theirs["ref"], rtol=1e-5, atol=1e-5)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    # a reward is beta times a difference of log-probs: 1e-5 relative to the log-probs
    beta = VARIANTS[variant][0].get("beta", 0.1)
    logp_scale = max(abs(ours["logps/chosen"]), abs(ours["logps/rejected"]))
    for name in METRICS:
        tol = 1e-5 * (beta * logp_scale if name.startswith("rewards/") else 1) + 1e-6
        assert ours[name] == pytest.approx(theirs["metrics"][name], rel=1e-5, abs=tol), name
    # the adapter moves the policy away from the reference: the comparison is not trivial
    assert abs(ours["rewards/margins"]) > 1e-3

    grads = _adapter_gradients(random_adapter, out / "checkpoint-1")
    theirs_grads = {n.replace(".default", ""): g for n, g in theirs["grads"].items()}
    assert sorted(theirs_grads) == sorted(grads) and len(grads) == 2 * 7 * 2  # A, B; 7; 2 layers
    scale = max(float(g.abs().max()) for g in theirs_grads.values())
    assert scale > 1e-3
    for name, g_trl in theirs_grads.items():
        assert float((grads[name].float() - g_trl).abs().max()) <= 1e-5 * scale + 1e-7, name


def test_lora_dpo_checkpoint_is_a_peft_adapter_and_merge_lora_writes_the_merged_model(
    dpo_assets, lora_runs
):
    from transformers import AutoModelForCausalLM

    model, _, _ = dpo_assets
    out, _ = lora_runs("sigmoid")
    ckpt = out / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_file()) == [
        "adapter_config.json",
        ADAPTER,
        "trainer_state.json",
    ]
    merged = AutoModelForCausalLM.from_pretrained(
        str(out / "checkpoint-1-merged"), dtype=torch.float32
    ).state_dict()
    expected = _peft_policy(model, ckpt).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected)
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5


def test_lora_dpo_tp2_gives_the_loss_of_one_process(lora_runs):
    one, _ = lora_runs("sigmoid")
    two, _ = lora_runs("sigmoid", nproc=2, tensor_model_parallel_size=2)
    (a,), (b,) = read_log(one), read_log(two)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-4, abs=1e-7)
    np.testing.assert_allclose(reference_cache(two), reference_cache(one), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ref_model,resumed,adapter,modules_to_save,separate",
    [
        (None, False, None, [], False),  # fresh adapter: the policy, adapters disabled
        (None, True, None, [], False),  # resumed: still the base under the adapters
        (None, False, "/a", [], False),  # continued adapter: the base, not the adapter
        (None, True, None, ["lm_head"], True),  # trained lm_head loaded: build the base
        (None, False, "/a", ["embed_tokens"], True),
        (None, False, None, ["lm_head"], False),  # fresh: lm_head is still the base's
        ("/ref", False, None, [], True),  # --ref_model: that model
    ],
)
def test_which_lora_runs_build_a_separate_reference_model(
    ref_model, resumed, adapter, modules_to_save, separate
):
    from remote_runtime.spec.config import JobConfig
    from remote_runtime.spec.tuner import LoraSettings
    from remote_runtime.train.entry import _separate_reference

    job = JobConfig(task="rlhf")
    job.rlhf.ref_model = ref_model
    lora = LoraSettings(4, 8.0, 0.0, False, "true", [], modules_to_save, adapter)
    assert _separate_reference(job, "/ckpt" if resumed else None, lora) is separate
    assert _separate_reference(job, "/ckpt" if resumed else None, None) is (
        resumed or bool(ref_model)
    )
