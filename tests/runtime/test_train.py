"""The training loop on real megatron-core, CPU + gloo, through torchrun like on the nodes."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.runtime.train_helpers import (
    REPO,
    base_args,
    check,
    losses,
    read_log,
    run_runtime,
)

pytestmark = [pytest.mark.runtime]


@pytest.fixture(scope="module")
def assets(train_assets):
    return train_assets


def test_thirty_steps_halve_the_loss_and_write_a_loadable_checkpoint(assets, tmp_path):
    model, data = assets
    out = tmp_path / "out"
    proc = run_runtime(
        base_args(
            model,
            data,
            out,
            train_iters=30,
            lr=3e-3,
            min_lr=3e-4,
            global_batch_size=8,
            lr_warmup_iters=2,
            logging_steps=5,
            packing="true",
        )
    )
    check(proc)
    # megatron-core's and torch's chatter goes to the debug log, one line names the accelerators
    shown, debug = proc.stdout + proc.stderr, (out / "logs" / "debug-rank0.log").read_text()
    assert "accelerators: none, 1 CPU process(es) (gloo)" in shown
    for chatter in ("Params for bucket", "OptimizerConfig(", "Transformer Engine and Apex"):
        assert chatter not in shown, shown
    assert "Params for bucket" in debug and "OptimizerConfig(" in debug
    log = read_log(out)
    first, last = log[0], log[-1]
    assert first["step"] == 1 and last["step"] == 30
    assert last["loss"] <= first["loss"] / 2, [(r["step"], r["loss"]) for r in log]
    for field in (
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_gpu",
        "peak_mem_gb",
        "eta_s",
        "epoch",
        "tokens",
        "loss_tokens",
    ):
        assert field in last
    assert last["tokens"] > 0 and last["loss_tokens"] > 0 and last["tflops_per_gpu"] > 0
    ckpt = out / "checkpoint-30"
    assert (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "megatron_state" / "optimizer" / "metadata.json").is_file()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()
    # The trained weights differ from the starting ones.
    start = AutoModelForCausalLM.from_pretrained(model)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(hf.state_dict()[name], start.state_dict()[name])


def test_tp2_pp2_dp2_give_the_same_loss_curve_as_one_process(assets, shared_runs, tmp_path):
    """Same data, same start weights: the loss curves agree. Step 1 agrees to fp32 rounding;
    after that Adam's normalised updates amplify reduction-order differences (a parameter whose
    gradient is near zero can step either way), so later steps agree to ~1e-4 relative."""
    model, data = assets
    curves = {"tp1": losses(shared_runs.get(model, data))}  # also test_eval's run without eval
    for label, nproc, extra in [
        ("tp2", 2, {"tensor_model_parallel_size": 2}),
        ("pp2", 2, {"pipeline_model_parallel_size": 2}),
        ("dp2", 2, {}),
    ]:
        out = tmp_path / label
        check(run_runtime(base_args(model, data, out, **extra), nproc=nproc))
        curves[label] = losses(out)
    ref = curves["tp1"]
    assert sorted(ref) == [1, 2, 3, 4, 5]
    for label, curve in curves.items():
        assert curve[1] == pytest.approx(ref[1], rel=1e-6), (label, curve, ref)
        for step, value in ref.items():
            assert curve[step] == pytest.approx(value, rel=5e-4), (label, curve, ref)
    assert ref[5] < ref[1]  # it trains


BF16_MOMENTS = dict(use_precision_aware_optimizer="true", exp_avg_dtype="bf16")


@pytest.mark.parametrize("moments", [{}, BF16_MOMENTS], ids=["fp32-moments", "bf16-moments"])
def test_resume_after_step_3_repeats_steps_4_to_6(assets, tmp_path, moments):
    """A run resumed from its step-3 checkpoint gives the losses of the uninterrupted run (as in
    test_lora_train: the checkpoint is copied into a fresh output directory, so one run is both
    the reference and the source of the checkpoint). Also with a bf16 first moment (megafleet's
    AdamW; megatron's checkpoint stores it in fp32 and casts it back). Resuming with a changed
    train_iters is covered by tests/fleet/test_faults_fleet.py (real runtime, two nodes)."""
    model, data = assets
    opts = dict(lr_decay_style="constant", min_lr=0, train_iters=6, save_steps=3, **moments)
    full = tmp_path / "full"
    proc = run_runtime(base_args(model, data, full, **opts))
    check(proc)
    if moments:
        assert "moments exp_avg bf16, exp_avg_sq fp32" in proc.stdout + proc.stderr
    assert sorted(losses(full)) == [1, 2, 3, 4, 5, 6]
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    check(run_runtime(base_args(model, data, part, resume="auto", **opts)))
    resumed, reference = losses(part), losses(full)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (resumed, reference)


def test_sigterm_mid_run_saves_a_loadable_checkpoint_and_exits_zero(assets, tmp_path):
    model, data = assets
    out = tmp_path / "out"
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = base_args(model, data, out, train_iters=1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "remote_runtime", "sft", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_log(out)) < 2:
        time.sleep(0.2)
    assert read_log(out), proc.communicate()[0] if proc.poll() is not None else "no progress"
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("no exit within 120 s of SIGTERM:\n" + proc.communicate()[0][-3000:])
    assert proc.returncode == 0, output[-3000:]
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file(), output[-2000:]
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 1000

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(saved[0])


def test_packed_loss_is_the_token_weighted_sum_of_document_losses(assets, tmp_path):
    """One step's loss with three documents packed together equals the loss computed by
    transformers on each document separately, summed over loss tokens."""
    model, _ = assets
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4, of course."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Name a fox."},
                {"role": "assistant", "content": "The quick brown fox."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "Hi there!"},
            ]
        },
    ]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    check(
        run_runtime(
            base_args(
                model,
                data,
                out,
                train_iters=1,
                global_batch_size=3,
                micro_batch_size=3,
                padding_free="true",
                max_length=256,
                dataset_shuffle="false",
                lr=1e-9,
                min_lr=0,
            )
        )
    )
    packed_loss = read_log(out)[0]["loss"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remote_runtime.data.chat import ChatEncoder

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    encoder = ChatEncoder(tok)
    total, count = 0.0, 0
    for row in rows:
        ids, mask = encoder.encode_chat(row["messages"])
        ids_t = torch.tensor([ids.tolist()])
        with torch.no_grad():
            logits = hf(ids_t).logits[0, :-1]
        target = ids_t[0, 1:]
        weight = torch.tensor(mask[1:].tolist(), dtype=torch.float32)
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        total += float((ce * weight).sum())
        count += int(weight.sum())
    assert packed_loss == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--tensor_model_parallel_size", "3"], "parallel.tensor_model_parallel_size"),
        (
            ["--pipeline_model_parallel_size", "3", "--global_batch_size", "4"],
            "parallel.pipeline_model_parallel_size",
        ),
        (["--global_batch_size", "6", "--micro_batch_size", "4"], "train.global_batch_size"),
        (["--tensor_model_parallel_size", "4"], "parallel.tensor_model_parallel_size"),
    ],
)
def test_dry_run_rejects_bad_parallel_arithmetic_naming_the_field(assets, flags, field, tmp_path):
    model, data = assets
    env = {"WORLD_SIZE": "4"}
    args = [
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--train_iters",
        "2",
        "--dry_run",
        "true",
        *flags,
    ]
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "remote_runtime", "sft", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert field in proc.stderr


def test_dry_run_prints_resolved_config_without_torch(assets):
    model, data = assets
    import os

    code = (
        "import sys, runpy; sys.argv=['x','sft','--model',%r,'--dataset',%r,'--train_iters','2',"
        "'--dry_run','true','--tensor_model_parallel_size','2'];"
        "from remote_runtime.__main__ import main; rc=main(sys.argv[1:]);"
        "assert 'torch' not in sys.modules, 'dry run imported torch'; sys.exit(rc)"
    ) % (str(model), str(data))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": "2", "NNODES": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["world_size"] == 4 and resolved["parallel"]["data_parallel_size"] == 2
    tc = resolved["transformer_config"]
    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
    ):
        assert key in tc
    assert resolved["model"]["padded_vocab_size"] % 256 == 0
    assert not math.isnan(resolved["batch"]["num_microbatches"])


def test_context_parallel_without_transformer_engine_is_a_config_error(assets, tmp_path):
    model, data = assets
    proc = run_runtime(base_args(model, data, tmp_path / "out", context_parallel_size=2), nproc=2)
    assert proc.returncode != 0
    assert "parallel.context_parallel_size: 2 needs transformer-engine" in proc.stdout + proc.stderr


def test_parameters_off_the_training_device_are_named_before_ddp():
    """A frozen weight left on another device (megatron's Router builds its weight on the CPU)
    is named, instead of DDP's broadcast failing without a name."""
    import torch

    from remote_runtime.train.optim import check_one_device

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_one_device([model])
    model[2].to("meta")
    with pytest.raises(RuntimeError) as e:
        check_one_device([model])
    assert "not all on cpu (meta: chunk 0: 2.weight, chunk 0: 2.bias)" in str(e.value)
