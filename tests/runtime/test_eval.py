"""Evaluation during training (sft, pt) on the real runtime, CPU + gloo through torchrun."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.runtime.train_helpers import base_args, check, losses, read_log, run_runtime

pytestmark = [pytest.mark.runtime]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, train_assets):
    """The session's tiny Qwen3; 32 training rows, 10 validation rows, 32 pretraining texts."""
    from remote_runtime.data.demo_data import write_demo_dataset, write_demo_pretrain

    root = tmp_path_factory.mktemp("eval-assets")
    model = train_assets[0]
    data = write_demo_dataset(root / "data.jsonl", num_rows=32)
    val = write_demo_dataset(root / "val.jsonl", num_rows=10, seed=5)
    text = write_demo_pretrain(root / "text.jsonl", num_rows=32)
    return model, data, val, text


@pytest.mark.parametrize("task", ["sft", "pt"])
def test_evaluation_does_not_change_the_training_trajectory(
    assets, train_assets, shared_runs, task, tmp_path
):
    """The same job with and without a val_dataset evaluated every 2 steps: identical training
    losses and gradient norms, and eval records at steps 2, 4 and the end (5). SFT trains on the
    session's shared model and data: its run without evaluation is test_train's one-process
    reference run."""
    model, _, val, text = assets
    train = train_assets[1] if task == "sft" else text
    plain, evaluated = shared_runs.get(model, train, task=task), tmp_path / "eval"
    check(
        run_runtime(
            base_args(
                model, train, evaluated, val_dataset=val if task == "sft" else text, eval_interval=2
            ),
            task=task,
        )
    )
    a, b = read_log(plain), read_log(evaluated)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in b
    ]
    assert [r["step"] for r in b if "eval_loss" in r] == [2, 4, 5]
    assert all(r["eval_loss"] > 0 and r["eval_tokens"] > 0 for r in b if "eval_loss" in r)
    assert not any("eval_loss" in r for r in a)


def test_split_eval_loss_equals_the_token_mean_over_the_held_out_rows(assets, tmp_path):
    """split_dataset_ratio holds out ceil(ratio x rows) rows chosen by the seed; the final
    eval_loss is the token-weighted loss of exactly those rows under the final checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remote_runtime.data.chat import ChatEncoder
    from remote_runtime.data.validation import split_units

    model, data, _, _ = assets
    out = tmp_path / "out"
    proc = run_runtime(
        base_args(
            model,
            data,
            out,
            split_dataset_ratio=0.25,
            train_iters=3,
            eval_iters=-1,
            dataset_num_proc=1,
        )
    )
    check(proc)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train_rows, held = split_units(len(rows), 0.25, seed=1)
    assert len(held) == 8 and len(train_rows) == 24
    assert (
        "validation: 8 rows held out (split_dataset_ratio 0.25, seed 1), 24 rows left"
        in proc.stdout
    )
    record = read_log(out)[-1]
    assert record["step"] == 3 and record["eval_samples"] == 8

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3", dtype=torch.float32)
    encoder = ChatEncoder(tok)
    total, count = 0.0, 0
    for i in held:
        ids, mask = encoder.encode_chat(rows[i]["messages"])
        ids, mask = ids[:64], mask[:64]  # max_length 64, truncation right
        ids_t = torch.as_tensor(ids.astype(np.int64))[None]
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(
                hf(ids_t).logits[0, :-1], ids_t[0, 1:], reduction="none"
            )
        weight = torch.as_tensor(mask[1:], dtype=torch.float32)
        total += float((ce * weight).sum())
        count += int(weight.sum())
    assert record["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_iters_limits_the_evaluated_batches(assets, tmp_path):
    model, data, val, _ = assets
    out = tmp_path / "out"
    check(
        run_runtime(
            base_args(
                model, data, out, val_dataset=val, eval_iters=1, train_iters=2, eval_steps=1000
            ),
            nproc=2,
        )
    )
    records = [r for r in read_log(out) if "eval_loss" in r]
    assert [r["step"] for r in records] == [2]  # only the end: eval_steps is past the run
    assert records[0]["eval_samples"] == 4  # one global batch of the 10 held-out rows
    assert sorted(losses(out)) == [1, 2]
