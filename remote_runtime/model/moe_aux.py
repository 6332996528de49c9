"""The load-balancing auxiliary loss exactly as transformers computes it, and per-layer load.

transformers' `load_balancing_loss_func` (Qwen3-MoE, Qwen2-MoE, Mixtral) does not average
per-layer losses: it concatenates every layer's router outputs, so with C_e the top-k assignments
to expert e summed over all L MoE layers and N tokens, and P_e the router probabilities of e
summed likewise,

    aux = E * sum_e (C_e / (L N)) * (P_e / (L N))

and the causal-LM loss becomes `loss + router_aux_loss_coef * aux`. megatron-core's own
switch loss is per layer and divided by top-k, a different number; this module computes HF's.

How it reaches the gradient: each router records (C_l, P_l) of its layer in the current
`Record` and passes its top-k weights through `AuxLossGrad`, an identity whose backward adds
d(coeff * aux)/dP_l = coeff * E * C / (L N)^2 (C over all of the record's layers, known by then)
to the router probabilities' gradient. So the aux loss needs no path from the loss function back
to every layer (pipeline stages, recomputation), like megatron's MoEAuxLossAutoScaler.

Scale: the training loss here is a sum over loss tokens that megatron divides by the global
batch's loss tokens (`calculate_per_token_loss`), so each micro-batch's aux gradient is multiplied
by its own loss-token count (`start_micro_batch`): the aux loss enters as a token-weighted mean
over micro-batches, exactly HF's `loss + coeff * aux` for one micro-batch.

Pipeline parallelism: C and L N span every stage, as in HF. After each micro-batch's forward
(`after_forward`, called by the training step) every stage but the last sends its (C, L N) to the
last stage, which adds its own and sends the totals back (`PipelineChannel`, point-to-point on a
process group of its own, so it never interleaves with megatron's activation exchange); a stage
waits for them in its first aux backward, which 1F1B runs after the last stage's forward. With
tensor/sequence parallelism the counts and sums are all-reduced over the TP group, so N is the
whole sequence, as in HF.

Activation recompute runs a layer's router again in the backward of its micro-batch, when 1F1B
may already have started later micro-batches' forwards: the training step marks each micro-batch's
output (`after_forward`), whose backward makes its record the one the routers add to.

Logging (`pop_step_stats(reduce=True)`): each micro-batch's aux loss from the (C, P, L N) of all
stages, averaged over the micro-batches and the data-parallel ranks; the per-layer load from the
counts of all ranks, for every MoE layer of the model.
"""

from __future__ import annotations

import functools

import torch


