"""`check-convert`: are the Megatron model and the Hugging Face model the same model?

    torchrun --nproc_per_node N -m remote_runtime check-convert --model DIR \
        [--tensor_model_parallel_size T] [--pipeline_model_parallel_size P] [--device cpu|cuda] \
        [--expert_model_parallel_size EP] [--expert_tensor_parallel_size ETP] \
        [--torch_dtype bfloat16|float32] [--json]

Loads the checkpoint into megatron-core (split over TP × PP, MoE experts over EP × expert-TP) and
into transformers, runs both on the same tokens, once as a padded batch and once packed (documents
back to back, THD), and reports max / mean absolute logit differences and how often the two agree on
the top token. Exits 1 when the differences exceed the dtype's tolerance. `compare_with_hf` is the
reusable part: training calls it for `--test_convert_precision true` on a model it has just loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SAMPLE_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring; then came stored programs, assemblers and compilers. Today a few lines of Python "
    "can train a neural network with billions of parameters across hundreds of accelerators. "
    "Question: why does parallelism matter? Answer: because no single device is large enough. "
)

# mean_rel = mean|megatron - hf| / mean|hf|; argmax = share of positions with the same top token.
# A mapping mistake gives mean_rel near 1 and argmax near 1/vocab; the bf16 argmax bound leaves
# room for near-ties in random models (see _metrics), real checkpoints agree on > 99%.
TOLERANCES = {
    "float32": {"mean_rel": 1e-4, "argmax": 0.999},
    "bfloat16": {"mean_rel": 3e-2, "argmax": 0.90},
}


def sample_sequences(
    model_dir: str | Path,
    vocab_size: int,
    batch_size: int,
    seq_length: int,
    seed: int = 0,
    text: str | None = None,
) -> torch.Tensor:
    """[b, s] token ids: real text (`text`, else a built-in sample) through the checkpoint's
    tokenizer, repeated to fill the batch; random ids when there is no usable tokenizer."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = tok(text or SAMPLE_TEXT)["input_ids"]
        need = batch_size * seq_length
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
        if ids and max(ids) < vocab_size:
            return torch.tensor(ids, dtype=torch.long).view(batch_size, seq_length)
    except Exception:  # no or unusable tokenizer: random tokens test the mapping just as well
        pass
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_length), generator=gen)


def _metrics(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict:
    """Differences over [..., vocab] logits.

    `near_ties`: share of positions where the reference's best two tokens are within one unit of
    the dtype's resolution at that logit (bf16 has 8 bits of mantissa), so that the top token is
    a coin toss for any implementation. Random models, with their nearly flat logits over 150k
    tokens, have many; trained models few.
    """
    diff = (ours - ref).abs()
    same = ours.argmax(-1) == ref.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    resolution = torch.finfo(dtype).eps * top2[..., 0].abs()
    tie = (top2[..., 0] - top2[..., 1]) <= resolution
    decided = same[~tie]
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "mean_rel_diff": (diff.mean() / ref.abs().mean().clamp_min(1e-12)).item(),
        "argmax_agreement": same.float().mean().item(),
        "near_ties": tie.float().mean().item(),
        # agreement where the reference's top token is not a coin toss at this dtype
        "argmax_agreement_decided": decided.float().mean().item() if decided.numel() else None,
        "tokens": int(same.numel()),
    }


