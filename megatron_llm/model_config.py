"""The model section of the config: the architecture menu every family is a set of values of.

Each choice is one typed field; a Hugging Face family (checkpoint/families/) is a table of values for
them, never a branch in the model. Defaults are LLaMA's and reproduce checkpoints written before a
field existed. Per-layer variation (sliding or full attention, the local RoPE base, layers without
positions) is resolved in one place, `ModelConfig.layer(i)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_llm.errors import UsageError


def param(default: Any, help: str) -> Any:
    """A dataclass field carrying its one-line help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# The keys each RoPE scaling kind reads (besides rope_type), as transformers' rope_parameters name them.
ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
    "longrope": (
        {"long_factor", "short_factor", "original_max_position_embeddings"}, {"factor", "attention_factor"},
    ),
}
GATED_MLPS = ("swiglu", "geglu", "geglu_tanh", "reglu")


@dataclass(frozen=True)
class LayerSpec:
    """What differs between the layers of one model."""

    window: Optional[int]  # sliding-window size in tokens (a query sees itself and window - 1 before it), or None
    rope: Optional[str]  # "global" or "local" RoPE table; None: no positions in this layer (NoPE)


@dataclass
class ModelConfig:
    vocab_size: int = param(257, "tokenizer vocabulary size (the byte tokenizer has 257: 256 bytes + end-of-document)")
    hidden_size: int = param(256, "width of the residual stream")
    num_layers: int = param(4, "number of transformer blocks")
    num_heads: int = param(8, "query heads per attention layer")
    num_kv_heads: Optional[int] = param(None, "key/value heads (grouped-query attention); null means num_heads")
    head_dim: Optional[int] = param(None, "per-head width; null means hidden_size / num_heads")
    ffn_hidden_size: int = param(688, "inner width of the MLP")
    mlp: Literal["swiglu", "geglu", "geglu_tanh", "reglu", "gelu", "gelu_tanh", "relu", "relu2", "silu"] = param(
        "swiglu", "MLP kind: gated (swiglu, geglu, geglu_tanh, reglu: act(w1 x) * w3 x) or plain (act(w1 x))"
    )
    norm: Literal["rmsnorm", "layernorm"] = param("rmsnorm", "normalisation layer")
    norm_eps: float = param(1e-5, "epsilon of the norm layers")
    norm_bias: bool = param(True, "layernorm: with a bias (false: Cohere, OLMo)")
    norm_affine: bool = param(True, "norms have a weight (false: OLMo's parameter-free layernorm)")
    norm_unit_offset: bool = param(False, "norm weights act as 1 + w and start at 0 (Gemma, Nemotron's LayerNorm1P)")
    norm_placement: Literal["pre", "post", "sandwich", "output", "deepnorm"] = param(
        "pre",
        "pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + norm(f(norm(x))) (Gemma2/3, GLM4); "
        "output: x + norm(f(x)) (OLMo2); deepnorm: norm(alpha x + f(x)) with beta-scaled init (DeepNet)",
    )
    parallel_residual: bool = param(False, "x + attention(n1(x)) + mlp(n2(x)) (GPT-J, NeoX, Falcon, Phi, Cohere)")
    parallel_shared_norm: bool = param(True, "parallel_residual: one input norm for both sublayers (n1 = n2)")
    max_seq_len: int = param(256, "longest sequence the position tables cover")
    position: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = param(
        "rope", "positions: rotary, ALiBi biases, learned or sinusoidal absolute embeddings, or none (NoPE)"
    )
    rope_theta: float = param(10000.0, "RoPE base frequency")
    rope_scaling: Optional[dict] = param(
        None,
        "RoPE frequency scaling: {rope_type: linear|llama3|yarn|longrope, ...its keys, as transformers names them}",
    )
    rope_interleaved: bool = param(False, "rotate pairs (2j, 2j+1) (GPT-J, GLM, Cohere) instead of halves (j, j+d/2)")
    rope_fraction: float = param(1.0, "fraction of head_dim that is rotated (partial rotary: NeoX, Phi, GLM)")
    rope_local_theta: Optional[float] = param(None, "RoPE base of sliding-window layers (Gemma3); null: rope_theta")
    nope_layers: list[int] = param([], "layers without positions (SmolLM3's NoPE layers)")
    layer_types: Optional[list[str]] = param(
        None, "per layer 'full' or 'sliding' attention; null: all sliding when sliding_window is set, else all full"
    )
    sliding_window: Optional[int] = param(None, "window of the sliding layers, in tokens (the query included)")
    attention_scale: Optional[float] = param(
        None, "multiplier of q.k; null: 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar, Granite's attention_multiplier)"
    )
    attn_softcap: Optional[float] = param(None, "attention-logit soft-capping: cap * tanh(scores / cap) (Gemma2)")
    qk_norm: bool = param(False, "a norm on queries and keys before RoPE (Qwen3, OLMo2, Gemma3)")
    qk_norm_per_head: bool = param(True, "qk_norm over each head's head_dim (Qwen3); false: over the whole projection (OLMo2)")
    qkv_clip: Optional[float] = param(None, "clamp q, k and v to [-clip, clip] (OLMo's clip_qkv)")
    qkv_bias: bool = param(False, "bias on the q/k/v projections (Qwen2)")
    linear_bias: bool = param(False, "bias on every other linear layer (the default of out_bias and mlp_bias)")
    out_bias: Optional[bool] = param(None, "bias on the attention output projection; null: linear_bias")
    mlp_bias: Optional[bool] = param(None, "bias on the MLP projections; null: linear_bias")
    output_bias: bool = param(False, "bias on the output head (GPT-J, Phi)")
    tie_embeddings: bool = param(False, "share the token embedding with the output head")
    embedding_norm: bool = param(False, "a norm right after the embedding (BLOOM)")
    embedding_multiplier: float = param(1.0, "scale of the embedding output (Gemma: sqrt(hidden_size); Granite)")
    residual_multiplier: float = param(1.0, "scale of each sublayer's output before the residual add (Granite)")
    logit_multiplier: float = param(1.0, "scale of the logits (Cohere's logit_scale; Granite's 1 / logits_scaling)")
    logit_softcap: Optional[float] = param(None, "final-logit soft-capping: cap * tanh(logits / cap); null disables")
    norm_head: bool = param(False, "normalise each row of the head weight before the matmul (Baichuan2's NormHead)")
    init_std: float = param(0.02, "std of the normal init of every weight matrix")
    scaled_init: bool = param(True, "divide the init std of output projections by sqrt(2 * num_layers)")

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.out_bias is None:
            self.out_bias = self.linear_bias
        if self.mlp_bias is None:
            self.mlp_bias = self.linear_bias
        self.linear_bias = self.out_bias and self.mlp_bias  # canonical: equal configs compare equal
        if self.rope_scaling is not None and "rope_type" not in self.rope_scaling:
            self.rope_scaling = {"rope_type": "llama3", **self.rope_scaling}  # the only kind before rope_type

    # ---------------------------------------------------------------------------------------------
    # Derived values: one place each.

    @property
    def gated(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def rope_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates (even); the rest pass through."""
        return int(self.head_dim * self.rope_fraction) // 2 * 2

    @property
    def residual_alpha(self) -> float:
        """DeepNet's residual scale for a decoder of N layers, (2N)^(1/4); 1 elsewhere."""
        return (2 * self.num_layers) ** 0.25 if self.norm_placement == "deepnorm" else 1.0

    @property
    def init_beta(self) -> float:
        """DeepNet's init gain of the value, output and MLP projections, (8N)^(-1/4); 1 elsewhere."""
        return (8 * self.num_layers) ** -0.25 if self.norm_placement == "deepnorm" else 1.0

    def layer(self, i: int) -> LayerSpec:
        """Layer i's window and RoPE table."""
        kind = self.layer_types[i] if self.layer_types else ("sliding" if self.sliding_window else "full")
        window = self.sliding_window if kind == "sliding" else None
        if self.position != "rope" or i in self.nope_layers:
            return LayerSpec(window, None)
        return LayerSpec(window, "local" if window and self.rope_local_theta is not None else "global")

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters of the model this config builds, counted on the meta device (no memory)."""
        from megatron_llm.model.transformer import count_params

        return count_params(self, include_embedding)

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UsageError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.head_dim is None:
            raise UsageError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_heads ({self.num_heads}); "
                "change one of them or set model.head_dim"
            )
        if self.num_heads % self.num_kv_heads:
            raise UsageError(
                f"model.num_heads ({self.num_heads}) is not divisible by model.num_kv_heads ({self.num_kv_heads})"
            )
        self._validate_scalars()
        self._validate_positions()
        self._validate_layers()
        self._validate_norms()

    def _validate_scalars(self) -> None:
        for key in ("norm_eps", "init_std", "embedding_multiplier", "residual_multiplier", "logit_multiplier"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"model.{key} must be a positive finite number, got {value}")
        for key in ("logit_softcap", "attn_softcap", "attention_scale", "qkv_clip", "rope_local_theta"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"model.{key} must be a positive finite number or null, got {value}")

    def _validate_positions(self) -> None:
        if not 0 < self.rope_fraction <= 1:
            raise UsageError(f"model.rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.position != "rope":
            return
        if self.rope_dim == 0:
            raise UsageError(f"model.rope_fraction {self.rope_fraction} of head_dim {self.head_dim} rotates nothing")
        if self.rope_scaling is None:
            return
        kind = self.rope_scaling.get("rope_type")
        if kind not in ROPE_SCALING_KEYS:
            raise UsageError(
                f"model.rope_scaling: unknown rope_type {kind!r}; supported: {', '.join(ROPE_SCALING_KEYS)}"
            )
        needed, optional = ROPE_SCALING_KEYS[kind]
        keys = set(self.rope_scaling) - {"rope_type"}
        if not needed <= keys or keys - needed - optional:
            raise UsageError(
                f"model.rope_scaling {kind} needs the keys {sorted(needed)} (optional: {sorted(optional)}), "
                f"got {sorted(keys)}"
            )
        if kind == "longrope":
            for key in ("long_factor", "short_factor"):
                if len(self.rope_scaling[key]) != self.rope_dim // 2:
                    raise UsageError(f"model.rope_scaling.{key} needs rope_dim / 2 = {self.rope_dim // 2} entries")

    def _validate_layers(self) -> None:
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"full", "sliding"}:
                raise UsageError(
                    f"model.layer_types needs {self.num_layers} entries (num_layers), each 'full' or 'sliding'"
                )
            if "sliding" in self.layer_types and not self.sliding_window:
                raise UsageError("model.layer_types has sliding layers: set model.sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UsageError(f"model.sliding_window must be positive or null, got {self.sliding_window}")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise UsageError(f"model.nope_layers {self.nope_layers}: layer indices are 0..{self.num_layers - 1}")

    def _validate_norms(self) -> None:
        if self.norm_unit_offset and not self.norm_affine:
            raise UsageError("model.norm_unit_offset needs model.norm_affine true (an offset of which weight?)")
        if self.parallel_residual and self.norm_placement != "pre":
            raise UsageError(
                f"model.parallel_residual uses pre-norm: model.norm_placement {self.norm_placement!r} cannot combine"
            )
        if self.norm_head and self.tie_embeddings:
            raise UsageError("model.norm_head normalises the head alone: it cannot be tied (set tie_embeddings false)")