class Record:
    """One micro-batch's router statistics on this rank: layer -> (counts [E], prob sums [E],
    tokens)."""

    def __init__(self, loss_tokens: torch.Tensor | None = None):
        self.loss_tokens = loss_tokens
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._counts = None
        self.group = None  # TP group over which the sequence is split (sequence parallel)
        # pipeline parallelism: (C, L*N) over all stages, or the pending receive of them
        self.pipeline_totals: tuple[torch.Tensor, float] | None = None
        self.pending = None  # (work, buffer) of the totals' receive
        self.sends: list = []  # in-flight sends (work, tensor)
        self.training = torch.is_grad_enabled()  # False: an evaluation forward, not logged

    def add(self, layer: int, counts: torch.Tensor, prob_sum: torch.Tensor, tokens: int, group):
        self.layers[layer] = (counts.float(), prob_sum.detach().float(), tokens)
        self.group = group
        self._counts = None

    def _reduced(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None and self.group.size() > 1:
            t = t.clone()
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def finish(self) -> None:
        """Complete this record's pipeline exchange (its partners have posted theirs)."""
        for work, _ in self.sends:
            work.wait()
        self.sends = []
        if self.pending is not None:
            self.totals()

    def totals(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(C, L*N) of the whole model: over all pipeline stages once they are known
        (`PipelineChannel`), else this stage's (`local_totals`)."""
        if self.pipeline_totals is None and self.pending is not None:
            work, buf = self.pending
            work.wait()
            self.pipeline_totals = (buf[:-1], buf[-1])
            self.pending = None
        if self.pipeline_totals is not None:
            return self.pipeline_totals
        return self.local_totals()

    def local_totals(self) -> tuple[torch.Tensor, float]:
        """(C summed over this stage's layers and the TP group, L*N)."""
        if self._counts is None:
            counts = torch.stack([c for c, _, _ in self.layers.values()]).sum(0)
            self._counts = self._reduced(counts)
        rows = sum(n for _, _, n in self.layers.values())
        tp = self.group.size() if self.group is not None else 1
        return self._counts, float(rows * tp)

    def aux_loss(self) -> torch.Tensor:
        """HF's load_balancing_loss_func value (fp32 scalar, no gradient)."""
        if not self.layers:
            return torch.zeros(())
        counts, rows = self.local_totals()
        probs = self._reduced(torch.stack([p for _, p, _ in self.layers.values()]).sum(0))
        return counts.numel() * (counts * probs).sum() / (rows * rows)

    def imbalance(self) -> dict[int, torch.Tensor]:
        """layer -> max / mean tokens per expert (1.0 is perfectly balanced)."""
        out = {}
        for layer, (c, _, _) in self.layers.items():
            c = self._reduced(c)
            out[layer] = c.max() / c.mean().clamp(min=1e-9)
        return out


_current: Record | None = None
MAX_RECORDS = 4096
_step: list[Record] = []


def start_micro_batch(loss_mask: torch.Tensor | None = None) -> Record:
    """A fresh record for the next forward (the training step calls this per micro-batch)."""
    global _current, _backward_record
    _current = Record(None if loss_mask is None else loss_mask.sum().float())
    _backward_record = None
    if len(_step) >= MAX_RECORDS:  # nobody reads them (benchmarks, evaluation): keep the last
        for r in _step[:-1]:
            r.finish()
        del _step[:-1]
    _step.append(_current)
    return _current


def current() -> Record:
    return _current if _current is not None else start_micro_batch()


def pop_step_stats(reduce: bool = False) -> dict:
    """{'aux_loss': mean over this step's training micro-batches, 'expert_load_imbalance': [per
    MoE layer, max/mean tokens per expert, summed over micro-batches]} and reset. Host syncs: call
    once per logged step, outside the hot path. Empty dict when no router ran.

    reduce=False: this rank's layers and samples. reduce=True (collective, every rank calls
    it): the aux loss of all pipeline stages' layers averaged over the data-parallel ranks, the
    load of every MoE layer of the model counted over all ranks."""
    global _current
    step = list(_step)
    _step.clear()
    _current = None
    for r in step:
        r.finish()
    step = [r for r in step if r.training] or step  # evaluation forwards in between: not these
    if reduce and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return _reduced_stats(step)
    records = [r for r in step if r.layers]
    if not records:
        return {}
    aux = torch.stack([r.aux_loss().to(records[0].totals()[0].device) for r in records]).mean()
    layers = sorted(records[0].layers)
    imbalance = []
    for layer in layers:
        counts = sum(r._reduced(r.layers[layer][0]) for r in records if layer in r.layers)
        imbalance.append(round(float(counts.max() / counts.mean().clamp(min=1e-9)), 4))
    return {"aux_loss": float(aux), "expert_load_imbalance": imbalance}


def _reduced_stats(records: list[Record]) -> dict:
    """pop_step_stats(reduce=True): two small all-reduces and one over the world."""
    from megatron.core import parallel_state

    dist = torch.distributed
    device = next((c.device for r in records for c, _, _ in r.layers.values()), None)
    if device is None:  # a stage without MoE layers still takes part in the collectives
        device = torch.device("cuda", torch.cuda.current_device()) if _on_cuda() else "cpu"
    mine = [max(r.layers, default=0) for r in records]
    experts = next((c.numel() for r in records for c, _, _ in r.layers.values()), 0)
    meta = torch.tensor([len(records), max(mine, default=0), experts], device=device)
    dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    n_records, n_layers, e = (int(x) for x in meta.tolist())
    if e == 0:
        return {}
    # per micro-batch (C, P, L*N) of this stage, summed over the pipeline stages
    parts = torch.zeros(n_records, 2 * e + 1, dtype=torch.float32, device=device)
    for i, r in enumerate(records):
        if r.layers:
            counts, rows = r.local_totals()
            probs = r._reduced(torch.stack([p for _, p, _ in r.layers.values()]).sum(0))
            parts[i, :e], parts[i, e : 2 * e], parts[i, -1] = counts, probs, rows
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(parts, group=parallel_state.get_pipeline_model_parallel_group())
    used = parts[:, -1] > 0
    aux = e * (parts[:, :e] * parts[:, e : 2 * e]).sum(1) / parts[:, -1].clamp(min=1) ** 2
    mean = torch.stack([aux[used].sum(), used.sum().float()])
    dp = parallel_state.get_data_parallel_group()
    if dp.size() > 1:  # each data-parallel rank ran its own samples
        dist.all_reduce(mean, group=dp)
    # per layer: tokens per expert over every rank (max/mean is scale-free, so ranks that hold
    # the same tokens, TP without SP, may count them twice)
    load = torch.zeros(n_layers, e, dtype=torch.float32, device=device)
    for r in records:
        for layer, (c, _, _) in r.layers.items():
            load[max(layer, 1) - 1] += c
    dist.all_reduce(load)
    totals = load.sum(1)
    imbalance = [
        round(float(row.max() / row.mean().clamp(min=1e-9)), 4)
        for row, total in zip(load, totals)
        if total > 0
    ]
    aux_loss = float(mean[0] / mean[1].clamp(min=1e-9))
    return {"aux_loss": aux_loss, "expert_load_imbalance": imbalance}


def _on_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


class PipelineChannel:
    """The exchange of (C, L*N) between pipeline stages for the aux gradient (module
    docstring): stage s < last sends after its forward and posts the receive of the totals;
    the last stage receives every stage's, adds its own, and sends the totals back."""

    def __init__(self, group, ranks: list[int], num_experts: int, coeff: float, device):
        self.group, self.ranks = group, ranks
        self.num_experts, self.coeff, self.device = num_experts, coeff, device
        self.rank = torch.distributed.get_rank()

    def _vector(self, record: Record) -> torch.Tensor:
        out = torch.zeros(self.num_experts + 1, dtype=torch.float32, device=self.device)
        if record.layers:
            counts, rows = record.local_totals()
            out[:-1], out[-1] = counts, rows
        return out

    def exchange(self, record: Record) -> None:
        dist, last = torch.distributed, self.ranks[-1]
        mine = self._vector(record)
        if self.rank != last:
            buf = torch.empty_like(mine)
            sent = dist.isend(mine, dst=last, group=self.group)
            record.pending = (dist.irecv(buf, src=last, group=self.group), buf)
            record.sends = [(sent, mine)]
            return
        for src in self.ranks[:-1]:
            buf = torch.empty_like(mine)
            dist.recv(buf, src=src, group=self.group)
            mine += buf
        record.pipeline_totals = (mine[:-1], mine[-1])  # no host sync
        record.sends = [(dist.isend(mine, dst=d, group=self.group), mine) for d in self.ranks[:-1]]


_channel: PipelineChannel | None = None
_channel_groups: dict = {}


def setup_pipeline(config, device) -> None:
    """Called by the model builder on every rank (collective when PP > 1): the aux gradient
    of a MoE model under pipeline parallelism needs the counts of all stages."""
    global _channel
    from megatron.core import parallel_state

    _channel = None
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1 or not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return
    dist = torch.distributed
    ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    key = (dist.get_world_size(), tuple(ranks))
    if key not in _channel_groups:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(ranks))
        groups = sorted({tuple(g) for g in everyone})
        mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in groups])
        _channel_groups[key] = mine
    _channel = PipelineChannel(
        _channel_groups[key],
        list(ranks),
        config.num_moe_experts,
        config.moe_aux_loss_coeff,
        device,
    )