def _hf_reference(model_dir, dtype: torch.dtype, device, tokens: torch.Tensor, docs: list) -> tuple:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = (
        AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    with torch.no_grad():
        padded = model(tokens.to(device)).logits.float().cpu()
        packed = [model(torch.tensor([d], device=device)).logits.float().cpu()[0] for d in docs]
    del model
    return padded, torch.cat(packed)


def compare_with_hf(
    chunks,
    model_dir: str | Path,
    dist,
    dtype: torch.dtype,
    *,
    batch_size: int = 2,
    seq_length: int = 128,
    tolerance: dict | None = None,
    text: str | None = None,
) -> dict:
    """Compare the loaded Megatron chunks with transformers on model_dir. Collective; every rank
    gets the same result dict (metrics for the padded and packed batches, `ok`)."""
    from remote_runtime.bridge.load import read_hf_config
    from remote_runtime.model.forward import forward_logits, pack_documents, padded_batch

    hf = read_hf_config(model_dir)
    vocab = int(hf["vocab_size"])
    tokens = sample_sequences(model_dir, vocab, batch_size, seq_length, text=text)
    lengths = [max(2, seq_length - i * seq_length // (batch_size + 1)) for i in range(batch_size)]
    docs = [tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    packed_ok = getattr(chunks[0], "megafleet_packed_sequences", True)
    batches = [padded_batch(tokens, dist.device)]
    batches += [pack_documents(docs, dist.device)] if packed_ok else []
    logits = forward_logits(chunks, batches, vocab)
    name = str(dtype).replace("torch.", "")
    tol = tolerance or TOLERANCES[name]
    result = None
    if logits is not None and dist.tp_rank == 0 and dist.dp_rank == 0:
        try:
            ref_padded, ref_packed = _hf_reference(model_dir, dtype, dist.device, tokens, docs)
        except Exception as exc:  # e.g. out of memory: report it, keep every rank in step
            return _share(
                {
                    "dtype": name,
                    "ok": False,
                    "tolerance": tol,
                    "error": f"transformers reference failed: {type(exc).__name__}: {exc}",
                },
                dist,
            )
        padded = _metrics(logits[0], ref_padded, dtype)
        packed = _metrics(logits[1][0], ref_packed, dtype) if packed_ok else None
        checked = [m for m in (padded, packed) if m is not None]
        worst_rel = max(m["mean_rel_diff"] for m in checked)
        worst_arg = min(m["argmax_agreement"] for m in checked)
        from remote_runtime.model.attention import PACKED_PATH

        result = {
            "dtype": name,
            "padded": padded,
            "packed": packed,
            "tolerance": tol,
            "packed_documents": lengths,
            "packed_attention": dict(PACKED_PATH),
            "ok": worst_rel <= tol["mean_rel"] and worst_arg >= tol["argmax"],
        }
    return _share(result, dist)


def _share(result, dist):
    """Send the comparing rank's result to every rank."""
    if dist.world_size == 1:
        return result
    everyone = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, result)
    return next(r for r in everyone if r is not None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m remote_runtime check-convert", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--tensor_model_parallel_size", type=int, default=1)
    p.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    p.add_argument("--expert_model_parallel_size", type=int, default=1, help="MoE models")
    p.add_argument("--expert_tensor_parallel_size", type=int, default=1, help="MoE models")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--torch_dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument(
        "--transformer_impl", default="auto", choices=["auto", "local", "transformer_engine"]
    )
    p.add_argument(
        "--attention_backend",
        default="auto",
        choices=["auto", "flash", "fused", "unfused", "local"],
    )
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument(
        "--text_file",
        help="compare on this text (e.g. a sample of your training data) "
        "instead of the built-in English sample",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.text_file and not Path(args.text_file).is_file():
        p.error(f"--text_file {args.text_file}: no such file")
    return args


def run(args: argparse.Namespace) -> dict:
    from remote_runtime import platform
    from remote_runtime.bridge.load import load_hf_checkpoint
    from remote_runtime.model.builder import DTYPES, ModelOptions, build_model
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.spec.resolve import read_hf_config

    hf = read_hf_config(args.model)
    family = family_for_hf_config(hf)
    dist = platform.init_distributed(
        args.device,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    dtype_name = args.torch_dtype or ("bfloat16" if dist.device.type == "cuda" else "float32")
    options = ModelOptions(
        dtype=dtype_name,
        transformer_impl=args.transformer_impl,
        attention_backend=args.attention_backend,
    )
    chunks = build_model(family, hf, options, dist)
    load = load_hf_checkpoint(chunks, args.model, dist)
    started = time.perf_counter()
    text = Path(args.text_file).read_text() if args.text_file else None
    result = compare_with_hf(
        chunks,
        args.model,
        dist,
        DTYPES[dtype_name],
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        text=text,
    )
    result.update(
        model=str(args.model),
        family=family.name,
        device=dist.device.type,
        tensor_model_parallel_size=dist.tp,
        pipeline_model_parallel_size=dist.pp,
        expert_model_parallel_size=dist.ep,
        expert_tensor_parallel_size=dist.etp,
        transformer_impl=chunks[0].megafleet_transformer_impl,
        load_seconds=round(load.seconds, 3),
        compare_seconds=round(time.perf_counter() - started, 3),
    )
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def format_table(r: dict) -> str:
    lines = [
        f"check-convert {r['family']}  {r['model']}",
        f"  {r['device']}  {r['dtype']}  TP={r['tensor_model_parallel_size']} "
        f"PP={r['pipeline_model_parallel_size']}"
        + (
            f" EP={r['expert_model_parallel_size']} expert-TP={r['expert_tensor_parallel_size']}"
            if r.get("expert_model_parallel_size", 1) > 1
            or r.get("expert_tensor_parallel_size", 1) > 1
            else ""
        )
        + f"  {r['transformer_impl']}",
        f"  {'batch':<22}{'max|Δ|':>11}{'mean|Δ|':>11}{'mean rel':>11}{'argmax':>9}"
        f"{'ties':>7}{'decided':>9}",
    ]
    if "error" in r:
        return "\n".join(lines[:2] + [f"✗ {r['error']}"])
    for key, label in (
        ("padded", "padded"),
        ("packed", f"packed ({len(r['packed_documents'])} docs)"),
    ):
        m = r[key]
        if m is None:
            lines.append(f"  {label:<22}not supported by this attention backend")
            continue
        lines.append(
            f"  {label:<22}{m['max_abs_diff']:>11.3e}{m['mean_abs_diff']:>11.3e}"
            f"{m['mean_rel_diff']:>11.3e}{m['argmax_agreement']:>9.2%}"
            f"{m['near_ties']:>7.1%}{_pct(m.get('argmax_agreement_decided')):>9}"
        )
    tol = r["tolerance"]
    verdict = "✓ within" if r["ok"] else "✗ beyond"
    lines.append(f"  packed attention: {r['packed_attention']['used']}")
    lines.append(
        f"{verdict} tolerance for {r['dtype']} (mean rel ≤ {tol['mean_rel']:g}, "
        f"argmax ≥ {tol['argmax']:.1%})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from remote_runtime.bridge.checkpoint import CheckpointError
    from remote_runtime.bridge.mapping import ConversionError
    from remote_runtime.spec.config import ConfigError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    rank0 = os.environ.get("RANK", "0") == "0"  # print once under torchrun
    try:
        result = run(args)
    except (ConfigError, ConversionError, CheckpointError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from remote_runtime import platform

        platform.shutdown()
    if rank0:
        print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if result["ok"] else 1
