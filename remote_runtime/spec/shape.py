"""One model shape: what the planner, the memory model and the training metrics count with.

`ModelShape.from_hf_config(hf)` asks the model families, so the shape holds exactly the numbers
the runtime builds the model from (and refuses the same checkpoints). Parameter counts are the
Hugging Face checkpoint's; FLOPs follow Megatron-LM's formula for a GPT (forward + backward =
3 × forward, a multiply-add = 2 FLOPs) with causal attention counted as half the score matrix,
as the reference speeds in DESIGN.md do. A mixture-of-experts layer counts the routed top-k
experts (and a shared expert) in FLOPs, every expert in parameters; a MoE model's dense-MLP
layers (`moe_layers`: Qwen's mlp_only_layers / decoder_sparse_step) count their dense MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dim
    ffn_hidden_size: int  # the dense MLP's (unused by MoE layers)
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    gated_linear_unit: bool = True
    num_experts: int = 0  # 0: dense
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int = 0  # one expert's FFN
    shared_expert_ffn_hidden_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    # per layer 1 = MoE, 0 = dense MLP of ffn_hidden_size; empty: every layer of a MoE model
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_transformer_config(cls, tc: dict, family: str = "") -> "ModelShape":
        """From a family's `transformer_config_kwargs` (megatron names)."""
        heads = tc["num_attention_heads"]
        return cls(
            family=family,
            num_layers=tc["num_layers"],
            hidden_size=tc["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=tc.get("num_query_groups") or heads,
            kv_channels=tc.get("kv_channels") or tc["hidden_size"] // heads,
            ffn_hidden_size=tc.get("ffn_hidden_size") or 0,
            vocab_size=int(tc["vocab_size"]),
            tie_word_embeddings=bool(tc.get("share_embeddings_and_output_weights", False)),
            qkv_bias=bool(tc.get("add_qkv_bias", False)),
            qk_layernorm=bool(tc.get("qk_layernorm", False)),
            gated_linear_unit=bool(tc.get("gated_linear_unit", True)),
            num_experts=int(tc.get("num_moe_experts") or 0),
            moe_router_topk=int(tc.get("moe_router_topk") or 0),
            moe_ffn_hidden_size=int(tc.get("moe_ffn_hidden_size") or 0),
            shared_expert_ffn_hidden_size=int(tc.get("moe_shared_expert_intermediate_size") or 0),
            moe_layers=_moe_layers(tc),
        )

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelShape":
        """The shape of a config.json; raises ConfigError for what the runtime cannot train."""
        from remote_runtime.spec.families import family_for_hf_config

        family = family_for_hf_config(hf)
        return cls.from_transformer_config(family.transformer_config_kwargs(hf), family.name)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def moe_layer_flags(self) -> list[bool]:
        """Per layer: is it a MoE layer (False for every layer of a dense model)."""
        if not self.is_moe:
            return [False] * self.num_layers
        if not self.moe_layers:
            return [True] * self.num_layers
        return [bool(f) for f in self.moe_layers]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_flags())

    @property
    def has_dense_layers(self) -> bool:
        """A MoE model with dense-MLP layers between its MoE layers."""
        return self.is_moe and self.num_moe_layers < self.num_layers

    # ---- parameters ------------------------------------------------------------------------
    def _mlp_matrices(self) -> int:
        return 3 if self.gated_linear_unit else 2  # SwiGLU: gate, up, down

    def layer_param_groups(self, moe: bool | None = None) -> dict[str, int]:
        """One layer's parameters by how tensor/expert parallelism splits them:
        `tp_split` (attention, dense MLP, shared expert), `experts` (all routed experts), and
        `replicated` (norms, router, shared-expert gate). `moe`: a MoE layer or a dense-MLP
        layer (default: a MoE layer of a MoE model)."""
        h, d = self.hidden_size, self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * d
        split = h * qkv_out + self.num_attention_heads * d * h + (qkv_out if self.qkv_bias else 0)
        replicated = 2 * h + (2 * d if self.qk_layernorm else 0)
        experts = 0
        if self.is_moe if moe is None else (moe and self.is_moe):
            experts = self.num_experts * self._mlp_matrices() * h * self.moe_ffn_hidden_size
            replicated += self.num_experts * h  # router
            if self.shared_expert_ffn_hidden_size:
                split += self._mlp_matrices() * h * self.shared_expert_ffn_hidden_size
                replicated += h  # the shared expert's gate
        else:
            split += self._mlp_matrices() * h * self.ffn_hidden_size
        return {"tp_split": split, "experts": experts, "replicated": replicated}

    def layer_params(self, moe: bool | None = None) -> int:
        return sum(self.layer_param_groups(moe).values())

    def layers_param_groups(self, first: int, count: int) -> dict[str, int]:
        """`layer_param_groups` summed over layers first .. first + count - 1 (a pipeline
        stage), each by its kind."""
        out = {"tp_split": 0, "experts": 0, "replicated": 0}
        for moe in self.moe_layer_flags()[first : first + count]:
            for k, v in self.layer_param_groups(moe).items():
                out[k] += v
        return out

    def embedding_params(self) -> int:
        """Input embedding plus the output layer (unless tied); unpadded vocabulary."""
        embed = self.vocab_size * self.hidden_size
        return embed if self.tie_word_embeddings else 2 * embed

    def total_params(self) -> int:
        """Parameters of the Hugging Face checkpoint (unpadded vocabulary)."""
        layers = sum(self.layer_params(moe) for moe in self.moe_layer_flags())
        return layers + self.embedding_params() + self.hidden_size

    def active_params(self) -> int:
        """Parameters one token passes through: the routed top-k experts instead of all."""
        if not self.is_moe:
            return self.total_params()
        inactive = (self.num_experts - self.moe_router_topk) * (
            self._mlp_matrices() * self.hidden_size * self.moe_ffn_hidden_size
        )
        return self.total_params() - self.num_moe_layers * inactive

    # ---- FLOPs -----------------------------------------------------------------------------
    def training_flops(self, num_tokens: int, sum_sq_doc_lengths: int) -> float:
        """FLOPs of one training step (forward + backward) over `num_tokens` real tokens.

        Megatron-LM: 12·L·h²·tokens·[(1 + g/n)·q + (ffn/h)·glu + V/(2·L·h)] for the linear layers
        and 12·L·h²·q·(s/h)·½ per token for causal attention, where q = n·d/h. With documents of
        lengths sᵢ the attention term becomes 6·L·n·d·Σ sᵢ². An MoE layer's ffn is the top-k
        experts' plus the shared expert's, and the router adds E/(2h); with dense-MLP layers
        among the MoE layers, ffn and the router term are the averages over the layers.
        """
        L, h = self.num_layers, self.hidden_size
        q_ratio = self.num_attention_heads * self.kv_channels / h
        glu = 1.5 if self.gated_linear_unit else 1.0
        ffn, router = self.ffn_hidden_size, 0.0
        if self.is_moe:
            moe, dense = self.num_moe_layers, L - self.num_moe_layers
            routed = (
                self.moe_router_topk * self.moe_ffn_hidden_size + self.shared_expert_ffn_hidden_size
            )
            ffn = (moe * routed + dense * self.ffn_hidden_size) / L
            router = moe * self.num_experts / (2 * h) / L  # one h×E matmul: 6·h·E per token
        linear = (
            12
            * L
            * h
            * h
            * num_tokens
            * (
                (1 + self.num_query_groups / self.num_attention_heads) * q_ratio
                + (ffn / h) * glu
                + router
                + self.vocab_size / (2 * L * h)
            )
        )
        attention = 6 * L * self.num_attention_heads * self.kv_channels * sum_sq_doc_lengths
        return float(linear + attention)

    def to_dict(self) -> dict:
        out = {**asdict(self), "params": self.total_params()}
        out["moe_layers"] = list(self.moe_layers)
        if self.is_moe:
            out["active_params"] = self.active_params()
        return out


def _moe_layers(tc: dict) -> tuple[int, ...]:
    """megatron's moe_layer_freq as a per-layer 0/1 tuple; () when every layer is MoE (or the
    model is dense)."""
    from remote_runtime.spec.families.base import moe_layer_flags

    flags = moe_layer_flags(tc)
    if flags is None or all(flags):
        return ()
    return tuple(int(f) for f in flags)
