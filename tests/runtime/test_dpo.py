"""DPO on the real runtime (torchrun, megatron-core, CPU, fp32) against TRL's DPOTrainer.

TRL's side is the trainer's own loss path (`DPOTrainer._compute_loss`: its model call, per-token
log-probs, loss types, `sft` term and metrics) on a batch built from our tokens: TRL tokenizes
the prompt and the answers separately and trains the newline after `<|im_end|>`, our rows are
tokenized as in SFT (the assistant turn through its end marker), so feeding TRL its own
tokenization would compare different sequences. Our per-pair log-probs are the reference cache
the runtime writes; our gradients are read back from the checkpoint after one Adam step with
eps >> |g| (then the update lr·g/(|g|+eps) inverts exactly to g).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.runtime.conftest import DPO_PAIRS as PAIRS
from tests.runtime.train_helpers import base_args, check, read_log, run_runtime

pytestmark = [pytest.mark.runtime]

LR, EPS = 1e3, 1e3
# name -> (runtime flags, TRL loss_type, TRL loss_weights, whether a separate reference is used)
VARIANTS = {
    "sigmoid": ({}, ["sigmoid"], None, False),
    "ipo": ({"loss_type": "ipo", "beta": 0.5}, ["ipo"], None, True),
    "hinge": ({"loss_type": "hinge", "beta": 2.0}, ["hinge"], None, True),
    "rpo": ({"rpo_alpha": 0.7}, ["sigmoid", "sft"], [1.0, 0.7], True),
}


def dpo_args(model, pairs, out, **kw):
    opts = dict(
        global_batch_size=PAIRS,
        micro_batch_size=3,
        train_iters=1,
        lr=LR,
        min_lr=0,
        adam_eps=EPS,
        clip_grad=0,
        weight_decay=0,
        lr_decay_style="constant",
        dataset_shuffle="false",
        max_length=64,
    )
    opts.update(kw)
    return base_args(model, pairs, out, **opts)


def our_tokens(model, pairs) -> list[tuple]:
    """(ids, mask) of chosen and rejected per row, as the runtime tokenizes them."""
    from transformers import AutoTokenizer

    from remote_runtime.data.chat import ChatEncoder
    from remote_runtime.spec.formats import detect_format, row_to_example

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(model))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    fmt = detect_format(rows[0])
    return [tuple(encoder.encode_chat(m) for m in row_to_example(r, fmt)) for r in rows]


def trl_batch(tokens, pad_id: int) -> dict:
    """TRL's collated layout: every chosen sequence, then every rejected one, right-padded."""
    import torch

    seqs = [c for c, _ in tokens] + [r for _, r in tokens]
    width = max(len(ids) for ids, _ in seqs)
    batch = {
        k: torch.zeros(len(seqs), width, dtype=torch.long)
        for k in ("input_ids", "attention_mask", "completion_mask")
    }
    batch["input_ids"].fill_(pad_id)
    for i, (ids, mask) in enumerate(seqs):
        batch["input_ids"][i, : len(ids)] = torch.as_tensor(ids.astype(np.int64))
        batch["attention_mask"][i, : len(ids)] = 1
        batch["completion_mask"][i, : len(ids)] = torch.as_tensor(mask.astype(np.int64))
    return batch


def trl_step(model_dir, ref_dir, tokens, loss_type, weights, beta, tmp_path) -> dict:
    """TRL's loss, metrics, per-sequence log-probs and gradients on one batch of all pairs."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    return trl_trainer_step(
        model_dir, policy, reference, tokens, loss_type, weights, beta, tmp_path
    )


def trl_trainer_step(
    model_dir, policy, reference, tokens, loss_type, weights, beta, tmp_path, prepare=None
) -> dict:
    """trl_step with the models given (a PEFT policy: `reference` None means TRL's own
    adapter-based reference; `prepare(trainer)` may adjust the trainer before the step)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    dummy = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
        ]
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=loss_type,
        loss_weights=weights,
        use_cpu=True,
        report_to=[],
        bf16=False,
        per_device_train_batch_size=PAIRS,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dummy, processing_class=tok
    )
    if prepare is not None:
        prepare(trainer)
    batch = trl_batch(tokens, tok.pad_token_id or 0)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {
        n: p.grad.detach().clone()
        for n, p in trainer.model.named_parameters()
        if p.grad is not None
    }
    per_doc = {}
    with torch.no_grad():
        # without a ref_model, TRL's compute_ref_log_probs runs a PEFT policy adapters-disabled
        per_doc["ref"] = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)
        if reference is not None:
            per_doc["policy"] = trainer.compute_ref_log_probs(trainer.model, batch)
    return {
        "loss": float(loss),
        "metrics": metrics,
        "grads": grads,
        **{k: torch.stack(v, 1).reshape(-1).double().numpy() for k, v in per_doc.items()},
    }


