"""Choose tensor/pipeline/data parallel sizes, recompute and batch sizes that fit the GPUs.

    p = plan(config_json, gpus=8, gpu_mem_gb=80, gpus_per_node=8, seq_len=4096)
    p.feasible, p.chosen, p.job_fragment(), p.flags()

For every layout the job could use (TP dividing the attention heads and query groups and at
most the GPUs of one node, so TP traffic stays on NVLink; PP dividing the layers, so stages are
even; DP the rest, with the distributed optimizer) it finds the micro batch and the least
recompute that fit with margin (`memory.estimate_memory`), then ranks the layouts that fit by a
relative speed: TP communication (a few % per doubling inside a node), the pipeline bubble
m / (m + PP - 1), the extra forward of recomputed layers (+1/3 of a layer's compute each) and
micro batches too small to fill the GPU. Ties go to the smaller model-parallel size and to TP
over PP. Nothing fits: the plan is refused with the reason and the fewest GPUs that would do.

Mixture-of-experts models also choose expert parallelism: EP dividing the experts and the
TP × DP ranks of a stage (expert-TP 1), ranked by an all-to-all cost that grows with EP and
jumps when EP leaves the node.

Recompute is "none" or "full" with the block method (the first N layers of each stage), N as
small as fits. Selective recompute is never proposed: it recomputes core attention, and with
SDPA/flash attention there is no s×s score matrix to drop, so it saves nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

from megafleet.memory import (
    Assumptions,
    Lora,
    MemoryEstimate,
    Parallel,
    Recompute,
    estimate_memory,
)
from megafleet.model_shape import ModelShape, as_shape
from remote_runtime.spec.config import TASKS, ConfigError, JobConfig
from remote_runtime.spec.experts import expert_layout_problems
from remote_runtime.spec.resolve import layout_problems

FULL_TOKENS = 4096  # tokens per micro batch from which a GPU is busy (bigger barely helps)
DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step when neither job nor caller says
TIGHT_GIB = 2.0  # a chosen plan with less headroom than this says so


@dataclass
class Candidate:
    parallel: Parallel
    recompute: Recompute
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    memory: MemoryEstimate
    limit_gib: float  # the memory the plan may use on one GPU (GPU memory less the margin)
    relative_speed: float = 0.0

    @property
    def fits(self) -> bool:
        return self.memory.total_gib <= self.limit_gib

    @property
    def headroom_gib(self) -> float:
        return round(self.limit_gib - self.memory.total_gib, 3)

    def to_dict(self) -> dict:
        return {
            "parallel": asdict(self.parallel),
            "recompute": asdict(self.recompute),
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "num_microbatches": self.num_microbatches,
            "fits": self.fits,
            "headroom_gib": self.headroom_gib,
            "relative_speed": round(self.relative_speed, 3),
            "memory": self.memory.to_dict(),
        }


@dataclass
class Request:
    gpus: int
    gpu_mem_gb: float
    gpus_per_node: int
    seq_len: int
    task: str = "sft"
    micro_batch_size: int | None = None  # None: chosen by the planner
    global_batch_size: int | None = None  # None: DEFAULT_GLOBAL_BATCH, rounded to fit DP
    margin: float = 0.05  # fraction of GPU memory kept free beyond the estimate
    lora: Lora | None = None  # LoRA training (frozen base) instead of full fine-tuning

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


@dataclass
class Plan:
    request: Request
    model: ModelShape
    feasible: bool
    chosen: Candidate | None
    candidates: list[Candidate]  # best first; the ones that do not fit last
    reason: str | None = None  # why nothing fits
    min_gpus: int | None = None  # fewest GPUs of this kind (same GPUs per node) that would fit
    notes: list[str] = field(default_factory=list)
    assumptions: Assumptions = field(default_factory=Assumptions)
    lora_alternative: "Plan | None" = None  # full fine-tuning does not fit, LoRA does

    def job_fragment(self) -> dict:
        """The chosen settings as a nested JobConfig fragment (every field stated)."""
        if not self.chosen:
            return {}
        c, r = self.chosen, self.request
        return {
            "task": r.task,
            "data": {"max_length": r.seq_len},
            "parallel": {
                "tensor_model_parallel_size": c.parallel.tp,
                "pipeline_model_parallel_size": c.parallel.pp,
                "sequence_parallel": c.parallel.sequence_parallel,
                "use_distributed_optimizer": c.parallel.distributed_optimizer,
            },
            "recompute": {
                "recompute_granularity": c.recompute.granularity,
                "recompute_method": c.recompute.method,
                "recompute_num_layers": c.recompute.num_layers,
            },
            "train": {
                "micro_batch_size": c.micro_batch_size,
                "global_batch_size": c.global_batch_size,
            },
            **(
                {
                    "moe": {
                        "expert_model_parallel_size": c.parallel.ep,
                        "expert_tensor_parallel_size": c.parallel.etp,
                    }
                }
                if self.model.is_moe
                else {}
            ),
            "launch": {"nproc_per_node": r.gpus_per_node},
            **({"tuner": {"train_type": "lora", "lora_rank": r.lora.rank}} if r.lora else {}),
        }

    def flags(self) -> list[str]:
        """Runtime flags for the fragment (launch settings excluded: torchrun takes those)."""
        out: list[str] = []
        for group, values in self.job_fragment().items():
            if group in ("task", "launch"):
                continue
            for leaf, value in values.items():
                if isinstance(value, bool):
                    value = str(value).lower()
                out += [f"--{leaf}", "none" if value is None else str(value)]
        return out

    def to_dict(self) -> dict:
        return {
            "feasible": self.feasible,
            "reason": self.reason,
            "min_gpus": self.min_gpus,
            "model": self.model.to_dict(),
            "request": {**asdict(self.request), "nodes": self.request.nodes},
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "job": self.job_fragment(),
            "flags": self.flags(),
            "notes": self.notes,
            "candidates": [c.to_dict() for c in self.candidates],
            "assumptions": asdict(self.assumptions),
            "lora_alternative": (
                self.lora_alternative.to_dict() if self.lora_alternative else None
            ),
        }


# ---- the search --------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(shape: ModelShape, gpus: int, gpus_per_node: int) -> list[Parallel]:
    """Every TP × PP × DP (× EP for MoE) layout the runtime can run on this many GPUs (the
    runtime's own `layout_problems` and `expert_layout_problems` decide), TP inside one node."""
    out = []
    for tp in (d for d in _divisors(gpus) if d <= gpus_per_node):
        for pp in _divisors(gpus // tp):
            if layout_problems(shape, gpus, tp, pp):
                continue
            for ep in _divisors(gpus // pp) if shape.is_moe else [1]:
                if expert_layout_problems(shape, gpus, tp, pp, ep):
                    continue
                out.append(
                    Parallel(
                        tp=tp,
                        pp=pp,
                        dp=gpus // (tp * pp),
                        sequence_parallel=tp > 1,
                        distributed_optimizer=True,
                        ep=ep,
                    )
                )
    return out


def recompute_ladder(stage_layers: int) -> list[Recompute]:
    """From no recompute to every layer recomputed; block recompute of N layers in between."""
    return [Recompute()] + [Recompute("full", "block", n) for n in range(1, stage_layers + 1)]


def relative_speed(
    par: Parallel,
    rc: Recompute,
    shape: ModelShape,
    tokens: int,
    microbatches: int,
    gpus_per_node: int = 8,
) -> float:
    stage_layers = shape.num_layers // par.pp
    tp = 1 - 0.04 * math.log2(par.tp)
    if par.ep > 1:  # the all-to-all token exchange: a little per doubling, much across nodes
        tp *= (1 - 0.02 * math.log2(par.ep)) * (0.8 if par.ep * par.etp > gpus_per_node else 1)
    bubble = microbatches / (microbatches + par.pp - 1)
    recompute = 1 / (1 + rc.checkpointed_layers(stage_layers) / stage_layers / 3)
    fill = min(1.0, 0.85 + 0.15 * tokens / FULL_TOKENS)
    return tp * bubble * recompute * fill


def _batch_sizes(req: Request, par: Parallel) -> list[tuple[int, int]]:
    """(micro, global) pairs to try, largest micro batch first."""
    if req.micro_batch_size:
        micros = [req.micro_batch_size]
    else:
        top = max(1, min(8, math.ceil(FULL_TOKENS / req.seq_len)))
        micros = [m for m in (8, 4, 2, 1) if m <= top]
    target = req.global_batch_size or DEFAULT_GLOBAL_BATCH
    return [(m, max(1, math.ceil(target / (m * par.dp))) * m * par.dp) for m in micros]


def sequences_per_sample(task: str) -> int:
    """Sequences one sample trains: a preference pair (rlhf) is its chosen and rejected answer,
    each up to max_length, in the same micro-batch. DPO's reference log-probs are computed
    before training and cached (one number per sequence), so they add no GPU memory."""
    return 2 if task == "rlhf" else 1


def _candidate(shape, par, rc, micro, gbs, req, asm) -> Candidate:
    m = gbs // (micro * par.dp)
    seq = req.seq_len * sequences_per_sample(req.task)
    mem = estimate_memory(
        shape, par, seq, micro, rc, num_microbatches=m, assumptions=asm, lora=req.lora
    )
    cand = Candidate(par, rc, micro, gbs, m, mem, limit_gib=req.gpu_mem_gb * (1 - req.margin))
    cand.relative_speed = relative_speed(par, rc, shape, micro * seq, m, req.gpus_per_node)
    return cand


def best_for_layout(shape: ModelShape, par: Parallel, req: Request, asm: Assumptions) -> Candidate:
    """The fastest fitting (micro batch, recompute) for one layout, else its smallest footprint."""
    ladder = recompute_ladder(shape.num_layers // par.pp)
    fitting, smallest = [], None
    for micro, gbs in _batch_sizes(req, par):
        lo, hi = 0, len(ladder) - 1  # memory falls along the ladder: find the first that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if _candidate(shape, par, ladder[mid], micro, gbs, req, asm).fits:
                hi = mid
            else:
                lo = mid + 1
        cand = _candidate(shape, par, ladder[lo], micro, gbs, req, asm)
        if cand.fits:
            fitting.append(cand)
        elif smallest is None or cand.memory.total_gib < smallest.memory.total_gib:
            smallest = cand
    return max(fitting, key=lambda c: c.relative_speed) if fitting else smallest


def _rank_key(c: Candidate):
    p = c.parallel
    return (not c.fits, -round(c.relative_speed, 3), p.tp * p.pp, -p.tp, -c.headroom_gib)


def check_request(req: Request) -> None:
    problems = []
    if req.gpus < 1:
        problems.append(("gpus", f"must be at least 1, got {req.gpus}"))
    if req.gpus_per_node < 1 or (req.gpus >= 1 and req.gpus % req.gpus_per_node):
        problems.append(
            (
                "gpus_per_node",
                f"{req.gpus_per_node} does not divide the {req.gpus} "
                "GPUs (every node must have the same number of GPUs)",
            )
        )
    if req.gpu_mem_gb <= 0:
        problems.append(("gpu_mem_gb", f"must be > 0, got {req.gpu_mem_gb}"))
    if req.seq_len < 1:
        problems.append(("data.max_length", f"must be > 0, got {req.seq_len}"))
    if req.task not in TASKS:
        problems.append(("task", f"{req.task!r} is not one of: {', '.join(TASKS)}"))
    if req.micro_batch_size is not None and req.micro_batch_size < 1:
        problems.append(("train.micro_batch_size", f"must be > 0, got {req.micro_batch_size}"))
    if req.global_batch_size is not None and req.global_batch_size < 1:
        problems.append(("train.global_batch_size", f"must be > 0, got {req.global_batch_size}"))
    if not 0 <= req.margin < 0.5:
        problems.append(("margin", f"must be in [0, 0.5), got {req.margin}"))
    if problems:
        raise ConfigError(problems)


def plan(
    model_config: dict | ModelShape,
    gpus: int,
    gpu_mem_gb: float,
    gpus_per_node: int | None = None,
    seq_len: int = 4096,
    task: str = "sft",
    micro_batch_size: int | None = None,
    global_batch_size: int | None = None,
    margin: float = 0.05,
    assumptions: Assumptions = Assumptions(),
    suggest: bool = True,
    lora: Lora | None = None,
) -> Plan:
    """Propose parallel settings for full training (or, with `lora`, LoRA training) on `gpus`
    GPUs of `gpu_mem_gb` GiB each.

    Raises ConfigError for invalid requests or unsupported models; returns a Plan with
    feasible=False (and the reason) when the model cannot fit; when full fine-tuning does not
    fit and LoRA would, `lora_alternative` holds the LoRA plan.
    """
    shape = as_shape(model_config)
    req = Request(
        gpus,
        float(gpu_mem_gb),
        gpus_per_node or gpus,
        seq_len,
        task,
        micro_batch_size,
        global_batch_size,
        margin,
        lora,
    )
    check_request(req)
    found = [
        best_for_layout(shape, par, req, assumptions)
        for par in layouts(shape, req.gpus, req.gpus_per_node)
    ]
    found.sort(key=_rank_key)
    chosen = found[0] if found and found[0].fits else None
    result = Plan(req, shape, chosen is not None, chosen, found, assumptions=assumptions)
    if chosen:
        result.notes = explain(result)
        if isinstance(model_config, dict):
            longest = model_config.get("max_position_embeddings")
            if longest and seq_len > longest:
                result.notes.append(
                    f"seq len {seq_len} is longer than the model's "
                    f"max_position_embeddings={longest}"
                )
        return result
    result.reason = refusal(shape, req, found)
    if suggest and lora is None and task in ("sft", "rlhf"):  # LoRA: SFT and DPO
        alt = plan(
            model_config,
            gpus,
            gpu_mem_gb,
            gpus_per_node,
            seq_len,
            task,
            micro_batch_size,
            global_batch_size,
            margin,
            assumptions,
            suggest=False,
            lora=Lora(),
        )
        if alt.feasible:
            result.lora_alternative = alt
            result.reason += (
                f"; LoRA (r={alt.request.lora.rank} on every linear layer, frozen "
                f"bf16 base) fits: {alt.chosen.memory.total_gib:.1f} GiB per GPU"
            )
    if suggest:
        # Without a node size, assume the extra GPUs could come as servers of up to 8 GPUs.
        node_size = gpus_per_node or max(req.gpus, 8)
        result.min_gpus = fewest_gpus(shape, req, assumptions, node_size)
        if result.min_gpus:
            n, nodes = result.min_gpus, math.ceil(result.min_gpus / node_size)
            where = "one node" if nodes == 1 else f"{nodes} nodes of {node_size}"
            what = "full fine-tuning" if result.lora_alternative is not None else "it"
            result.reason += f"; {what} would fit on {n} such GPUs ({where})"
    return result


def fewest_gpus(
    shape: ModelShape, req: Request, asm: Assumptions, node_size: int, limit: int = 1024
) -> int | None:
    """The fewest GPUs on which the model fits: up to one node of `node_size`, then whole nodes."""
    sizes = sorted(
        {2**i for i in range(11) if 2**i < node_size} | set(range(node_size, limit + 1, node_size))
    )
    for n in sizes:
        if n <= req.gpus:
            continue
        attempt = plan(
            shape,
            n,
            req.gpu_mem_gb,
            min(node_size, n),
            req.seq_len,
            req.task,
            req.micro_batch_size,
            req.global_batch_size,
            req.margin,
            asm,
            suggest=False,
            lora=req.lora,
        )
        if attempt.feasible:
            return n
    return None


def refusal(shape: ModelShape, req: Request, found: list[Candidate]) -> str:
    billions = shape.total_params() / 1e9
    kind = "fine-tuning" if req.task == "sft" else "training"
    what = f"{'LoRA' if req.lora else 'full'} {kind} of a {billions:.1f}B-parameter model"
    best = min(found, key=lambda c: c.memory.total_gib)  # never empty: TP=PP=1 always qualifies
    mem, p = best.memory, best.parallel
    static = sum(mem.components.get(k, 0) for k in ("weights", "gradients", "optimizer_states"))
    ep = f" EP={p.ep}" if shape.is_moe else ""
    return (
        f"{what} does not fit on {req.gpus} GPU{'s' if req.gpus > 1 else ''} of "
        f"{req.gpu_mem_gb:g} GiB: even the smallest layout (TP={p.tp} PP={p.pp} DP={p.dp}{ep}, "
        f"{best.recompute.granularity} recompute, micro batch {best.micro_batch_size}) needs "
        f"{mem.total_gib:.1f} GiB per GPU ({static:.1f} GiB of it weights, gradients and "
        f"optimizer states) and at most {best.limit_gib:.1f} GiB may be used; "
        "try LoRA, which keeps gradients and optimizer states for the adapters only"
    )


def explain(p: Plan) -> list[str]:
    """Why the chosen layout: one line per decision."""
    c, req = p.chosen, p.request
    par, notes = c.parallel, []
    if par.tp == 1 and par.pp == 1 and par.ep == 1:
        notes.append(
            "no model parallelism needed: weights, gradients and optimizer states fit on each GPU"
        )
    else:
        smaller = [x for x in p.candidates if x.parallel.tp * x.parallel.pp < par.tp * par.pp]
        if smaller and not any(x.fits for x in smaller):
            need = min(x.memory.total_gib for x in smaller)
            notes.append(f"less model parallelism does not fit (needs {need:.1f} GiB per GPU)")
        if par.tp > 1:
            notes.append(
                f"TP={par.tp} inside a node (at most {req.gpus_per_node} GPUs per node), "
                "with sequence parallel"
            )
        if par.pp > 1:
            notes.append(
                f"PP={par.pp}: {p.model.num_layers // par.pp} layers per stage; pipeline "
                f"bubble {100 * (par.pp - 1) / (c.num_microbatches + par.pp - 1):.0f}% "
                f"with {c.num_microbatches} microbatches"
            )
    if par.dp > 1:
        notes.append(
            f"DP={par.dp} with the distributed optimizer: optimizer states sharded {par.dp} ways"
        )
    if par.ep > 1:
        states = (
            f"expert optimizer states sharded {par.expert_dp} ways"
            if par.expert_dp > 1
            else "one copy of each expert, so expert optimizer states are not sharded"
        )
        notes.append(
            f"EP={par.ep}: {p.model.num_experts // par.ep} of the {p.model.num_experts} "
            f"experts per GPU, tokens exchanged all-to-all; {states}"
        )
    if c.recompute.granularity == "full":
        notes.append(
            f"full recompute of {c.recompute.num_layers} of "
            f"{p.model.num_layers // par.pp} layers per stage to fit the activations"
        )
    if c.headroom_gib < TIGHT_GIB:
        notes.append(
            f"tight: {c.headroom_gib:.1f} GiB below the {c.limit_gib:.1f} GiB limit; if "
            "it runs out of memory, use more GPUs or LoRA"
        )
    if req.global_batch_size and c.global_batch_size != req.global_batch_size:
        notes.append(
            f"global batch {req.global_batch_size} rounded to {c.global_batch_size} "
            f"(a multiple of micro batch {c.micro_batch_size} × DP {par.dp})"
        )
    return notes


# ---- jobs ----------------------------------------------------------------------------------


def job_parallel(job: JobConfig, world_size: int) -> tuple[Parallel, Recompute, int]:
    """The layout, recompute and microbatches per step of a job on `world_size` GPUs."""
    par = job.parallel
    tp, pp, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
    )
    dp = max(1, world_size // (tp * pp * cp))
    layout = Parallel(
        tp=tp,
        pp=pp,
        dp=dp,
        cp=cp,
        sequence_parallel=par.sequence_parallel and tp > 1,
        distributed_optimizer=par.use_distributed_optimizer,
        ep=job.moe.expert_model_parallel_size,
        etp=job.moe.expert_tensor_parallel_size,
    )
    rc = job.recompute
    full = rc.recompute_granularity == "full"
    recompute = Recompute(
        rc.recompute_granularity,
        rc.recompute_method,
        rc.recompute_num_layers or (1 if full else None),
    )
    microbatches = max(1, job.train.global_batch_size // (job.train.micro_batch_size * dp))
    return layout, recompute, microbatches


def job_assumptions(job: JobConfig | None) -> Assumptions:
    """The memory model's defaults with what the job decides: the parameter dtype and, with the
    precision-aware optimizer, the bytes of each Adam moment."""
    if job is None:
        return Assumptions()
    moment = {"fp32": 4, "bf16": 2}
    aware = job.optim.use_precision_aware_optimizer
    return Assumptions(
        params_dtype_bytes=4 if job.model.torch_dtype == "float32" else 2,
        exp_avg_bytes=moment[job.optim.exp_avg_dtype] if aware else 4,
        exp_avg_sq_bytes=moment[job.optim.exp_avg_sq_dtype] if aware else 4,
    )


def estimate_job(
    job: JobConfig,
    world_size: int,
    model_config: dict | ModelShape,
    assumptions: Assumptions | None = None,
) -> MemoryEstimate:
    """Peak memory per GPU of a job as written (for launch checks and the wizard)."""
    layout, recompute, microbatches = job_parallel(job, world_size)
    asm = assumptions or job_assumptions(job)
    seq = job.data.max_length * sequences_per_sample(job.task)
    return estimate_memory(
        model_config,
        layout,
        seq,
        job.train.micro_batch_size,
        recompute,
        num_microbatches=microbatches,
        assumptions=asm,
        lora=job_lora(job),
    )


# megatron module names of target_modules -> the HF modules they adapt
_MEGATRON_TARGETS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}


def job_lora(job: JobConfig) -> Lora | None:
    """The job's LoRA setup for the memory model (None: full fine-tuning)."""
    tuner = job.tuner
    if tuner.train_type != "lora":
        return None
    if "all-linear" in tuner.target_modules:
        return Lora(rank=tuner.lora_rank)
    targets = {t for name in tuner.target_modules for t in _MEGATRON_TARGETS.get(name, (name,))}
    return Lora(rank=tuner.lora_rank, targets=tuple(sorted(targets & set(Lora().targets))))


def apply_plan(job: JobConfig, p: Plan) -> JobConfig:
    """A copy of the job with the plan's settings."""
    new = copy.deepcopy(job)
    for group, values in p.job_fragment().items():
        if group == "task":
            new.task = values
            continue
        for leaf, value in values.items():
            new.set(f"{group}.{leaf}", value)
    return new
