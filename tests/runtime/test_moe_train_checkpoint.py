"""Training a tiny Qwen3-MoE at EP2 writes Hugging Face checkpoints through the bridge (per-expert
names, loadable by transformers), and a resume with another expert layout is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from tests.runtime.train_helpers import base_args, check, make_assets, run_runtime

pytestmark = pytest.mark.runtime


def test_ep2_training_checkpoint_is_a_hub_checkpoint_and_resume_checks_ep(tmp_path):
    from transformers import AutoModelForCausalLM

    model, data = make_assets(tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    check(
        run_runtime(
            base_args(model, data, out, train_iters=2, save_steps=2, expert_model_parallel_size=2),
            nproc=2,
        )
    )
    saved = out / "checkpoint-2"
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    trained = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    moved = {
        n
        for n, p in trained.named_parameters()
        if not torch.equal(p, dict(source.named_parameters())[n])
    }
    assert any(".mlp.experts." in n for n in moved)  # the experts were trained and written

    proc = run_runtime(
        base_args(model, data, out, train_iters=3, save_steps=2, resume="auto"), nproc=2
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "layout" in text and "'ep': 2" in text, text[-3000:]