def answer_logps(model_dir, tokens):
    """(sums, counts) [pairs, 2] (chosen, rejected) of answer-token log-probs by transformers
    (float64 log-softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    sums, counts = [], []
    for pair in tokens:
        for ids, mask in pair:
            ids_t = torch.as_tensor(ids.astype(np.int64))[None]
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids_t).logits[0, :-1].double(), -1)
            picked = lp.gather(1, ids_t[0, 1:, None])[:, 0]
            m = torch.as_tensor(mask[1:], dtype=torch.double)
            sums.append(float((picked * m).sum()))
            counts.append(float(m.sum()))
    as_pairs = lambda v: torch.tensor(v, dtype=torch.double).reshape(-1, 2)  # noqa: E731
    return as_pairs(sums), as_pairs(counts)


def our_gradients(model_dir, checkpoint) -> dict:
    """g from one Adam step: u = w0 - w1 = lr·g/(|g|+eps)  =>  g = sign(u)·|u|·eps/(lr-|u|)."""
    from safetensors.torch import load_file

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    w0, w1 = weights(model_dir), weights(checkpoint)
    grads = {}
    for name, before in w0.items():
        u = before.double() - w1[name].double()
        grads[name] = u.sign() * u.abs() * EPS / (LR - u.abs())
    return grads


def reference_cache(out) -> np.ndarray:
    (path,) = sorted((out / ".data_cache").glob("reference-*.npy"))
    return np.load(path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_zero_matches_trl_dpo_trainer(dpo_assets, variant, tmp_path):
    model, ref, pairs = dpo_assets
    flags, loss_type, weights, separate_ref = VARIANTS[variant]
    beta = flags.get("beta", 0.1)
    out = tmp_path / "out"
    extra = {**flags, **({"ref_model": ref} if separate_ref else {})}
    check(run_runtime(dpo_args(model, pairs, out, **extra), task="rlhf"))
    ours = read_log(out)[0]
    theirs = trl_step(
        model,
        ref if separate_ref else model,
        our_tokens(model, pairs),
        loss_type,
        weights,
        beta,
        tmp_path,
    )

    # Per-pair sequence log-probs: the runtime's reference cache (the policy's own at step 0
    # when no --ref_model is given).
    expected = theirs["ref"] if separate_ref else theirs["policy"]
    np.testing.assert_allclose(reference_cache(out), expected, rtol=1e-5, atol=1e-5)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert ours[name] == pytest.approx(theirs["metrics"][name], rel=1e-5, abs=1e-6), name
    if variant != "sigmoid":
        assert ours["rewards/margins"] != 0  # a real reference: the comparison is not trivial

    grads = our_gradients(model, out / "checkpoint-1")
    compared = 0
    for name, g_trl in theirs["grads"].items():
        g = grads[name].float()
        scale = max(float(g_trl.abs().max()), 1e-3)
        assert float((g - g_trl).abs().max()) <= 1e-5 * scale + 1e-7, name
        compared += 1
    assert compared == len(theirs["grads"]) and compared > 10


def test_tp2_pp2_and_dp2_give_the_loss_of_one_process(dpo_assets, tmp_path):
    model, ref, pairs = dpo_assets
    losses = {}
    for label, nproc, extra in [
        ("tp1", 1, {}),
        ("tp2", 2, {"tensor_model_parallel_size": 2}),
        ("pp2", 2, {"pipeline_model_parallel_size": 2}),
        ("dp2", 2, {}),
    ]:
        out = tmp_path / label
        args = dpo_args(
            model,
            pairs,
            out,
            ref_model=ref,
            lr=1e-5,
            adam_eps=1e-8,
            train_iters=2,
            micro_batch_size=1,
            **extra,
        )
        check(run_runtime(args, nproc=nproc, task="rlhf"))
        losses[label] = [(r["loss"], r["rewards/margins"]) for r in read_log(out)]
    for label in ("tp2", "pp2", "dp2"):
        for (loss, margin), (ref_loss, ref_margin) in zip(losses[label], losses["tp1"]):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (label, losses)
            assert margin == pytest.approx(ref_margin, rel=1e-4, abs=1e-7), (label, losses)
    assert len(losses["tp1"]) == 2 and losses["tp1"][1][0] != losses["tp1"][0][0]


def test_eval_loss_is_the_dpo_loss_of_the_held_out_pairs(dpo_assets, tmp_path):
    """The end-of-training eval on a val_dataset equals the DPO loss computed by hand with
    transformers: the trained checkpoint against the reference model, pair by pair."""
    import torch.nn.functional as F

    model, ref, pairs = dpo_assets
    out = tmp_path / "out"
    check(
        run_runtime(
            dpo_args(
                model,
                pairs,
                out,
                ref_model=ref,
                val_dataset=pairs,
                lr=1e-3,
                adam_eps=1e-8,
                beta=0.2,
            ),
            task="rlhf",
        )
    )
    record = read_log(out)[-1]
    tokens = our_tokens(model, pairs)
    policy, reference = answer_logps(out / "checkpoint-1", tokens)[0], answer_logps(ref, tokens)[0]
    delta = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    expected = float(-F.logsigmoid(0.2 * delta).mean())
    assert record["eval_loss"] == pytest.approx(expected, rel=1e-5)
    accuracy = float((delta > 0).double().mean())
    assert record["eval_rewards/accuracies"] == pytest.approx(accuracy)
    assert record["eval_samples"] == PAIRS


def test_the_dpo_template_launches_locally_and_status_shows_rewards_and_eval(
    dpo_assets, megafleet_home, tmp_path
):
    """`megafleet render dpo` -> `launch --local` (the real runtime through torchrun) -> `status`
    shows the DPO reward accuracy and the latest eval loss."""
    from megafleet import templates
    from megafleet.jobs.launch import LaunchOptions, launch_job
    from tests.conftest import run_cli, run_cli_json
    from tests.runtime.train_helpers import free_port

    model, _, _ = dpo_assets
    from remote_runtime.data.demo_data import write_demo_preferences

    pairs = write_demo_preferences(tmp_path / "pairs.jsonl", num_rows=12)
    sets = [
        f"model={model}",
        f"dataset={pairs}",
        "train_iters=3",
        "device=cpu",
        "torch_dtype=float32",
        "max_length=64",
        "global_batch_size=4",
        "micro_batch_size=2",
        "packing=false",
        "split_dataset_ratio=0.2",
        "eval_steps=2",
        "logging_steps=1",
        f"master_port={free_port()}",
        f"output_dir={tmp_path / 'out'}",
        "lr=1e-4",
    ]
    job = templates.job_from_template(templates.get_template("dpo"), sets)
    assert (job.task, job.rlhf.rlhf_type, job.rlhf.beta) == ("rlhf", "dpo", None)  # 0.1
    run = launch_job(job, LaunchOptions(local=True))
    env = {"MEGAFLEET_HOME": str(megafleet_home)}
    proc = run_cli("logs", run.run_id, "-f", env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation: 3 rows held out" in proc.stdout and "reward acc" in proc.stdout
    _, status = run_cli_json("status", run.run_id, "--json", env=env)
    progress = status["progress"]
    assert (status["state"], progress["step"], progress["eval_step"]) == ("succeeded", 3, 3)
    assert 0 <= progress["rewards/accuracies"] <= 1 and progress["eval_loss"] > 0
    assert progress["eval_rewards/accuracies"] is not None


def test_resume_takes_the_reference_from_the_base_model_not_the_checkpoint(dpo_assets, tmp_path):
    """Stopped after step 2 and resumed with the reference cache deleted: the reference is
    recomputed from --model (not the resumed weights) and steps 3-4 repeat an uninterrupted run."""
    import shutil

    model, _, pairs = dpo_assets
    opts = dict(
        train_iters=4,
        lr=1e-4,
        adam_eps=1e-8,
        global_batch_size=2,
        micro_batch_size=1,
        lr_decay_style="constant",
    )
    full = tmp_path / "full"
    check(run_runtime(dpo_args(model, pairs, full, save_steps=2, **opts), task="rlhf"))
    part = tmp_path / "part"  # a run stopped after step 2: its checkpoint, no reference cache
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    proc = run_runtime(dpo_args(model, pairs, part, resume="auto", **opts), task="rlhf")
    check(proc)
    assert f"reference log-probs: computed with {model}" in proc.stdout
    resumed = {r["step"]: r["loss"] for r in read_log(part)}
    reference = {r["step"]: r["loss"] for r in read_log(full)}
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (resumed, reference)
    np.testing.assert_allclose(reference_cache(part), reference_cache(full), rtol=1e-6)