def after_forward(output: torch.Tensor | None = None) -> None:
    """After a micro-batch's forward on this stage (the training step), with gradients: with
    pipeline parallelism, exchange the router counts for the aux gradient; and mark `output` so
    that its backward finds this micro-batch's record (activation recompute runs the routers
    again in the backward, when 1F1B may have started later micro-batches' forwards)."""
    if not torch.is_grad_enabled():
        return
    record = current()
    if _channel is not None:
        _channel.exchange(record)
    if record.layers and output is not None and output.requires_grad:
        output.register_hook(functools.partial(_backward_of, record))


_backward_record: Record | None = None


def _backward_of(record: Record, grad):
    """Tensor hook on a micro-batch's output: its backward starts here."""
    global _backward_record
    _backward_record = record  # the gradient passes unchanged


def router_record() -> Record:
    """The record a router adds to: the current forward's, or in a backward (recompute) the
    record of the micro-batch being backpropagated."""
    if _backward_record is not None and torch._C._current_graph_task_id() != -1:
        return _backward_record
    return current()


class AuxLossGrad(torch.autograd.Function):
    """Identity on the router's top-k weights; backward adds coeff * d aux / d P_layer to the
    full router probabilities (through prob_sum = probs.sum(0), which the caller passes)."""

    @staticmethod
    def forward(ctx, weights, prob_sum, record: Record, coeff: float):
        ctx.record, ctx.coeff = record, coeff
        ctx.num_experts = prob_sum.shape[0]
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        record = ctx.record
        counts, rows = record.totals()  # of the whole model, all pipeline stages
        scale = ctx.coeff * ctx.num_experts / (rows * rows)
        if record.loss_tokens is not None:
            scale = scale * record.loss_tokens.to(counts.device)
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        # megatron's schedules set this to the loss scale (1 unless fp16 loss scaling)
        loss_scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if loss_scale is not None:
            scale = scale * loss_scale.to(counts.device)
        return grad, counts * scale, None, None


def attach(
    weights: torch.Tensor,
    probs: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    coeff: float,
    group,
) -> torch.Tensor:
    """Record this layer's statistics; return the weights with the aux gradient attached."""
    record = router_record()
    prob_sum = probs.float().sum(0)
    record.add(layer, counts, prob_sum, probs.shape[0], group)
    if coeff and torch.is_grad_enabled() and probs.requires_grad:
        return AuxLossGrad.apply(weights, prob_sum, record, coeff)
    return weights
