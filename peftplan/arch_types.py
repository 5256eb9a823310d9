"""The architecture data model: frozen dataclasses describing a model's shapes (`Linear`, `Norm`, `Block`,
`MoE`, `ModelArch`), the `ArchError` a bad config raises, and `_Fields`, the config.json field reader the
per-`model_type` builders share (`arch_classic.py`, `arch_modern.py`, `arch_moe.py`; `arch.py` maps a
config to its builder).

Notation (scaling-book style): V vocabulary, D hidden size, H query heads, K key/value heads,
hd head dim, F MLP intermediate size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Family = Literal["generic", "llama", "gemma2", "gemma3", "olmo2", "gpt_oss", "phi3", "gpt2", "opt", "bloom", "t5", "bert"]
Task = Literal["causal-lm", "seq2seq-lm", "masked-lm"]
StackKind = Literal["decoder", "encoder", "cross-decoder"]


class ArchError(ValueError):
    """A config.json peftplan cannot map to an architecture (one line, for the user)."""


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or GPT-2 Conv1D) as the model names it; `name` is what peft targets."""

    path: str  # module path inside its block (or model), e.g. "self_attn.q_proj", "mlp.c_proj"
    in_features: int
    out_features: int
    bias: bool
    role: str  # q, k, v, qkv, o, up, gate, gate_up, down, cross_q, cross_k, cross_v, cross_o, proj

    @property
    def name(self) -> str:
        """Last path component: what users write in --targets ("q_proj", "c_attn")."""
        return self.path.rsplit(".", 1)[-1]

    def matches(self, target: str) -> bool:
        """peft's suffix rule (tuners_utils.check_target_module_exists): the key ends with '.' + target."""
        return self.path == target or self.path.endswith("." + target) or target == self.name

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def numel(self) -> int:
        return self.weight_numel + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Norm:
    """A LayerNorm/RMSNorm of width `dim`; `bias` for LayerNorm with a bias."""

    name: str
    dim: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.dim * (2 if self.bias else 1)


@dataclass(frozen=True)
class Block:
    """One transformer layer: its linears and norms, and small extra tensors (T5's position bias)."""

    stack: StackKind
    linears: tuple[Linear, ...]
    norms: tuple[Norm, ...]
    extra_params: tuple[tuple[str, int], ...] = ()  # (name, numel)
    sliding_window: int | None = None  # this layer attends to the last `sliding_window` keys (None: global)
    rope: bool = True  # False on SmolLM3's NoPE layers
    moe: MoE | None = None  # a sparse MoE MLP (its parameters are in extra_params)

    @property
    def numel(self) -> int:
        return (
            sum(lin.numel for lin in self.linears)
            + sum(n.numel for n in self.norms)
            + sum(n for _, n in self.extra_params)
        )

    def linear(self, role: str) -> Linear | None:
        for lin in self.linears:
            if lin.role == role:
                return lin
        return None


