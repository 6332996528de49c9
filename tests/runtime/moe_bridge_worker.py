"""The megatron side of tests/runtime/test_moe_bridge.py, run in separate processes.

For each tiny MoE checkpoint (Qwen3-MoE; Qwen2-MoE with its shared expert) and each layout of
the mode (`single`: one process, EP1; `parallel`: two gloo processes, EP2, expert-TP 2 with TP 2
and sequence parallel, PP2): load the checkpoint into the runtime's model, check that every
rank holds exactly its experts' slices (computed here from the full HF tensors, independently of
the bridge's transforms), save it back and compare the files tensor by tensor; rank 0 also loads
the saved directory with transformers. Logits against transformers (`compare_with_hf`, padded
and packed) in every layout. Writes `<out>/<mode>-rank<r>.json`.

    python moe_bridge_worker.py single|parallel MODELS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from remote_runtime import platform
from remote_runtime.bridge.load import load_hf_checkpoint
from remote_runtime.bridge.mapping import local_params
from remote_runtime.bridge.save import save_hf_checkpoint
from remote_runtime.check_convert import compare_with_hf
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.resolve import read_hf_config

FAMILIES = ("qwen3_moe", "qwen2_moe")
# tag -> (TP, PP, EP, expert TP, sequence parallel)
LAYOUTS = {
    "single": {"ep1": (1, 1, 1, 1, False)},
    "parallel": {
        "ep2": (1, 1, 2, 1, False),
        "etp2": (2, 1, 1, 2, True),
        "pp2": (1, 2, 1, 1, False),
    },
}


def tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_expert_slice(name: str, layer: int, hf: dict, dist, local: int) -> torch.Tensor:
    """The contract (remote_runtime/model/MOE_CONTRACT.md), written out: local expert e is
    global ep_rank*local + e; fc1 rows [gate_r; up_r] and fc2 columns of expert-TP rank r."""
    r, etp = dist.etp_rank, dist.etp
    out = []
    for g in range(dist.ep_rank * local, (dist.ep_rank + 1) * local):
        prefix = f"model.layers.{layer}.mlp.experts.{g}."
        if name.endswith("linear_fc1.weight"):
            gate, up = hf[prefix + "gate_proj.weight"], hf[prefix + "up_proj.weight"]
            n = gate.shape[0] // etp
            out.append(torch.cat([gate[r * n : (r + 1) * n], up[r * n : (r + 1) * n]]))
        else:
            down = hf[prefix + "down_proj.weight"]
            n = down.shape[1] // etp
            out.append(down[:, r * n : (r + 1) * n])
    return torch.stack(out)


def check(src: Path, out: Path, dist, tag: str, sp: bool) -> dict:
    hf_config = read_hf_config(src)
    family = family_for_hf_config(hf_config)
    chunks = build_model(
        family, hf_config, ModelOptions(dtype="float32", sequence_parallel=sp), dist
    )
    report = load_hf_checkpoint(chunks, src, dist)
    hf = tensors(src)
    wrong, experts_held, expert_bytes = [], set(), 0
    for lp in local_params(chunks, family, False):
        if not lp.row.per_expert:
            continue
        local = lp.param.shape[0]
        experts_held.update(range(dist.ep_rank * local, (dist.ep_rank + 1) * local))
        expert_bytes += lp.param.numel() * lp.param.element_size()
        want = expected_expert_slice(lp.name, lp.layer, hf, dist, local)
        if not torch.equal(lp.param.detach(), want):
            wrong.append(lp.name)
    result = {
        "wrong_slices": wrong,
        "experts_held": sorted(experts_held),
        "expert_bytes": expert_bytes,
        "bytes_read": report.bytes_read,
        "ep_rank": dist.ep_rank,
        "etp_rank": dist.etp_rank,
        "pp_rank": dist.pp_rank,
    }
    # 18: both the padded [2, 18] and the packed (18 + 12 tokens) batch split evenly over TP2+SP
    compare = compare_with_hf(chunks, src, dist, torch.float32, seq_length=18)
    result["compare"] = {
        "ok": compare["ok"],
        "max_abs_diff": compare["padded"]["max_abs_diff"],
        "packed_max_abs_diff": (compare["packed"] or {}).get("max_abs_diff"),
    }
    saved = out / f"saved-{tag}-{src.name}"
    save = save_hf_checkpoint(chunks, saved, src, dist, max_shard_size="150KB")
    if dist.rank == 0:
        a, b = hf, tensors(saved)
        result.update(
            files=save.files,
            saved_files=sorted(p.name for p in saved.iterdir()),
            keys_only_in_source=sorted(set(a) - set(b)),
            keys_only_in_saved=sorted(set(b) - set(a)),
            unequal=sorted(k for k in set(a) & set(b) if not torch.equal(a[k], b[k])),
            reload_diff=reload_diff(src, saved, hf_config["vocab_size"]),
        )
    return result


def reload_diff(src: Path, saved: Path, vocab: int) -> float:
    """Max logit difference between transformers on the source and on the saved directory."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (src, saved):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(tokens).logits)
    return (logits[0] - logits[1]).abs().max().item()


def main(mode: str, models: Path, out: Path) -> None:
    from megatron.core import parallel_state

    results, dist = {}, None
    for tag, (tp, pp, ep, etp, sp) in LAYOUTS[mode].items():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist = platform.init_distributed(
            "cpu", tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
        )
        for name in FAMILIES:
            results[f"{tag}/{name}"] = check(models / name, out, dist, tag, sp)
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps(results, indent=1))
    platform.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
