"""LoRA through the real runtime (`torchrun -m remote_runtime sft --train_type lora`), on CPU:
PEFT adapter checkpoints, the merged model, and `--resume auto` continuing the adapter and its
optimizer state exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.runtime.train_helpers import base_args, check, losses, run_runtime

pytestmark = [pytest.mark.runtime]

LORA = {
    "train_type": "lora",
    "lora_rank": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "train_iters": 6,
    "save_steps": 3,
    "lr": 1e-2,
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, train_assets):
    model, data = train_assets
    out = tmp_path_factory.mktemp("lora-train") / "out"
    proc = run_runtime(base_args(model, data, out, merge_lora="true", **LORA))
    check(proc)
    return model, data, out, proc.stdout


def test_checkpoints_are_peft_adapters(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, out, stdout = lora_run
    assert "LoRA r=4" in stdout
    ckpt = out / "checkpoint-6"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_file()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
    ]
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model) and config["r"] == 4
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, str(ckpt)).eval()
        adapted = peft(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(
            str(out / "checkpoint-6-merged"), dtype=torch.float32
        )(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapter learned something
    assert (merged - adapted).abs().max() <= 1e-4


def test_resume_auto_continues_adapter_and_optimizer(lora_run, tmp_path):
    model, data, out, _ = lora_run
    resumed = tmp_path / "out"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    check(run_runtime(base_args(model, data, resumed, resume="auto", **LORA)))
    full, cont = losses(out), losses(resumed)
    assert sorted(cont) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(cont[step] - full[step]) <= 1e-5 * abs(full[step]), (step, cont, full)