@dataclass(frozen=True)
class ModelArch:
    """Everything the engine, tracer and profiler need to know about a model's shapes.

    Parameters outside the blocks are listed explicitly: `embeddings` (token, position, type
    embeddings and their norm), `final_norms`, `head_linears` (lm_head when untied, MLM transform,
    OPT's projections) and `head_extra` (e.g. the MLM output bias).
    """

    name: str
    model_type: str
    family: Family
    task: Task
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool
    activation: str
    norm_kind: Literal["rmsnorm", "layernorm"]
    blocks: tuple[Block, ...]
    embeddings: tuple[tuple[str, int, int], ...]  # (name, rows, cols)
    final_norms: tuple[Norm, ...]
    head_linears: tuple[Linear, ...]
    head_extra: tuple[tuple[str, int], ...]
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    sliding_window: int | None = None
    # tanh soft-capping (Gemma 2, Gemma 3's final logits): scores = cap * tanh(scores / cap) in eager attention,
    # and the same on the logits before the loss (modeling_gemma2.py eager_attention_forward,
    # Gemma2ForCausalLM.forward; Gemma3ForCausalLM.forward).
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Modules transformers keeps in fp32 whatever the load dtype (`_keep_in_fp32_modules`; T5's "wo").
    keep_in_fp32: tuple[str, ...] = ()
    # q/k RMSNorms (arch_modern.py): "head" over head_dim per head (qwen3, gemma3), "proj" over the whole
    # projection (olmo2), "" none
    qk_norm: str = ""
    embed_scale: bool = False  # gemma3: embeddings multiplied by sqrt(hidden_size) inside the embedding module
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- counts -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def embedding_numel(self) -> int:
        return sum(rows * cols for _, rows, cols in self.embeddings)

    @property
    def lm_head_numel(self) -> int:
        """Untied output projection V x D (0 when tied to the input embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.head_in_features

    @property
    def head_in_features(self) -> int:
        """Width entering the vocabulary projection (OPT-350m projects 1024 -> 512 first)."""
        return self.embeddings[0][2]

    @property
    def total_params(self) -> int:
        """Exact parameter count of the HF model (what `print_trainable_parameters` calls all params)."""
        return (
            self.embedding_numel
            + sum(b.numel for b in self.blocks)
            + sum(n.numel for n in self.final_norms)
            + sum(lin.numel for lin in self.head_linears)
            + sum(n for _, n in self.head_extra)
            + self.lm_head_numel
        )

    @property
    def active_params(self) -> int:
        """Parameters one token uses: total minus the experts it is not routed to (top_k of num_experts)."""
        return self.total_params - sum((b.moe.num_experts - b.moe.top_k) * b.moe.expert_numel
                                       for b in self.blocks if b.moe is not None)

    def all_linear_names(self) -> tuple[str, ...]:
        """Distinct block linear names, in module order (peft's 'all-linear' excludes the output head)."""
        seen: dict[str, None] = {}
        for block in self.blocks:
            for lin in block.linears:
                seen.setdefault(lin.name, None)
        return tuple(seen)

    def stacks(self) -> tuple[StackKind, ...]:
        seen: dict[StackKind, None] = {}
        for block in self.blocks:
            seen.setdefault(block.stack, None)
        return tuple(seen)


@dataclass(frozen=True)
class MoE:
    """A sparse MoE MLP as transformers 5.23 builds it (integrations/moe.py, models/<type>/modeling_<type>.py):
    a router `gate.weight` (E x D, an nn.Parameter, not an nn.Linear) and fused 3-D expert parameters
    `experts.gate_up_proj` (E x 2F x D) and `experts.down_proj` (E x D x F) (+ biases for gpt_oss);
    each token goes to `top_k` of `num_experts` experts. The tensors are listed in the block's
    `extra_params`; this says how the forward uses them (engine/program_moe.py)."""

    kind: str  # "mixtral", "qwen3_moe": which router code
    num_experts: int
    top_k: int
    hidden: int
    ffn: int  # expert intermediate size F
    bias: bool = False  # expert and router biases (gpt_oss)
    norm_topk: bool = True  # renormalise the top-k probabilities (mixtral always; qwen3_moe norm_topk_prob)
    router: str = "gate"  # the router module's name (gpt_oss: "router")
    transposed: bool = False  # gpt_oss stores gate_up_proj as E x D x 2F and down_proj as E x F x D

    @property
    def expert_numel(self) -> int:
        """Parameters of one expert: gate_up (2F x D) + down (D x F), with biases when present."""
        return 3 * self.ffn * self.hidden + ((2 * self.ffn + self.hidden) if self.bias else 0)

    def params(self, prefix: str = "mlp.") -> tuple[tuple[str, int], ...]:
        """(name, numel) of the router and the fused expert tensors, in module order (gate, then experts)."""
        E, D, F = self.num_experts, self.hidden, self.ffn
        out = [(f"{prefix}{self.router}.weight", E * D)]
        if self.bias:
            out.append((f"{prefix}{self.router}.bias", E))
        out += [(f"{prefix}experts.gate_up_proj", E * 2 * F * D), (f"{prefix}experts.down_proj", E * D * F)]
        if self.bias:
            out += [(f"{prefix}experts.gate_up_proj_bias", E * 2 * F), (f"{prefix}experts.down_proj_bias", E * D)]
        return tuple(out)


# ---- reading config fields ---------------------------------------------------------------


class _Fields:
    """Reads config fields by name, raising ArchError naming the model and the missing field."""

    def __init__(self, name: str, cfg: Mapping[str, Any]):
        self.name = name
        self.cfg = cfg

    def req(self, *keys: str) -> Any:
        for key in keys:
            if key in self.cfg and self.cfg[key] is not None:
                return self.cfg[key]
        raise ArchError(f"{self.name}: config.json lacks required field {' or '.join(repr(k) for k in keys)}")

    def pos_int(self, *keys: str) -> int:
        value = self.req(*keys)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArchError(f"{self.name}: config field {keys[0]!r} must be a positive integer, got {value!r}")
        return value

    def opt(self, key: str, default: Any) -> Any:
        value = self.cfg.get(key, default)
        return default if value is None else value
