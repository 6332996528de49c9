"""The megatron side of tests/runtime/test_bridge.py, run in separate processes.

megatron-core takes seconds to import and its parallel state and CPU shims are process-global,
so the tests start this script once per layout set (`single`: one process; `parallel`: two gloo
processes under torchrun) and it runs every check for every family, writing measurements to
`<out>/<mode>-rank<r>.json`. The tests assert on those numbers.

    python bridge_worker.py single|parallel MODELS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from remote_runtime import platform
from remote_runtime.bridge.load import load_hf_checkpoint
from remote_runtime.bridge.mapping import ConversionError
from remote_runtime.bridge.save import save_hf_checkpoint
from remote_runtime.check_convert import compare_with_hf
from remote_runtime.model.attention import PACKED_PATH
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import (
    forward_logits,
    forward_losses,
    pack_documents,
    padded_batch,
)
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.resolve import read_hf_config

FAMILIES = ("qwen3", "qwen2", "llama")
DOC_LENGTHS = (6, 8, 10)  # even, so sequence parallel (TP=2) can split every batch
UNIFORM_DOCS = 3  # a pack of three documents of one length: the dense-SDPA path for uniform packs
# (tag, TP, PP, sequence parallel, kernels); "triton" layouts run our Triton RMSNorm/RoPE/SwiGLU
# (under Triton's CPU interpreter here) for Qwen3 and Llama
LAYOUTS = {
    "single": [("tp1", 1, 1, False, "auto"), ("tp1triton", 1, 1, False, "triton")],
    "parallel": [
        ("tp2", 2, 1, False, "auto"),
        ("pp2", 1, 2, False, "auto"),
        ("dp2", 1, 1, False, "auto"),
        ("tp2sp", 2, 1, True, "auto"),
        ("tp2sptriton", 2, 1, True, "triton"),
    ],
}


def tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hf_logits(model_dir: Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(b).logits for b in batches]


def inputs(vocab: int):
    gen = torch.Generator().manual_seed(1)
    padded = torch.randint(0, vocab, (2, 18), generator=gen)
    docs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in DOC_LENGTHS]
    return padded, docs


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return flat.view(labels.shape)


def check_family(src: Path, out: Path, dist, tag: str, sp: bool, kernels: str = "auto") -> dict:
    """Load, compare with transformers (padded and packed), save and compare the files."""
    hf = read_hf_config(src)
    family = family_for_hf_config(hf)
    chunks = build_model(
        family, hf, ModelOptions(dtype="float32", sequence_parallel=sp, kernels=kernels), dist
    )
    load_hf_checkpoint(chunks, src, dist)
    padded, docs = inputs(hf["vocab_size"])
    batches = [padded_batch(padded), pack_documents(docs)]
    batches += [padded_batch(torch.tensor([d])) for d in docs]  # the same documents one by one
    uniform = [d[: DOC_LENGTHS[1]] for d in docs[1:]] + [docs[0] + docs[0][:2]]
    batches.append(pack_documents(uniform))
    logits = forward_logits(chunks, batches, hf["vocab_size"])
    uniform_path = PACKED_PATH["used"]
    labeled = [
        dict(batches[0], labels=torch.roll(padded, -1, 1)),
        dict(batches[1], labels=torch.roll(batches[1]["tokens"], -1, 1)),
    ]
    losses = forward_losses(chunks, labeled)
    result = {}
    if logits is not None and dist.tp_rank == 0 and dist.dp_rank == 0:
        ref = hf_logits(src, [padded] + [torch.tensor([d]) for d in docs])
        uniform_ref = hf_logits(src, [torch.tensor(uniform)])[0]
        packed = logits[1][0]
        separate = torch.cat([lg[0] for lg in logits[2 : 2 + len(docs)]])
        result.update(
            hf_padded=(logits[0] - ref[0]).abs().max().item(),
            hf_packed=(packed - torch.cat([r[0] for r in ref[1:]])).abs().max().item(),
            packed_vs_separate=(packed - separate).abs().max().item(),
            hf_uniform_packed=(logits[-1][0] - uniform_ref.reshape(-1, uniform_ref.shape[-1]))
            .abs()
            .max()
            .item(),
            uniform_path=uniform_path,
            logit_scale=ref[0].abs().max().item(),
            loss_padded=(losses[0] - _cross_entropy(ref[0], labeled[0]["labels"]))
            .abs()
            .max()
            .item(),
            loss_packed=(
                losses[1][0]
                - _cross_entropy(torch.cat([r[0] for r in ref[1:]]), labeled[1]["labels"][0])
            )
            .abs()
            .max()
            .item(),
        )
    saved = out / f"saved-{tag}-{src.name}"
    report = save_hf_checkpoint(chunks, saved, src, dist, max_shard_size="150KB")
    if dist.rank == 0:
        a, b = tensors(src), tensors(saved)
        result.update(
            saved_files=sorted(p.name for p in saved.iterdir()),
            shards=report.files,
            keys_only_in_source=sorted(set(a) - set(b)),
            keys_only_in_saved=sorted(set(b) - set(a)),
            unequal=sorted(
                k
                for k in set(a) & set(b)
                if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
            ),
            reload_diff=(hf_logits(saved, [padded])[0] - hf_logits(src, [padded])[0])
            .abs()
            .max()
            .item(),
        )
    return result


def expect_error(fn) -> str:
    try:
        fn()
    except ConversionError as exc:
        return str(exc)
    return "no error"


def single_extras(models: Path, out: Path, dist) -> dict:
    """TP=1 checks that need one process: sharded source, bad checkpoints, broken models."""
    res = {"sharded": check_family(models / "qwen3-sharded", out, dist, "tp1", False)}
    hf = read_hf_config(models / "qwen3")
    family = family_for_hf_config(hf)

    def fresh(dtype="float32"):
        return build_model(family, hf, ModelOptions(dtype=dtype), dist)

    res["missing_error"] = expect_error(
        lambda: load_hf_checkpoint(fresh(), models / "qwen3-missing", dist)
    )
    res["extra_error"] = expect_error(
        lambda: load_hf_checkpoint(fresh(), models / "qwen3-extra", dist)
    )
    chunks = fresh()
    chunks[0].decoder.layers[1].mlp.register_parameter(
        "surprise", torch.nn.Parameter(torch.zeros(3))
    )
    res["unmapped_error"] = expect_error(lambda: load_hf_checkpoint(chunks, models / "qwen3", dist))
    chunks = fresh()
    load_hf_checkpoint(chunks, models / "qwen3", dist)
    res["compare_fp32"] = compare_with_hf(
        chunks, models / "qwen3", dist, torch.float32, seq_length=32
    )
    with torch.no_grad():  # a conversion bug in miniature: one layer's MLP output scrambled
        w = chunks[0].decoder.layers[0].mlp.linear_fc2.weight
        w.copy_(w.flip(0))
    res["compare_broken"] = compare_with_hf(
        chunks, models / "qwen3", dist, torch.float32, seq_length=32
    )
    res["ddp_bf16"] = ddp_bf16_round_trip(models / "qwen3", out, dist)
    res["triton_grads"] = kernel_gradients(models / "qwen3", dist)
    try:  # the directory now exists: a second save must refuse rather than mix checkpoints
        save_hf_checkpoint(chunks, out / "saved-ddp-bf16", models / "qwen3", dist)
        res["existing_dir_error"] = "no error"
    except OSError as exc:
        res["existing_dir_error"] = str(exc)
    llama = read_hf_config(models / "llama")
    chunks = build_model(family_for_hf_config(llama), llama, ModelOptions(dtype="bfloat16"), dist)
    load_hf_checkpoint(chunks, models / "llama", dist)
    res["compare_bf16"] = compare_with_hf(
        chunks, models / "llama", dist, torch.bfloat16, seq_length=32
    )
    return res


def kernel_gradients(src: Path, dist) -> dict:
    """One packed forward and backward with eager and with Triton kernels, the same weights:
    the largest gradient difference over all parameters, relative to the largest gradient."""
    hf = read_hf_config(src)
    family = family_for_hf_config(hf)
    docs = inputs(hf["vocab_size"])[1]
    grads = {}
    for kernels in ("eager", "triton"):
        chunks = build_model(family, hf, ModelOptions(dtype="float32", kernels=kernels), dist)
        load_hf_checkpoint(chunks, src, dist)
        batch = pack_documents(docs)
        losses = chunks[0](
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=torch.roll(batch["tokens"], -1, 1),
            packed_seq_params=batch["packed_seq_params"],
        )
        losses.sum().backward()
        grads[kernels] = {n: p.grad.clone() for n, p in chunks[0].named_parameters()}
    scale = max(g.abs().max().item() for g in grads["eager"].values())
    return {
        "params": len(grads["eager"]),
        "scale": scale,
        "max_diff": max(
            (grads["triton"][n] - g).abs().max().item() for n, g in grads["eager"].items()
        ),
        "swiglu_module": type(chunks[0].decoder.layers[0].mlp.activation_func).__name__,
    }


def ddp_bf16_round_trip(src: Path, out: Path, dist) -> dict:
    """bf16 parameters inside megatron's DDP (distributed optimizer buffers): load and save
    through the wrapper; the saved bf16 tensors equal the fp32 source rounded to bf16."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    hf = read_hf_config(src)
    chunks = build_model(family_for_hf_config(hf), hf, ModelOptions(dtype="bfloat16"), dist)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True
    )
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks
    ]
    load_hf_checkpoint(wrapped, src, dist)
    saved = out / "saved-ddp-bf16"
    save_hf_checkpoint(wrapped, saved, src, dist, dtype=torch.bfloat16)
    a, b = tensors(src), tensors(saved)
    return {
        "unequal": sorted(
            k
            for k in a
            if b.get(k) is None
            or b[k].dtype != torch.bfloat16
            or not torch.equal(a[k].to(torch.bfloat16), b[k])
        ),
        "config_dtype": read_hf_config(saved).get("dtype"),
    }


def reinit(dist_args) -> object:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return platform.init_distributed("cpu", *dist_args)


def main(mode: str, models: Path, out: Path) -> None:
    results = {}
    dist = None
    for tag, tp, pp, sp, kernels in LAYOUTS[mode]:
        dist = reinit((tp, pp))
        families = ("qwen3",) if sp else ("qwen3", "llama") if kernels == "triton" else FAMILIES
        for name in families:
            try:
                results[f"{tag}/{name}"] = check_family(models / name, out, dist, tag, sp, kernels)
            except Exception:
                results[f"{tag}/{name}"] = {"exception": traceback.format_exc()}
                raise
        if tag == "pp2":  # the collective comparison, across pipeline stages
            chunks = build_model(
                family_for_hf_config(read_hf_config(models / "llama")),
                read_hf_config(models / "llama"),
                ModelOptions(dtype="float32"),
                dist,
            )
            load_hf_checkpoint(chunks, models / "llama", dist)
            results["pp2/compare"] = compare_with_hf(
                chunks, models / "llama", dist, torch.float32, seq_length=32
            )
    if mode == "single":
        results.update(single_extras(models, out, dist))
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps(results, indent=1))
    platform.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
