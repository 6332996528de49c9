"""GPU evidence for the HF <-> megatron-core bridge on a Qwen3-1.7B-shaped random model (bf16).

One GPU (TP=1):
    python benchmarks/convert_evidence.py --out benchmarks/results/convert-qwen3-1.7b-h200-tp1.json
Two GPUs (TP=2):
    torchrun --standalone --nproc_per_node 2 benchmarks/convert_evidence.py \
        --tensor_model_parallel_size 2 --out benchmarks/results/convert-qwen3-1.7b-h200-tp2.json

Builds the random checkpoint once in --workdir (Qwen3-1.7B's real dimensions, transformers'
default initialisation, tied embeddings, saved in 2 GB shards), then: builds the Megatron model,
loads it (first with the checkpoint's pages dropped from the page cache, then again warm),
compares logits with transformers on a padded batch and a packed batch (max / mean differences,
top-token agreement), saves it back as a Hugging Face checkpoint, checks every tensor of the
result is bit-identical to the source and that transformers loads it, and writes one JSON file
plus a short table. Each phase records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remote_runtime import platform  # noqa: E402  (after the path fix above)

QWEN3_1_7B = dict(
    hidden_size=2048,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=6144,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    hidden_act="silu",
)
SMALL = dict(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--workdir", default="/tmp/megafleet-convert-evidence")
    p.add_argument(
        "--tensor_model_parallel_size", type=int, default=int(os.environ.get("WORLD_SIZE", "1"))
    )
    p.add_argument("--seq_length", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--max_shard_size", default="2GB")
    p.add_argument("--keep", action="store_true", help="keep the saved checkpoint")
    p.add_argument(
        "--no_fusions",
        action="store_true",
        help="skip the torch.compile'd SwiGLU / cross-entropy fusions",
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke run of this script (use with --small)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="2 layers, hidden 256: to check the script itself, not for evidence",
    )
    return p.parse_args()


def sync(dist) -> None:
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    if dist.world_size > 1:
        torch.distributed.barrier()


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def drop_page_cache(model_dir: Path) -> bool:
    """Evict the checkpoint's pages so the first load reads from disk (no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in model_dir.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def build_random_checkpoint(model_dir: Path, shape: dict, max_shard_size: str, device) -> dict:
    """The random Qwen3-1.7B-shaped checkpoint, written to a temporary name then renamed."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    from remote_runtime.tiny import build_tokenizer

    started = time.perf_counter()
    tmp = model_dir.with_name(model_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    config = Qwen3Config(**shape, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    build_tokenizer(tmp)
    GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=False).save_pretrained(str(tmp))
    params = sum(p.numel() for p in model.parameters())
    del model
    empty_cache()
    tmp.rename(model_dir)
    return {"seconds": round(time.perf_counter() - started, 2), "parameters": params}


def phase(result: dict, name: str, fn):
    """Run one phase; record its result or its error; never raise."""
    try:
        value = fn()
        result["phases"][name] = value
        return value
    except Exception as exc:
        result["phases"][name] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
        return None


def timed_load(chunks, model_dir: Path, dist, total_bytes: int, cold: bool) -> dict:
    from remote_runtime.bridge.load import load_hf_checkpoint

    dropped = drop_page_cache(model_dir) if cold and dist.local_rank == 0 else False
    sync(dist)
    started = time.perf_counter()
    report = load_hf_checkpoint(chunks, model_dir, dist)
    sync(dist)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "GB_per_s": round(total_bytes / seconds / 1e9, 3),
        "bytes_read_this_rank": report.bytes_read,
        "page_cache_dropped": dropped,
    }


def timed_save(chunks, model_dir: Path, out_dir: Path, dist, max_shard_size: str) -> dict:
    from remote_runtime.bridge.save import save_hf_checkpoint

    if dist.rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
    sync(dist)
    started = time.perf_counter()
    report = save_hf_checkpoint(chunks, out_dir, model_dir, dist, max_shard_size=max_shard_size)
    sync(dist)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "files": report.files,
        "tensors": report.tensors,
        "bytes": report.bytes_written,
        "GB_per_s": round(report.bytes_written / seconds / 1e9, 3),
    }


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verify_saved(model_dir: Path, out_dir: Path, seq_length: int, device) -> dict:
    """Rank 0: every tensor bit-identical (streamed), and transformers loads it with no gaps."""
    from transformers import AutoModelForCausalLM

    from remote_runtime.bridge.checkpoint import HFCheckpoint

    a, b = HFCheckpoint(model_dir), HFCheckpoint(out_dir)
    unequal = [
        k
        for k in a.keys()
        if k in b.files and not torch.equal(a.handle(k).get_tensor(k), b.handle(k).get_tensor(k))
    ]
    only_a, only_b = sorted(set(a.files) - set(b.files)), sorted(set(b.files) - set(a.files))
    a.close(), b.close()
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.bfloat16, output_loading_info=True
    )
    model = model.to(device).eval()
    ref = (
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    )
    tokens = torch.randint(0, model.config.vocab_size, (1, min(seq_length, 256)), device=device)
    with torch.no_grad():
        same = torch.equal(model(tokens).logits, ref(tokens).logits)
    del model, ref
    empty_cache()
    return {
        "tensors_compared": len(a.files),
        "unequal": unequal,
        "only_in_source": only_a,
        "only_in_saved": only_b,
        "bit_exact": not (unequal or only_a or only_b),
        "transformers_loading_info": {k: list(v) for k, v in info.items()},
        "transformers_logits_identical": same,
    }


def environment(dist) -> dict:
    import megatron.core
    import transformers

    from remote_runtime.model.attention import VARLEN
    from remote_runtime.model.builder import have_transformer_engine, torch_compile_usable

    gpu = torch.cuda.get_device_name(0) if dist.device.type == "cuda" else "cpu (smoke run)"
    return {
        "gpu": gpu,
        "gpus": dist.world_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "megatron_core": megatron.core.__version__,
        "python": pyplatform.python_version(),
        "transformer_engine": have_transformer_engine(),
        "varlen_attn": bool(VARLEN),
        "torch_compile_fusions": torch_compile_usable(),
        "host": pyplatform.node(),
    }


def run(args, dist) -> dict:
    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.spec.resolve import read_hf_config

    shape = dict(QWEN3_1_7B, **SMALL) if args.small else QWEN3_1_7B
    result = {
        "what": "HF <-> megatron-core, Qwen3-1.7B shape, random weights, bf16",
        "shape": shape,
        "tensor_model_parallel_size": dist.tp,
        "seq_length": args.seq_length,
        "batch_size": args.batch_size,
        "phases": {},
    }
    result["environment"] = environment(dist)
    workdir = Path(args.workdir)
    model_dir = workdir / ("qwen3-small-random-bf16" if args.small else "qwen3-1.7b-random-bf16")
    if dist.rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        if not (model_dir / "config.json").is_file():
            phase(
                result,
                "build_hf_checkpoint",
                lambda: build_random_checkpoint(model_dir, shape, args.max_shard_size, dist.device),
            )
    sync(dist)
    total = checkpoint_bytes(model_dir)
    result["checkpoint_bytes"] = total
    hf = read_hf_config(model_dir)
    options = ModelOptions(
        dtype="bfloat16",
        bias_activation_fusion=not args.no_fusions,
        cross_entropy_loss_fusion=not args.no_fusions,
    )
    started = time.perf_counter()
    chunks = build_model(family_for_hf_config(hf), hf, options, dist)
    sync(dist)
    result["phases"]["build_megatron_model"] = {
        "seconds": round(time.perf_counter() - started, 3),
        "fusions": {
            "bias_activation_fusion": chunks[0].config.bias_activation_fusion,
            "cross_entropy_loss_fusion": chunks[0].config.cross_entropy_loss_fusion,
        },
    }
    phase(result, "load_cold", lambda: timed_load(chunks, model_dir, dist, total, cold=True))
    phase(result, "load_warm", lambda: timed_load(chunks, model_dir, dist, total, cold=False))
    phase(result, "compare_with_transformers", lambda: _compare(chunks, model_dir, dist, args))
    out_dir = workdir / f"saved-tp{dist.tp}"
    saved = phase(
        result, "save", lambda: timed_save(chunks, model_dir, out_dir, dist, args.max_shard_size)
    )
    if dist.rank == 0 and saved is not None:
        phase(
            result,
            "verify_saved",
            lambda: verify_saved(model_dir, out_dir, args.seq_length, dist.device),
        )
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _compare(chunks, model_dir, dist, args) -> dict:
    from remote_runtime.check_convert import compare_with_hf

    started = time.perf_counter()
    r = compare_with_hf(
        chunks,
        model_dir,
        dist,
        torch.bfloat16,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
    )
    empty_cache()
    return {**r, "seconds": round(time.perf_counter() - started, 2)}


def table(r: dict) -> str:
    p = r["phases"]

    def get(name, key, fmt="{}"):
        v = p.get(name) or {}
        return "ERROR: " + v["error"][:120] if "error" in v else fmt.format(v.get(key))

    cmp = p.get("compare_with_transformers") or {}
    rows = [
        f"convert evidence  {r['environment']['gpu']} x{r['environment']['gpus']}  "
        f"TP={r['tensor_model_parallel_size']}  checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB"
    ]
    rows.append(
        f"  load (cold)  {get('load_cold', 'seconds')} s  {get('load_cold', 'GB_per_s')} GB/s"
    )
    rows.append(
        f"  load (warm)  {get('load_warm', 'seconds')} s  {get('load_warm', 'GB_per_s')} GB/s"
    )
    rows.append(f"  save         {get('save', 'seconds')} s  {get('save', 'GB_per_s')} GB/s")
    for kind in ("padded", "packed"):
        m = cmp.get(kind)
        if m:
            rows.append(
                f"  logits {kind:<6} max|Δ| {m['max_abs_diff']:.4g}  mean|Δ| "
                f"{m['mean_abs_diff']:.4g}  argmax {m['argmax_agreement']:.2%} "
                f"(near-ties {m['near_ties']:.1%}; elsewhere "
                f"{m.get('argmax_agreement_decided') or 0:.2%})"
            )
    if "error" in cmp:
        rows.append(f"  compare: ERROR {cmp['error'][:200]}")
    rows.append(f"  packed attention: {(cmp.get('packed_attention') or {}).get('used')}")
    rows.append(
        f"  round trip bit-exact: {get('verify_saved', 'bit_exact')}  transformers "
        f"logits identical: {get('verify_saved', 'transformers_logits_identical')}"
    )
    rows.append(f"  within bf16 tolerance: {cmp.get('ok')}")
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    dist = platform.init_distributed(args.device, args.tensor_model_parallel_size, 1)
    try:
        result = run(args, dist)
    except Exception:
        result = {"fatal": traceback.format_exc()}
    if dist.rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(table(result) if "fatal" not in result else result["fatal"])
        print(f"wrote {out}")
    platform.shutdown()
    return 0 if "fatal" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
