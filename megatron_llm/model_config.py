"""The model section of the config: the architecture menu every family is a set of values of.

Each choice is one typed field; a Hugging Face family (checkpoint/families/) is a table of values for
them, never a branch in the model. Defaults are LLaMA's and reproduce checkpoints written before a
field existed. Per-layer variation (sliding or full attention, the local RoPE base, layers without
positions) is resolved in one place, `ModelConfig.layer(i)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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
    # Gemma 4's full layers: the first partial_rotary_factor of the whole head's frequencies turn, the rest stay
    "proportional": ({"partial_rotary_factor"}, {"factor"}),
}
GATED_MLPS = ("swiglu", "geglu", "geglu_tanh", "reglu", "swiglu_clamped")


@dataclass(frozen=True)
class LayerSpec:
    """What differs between the layers of one model."""

    window: Optional[int]  # sliding-window size in tokens (a query sees itself and window - 1 before it), or None
    rope: Optional[str]  # "global" or "local" RoPE table; None: no positions in this layer (NoPE)
    moe: bool = False  # a mixture of experts in the feed_forward slot (model/moe.py) instead of one MLP
    chunk: Optional[int] = None  # chunked attention: a query sees the keys of its own chunk only (Llama 4)
    # what fills the attention slot: attention, "linear" (Gated DeltaNet, model/linear_attention.py) or "mamba"
    # (Mamba-2, model/mamba.py); the recurrent mixers have no positions (rope None)
    mixer: str = "attention"
    head_dim: Optional[int] = None  # this layer's own head width; None: model.head_dim (Gemma 4's full layers differ)
    kv_heads: Optional[int] = None  # this layer's own key/value heads; None: model.num_kv_heads
    values_from_keys: bool = False  # no wv: the values are wk's output before k_norm and RoPE (Gemma 4's k_eq_v)
    # the sublayers of the block: "both", or one alone (model.single_sublayer): "mixer" (no feed_forward slot) or
    # "ffn" (no attention slot: a feed_forward, dense or MoE, behind its norm)
    sublayers: str = "both"

    @property
    def linear(self) -> bool:
        """A Gated DeltaNet mixer in the attention slot."""
        return self.mixer == "linear"


@dataclass
class ModelConfig:
    vocab_size: int = param(257, "tokenizer vocabulary size (the byte tokenizer has 257: 256 bytes + end-of-document)")
    hidden_size: int = param(256, "width of the residual stream")
    num_layers: int = param(4, "number of transformer blocks")
    num_heads: int = param(8, "query heads per attention layer")
    num_kv_heads: Optional[int] = param(None, "key/value heads (grouped-query attention); null means num_heads")
    head_dim: Optional[int] = param(None, "per-head width; null means hidden_size / num_heads")
    ffn_hidden_size: int = param(688, "inner width of the MLP")
    mlp: Literal["swiglu", "geglu", "geglu_tanh", "reglu", "swiglu_clamped", "gelu", "gelu_tanh", "relu", "relu2", "silu",
                 "xielu"] = param(
        "swiglu", "MLP kind: gated (swiglu, geglu, geglu_tanh, reglu: act(w1 x) * w3 x; swiglu_clamped: gpt-oss's, see "
        "swiglu_limit) or plain (act(w1 x)); xielu: plain, with two learned scalars per layer (Apertus)"
    )
    swiglu_alpha: float = param(1.702, "swiglu_clamped: g * sigmoid(alpha * g) on the clamped gate g (gpt-oss)")
    swiglu_limit: float = param(
        7.0, "swiglu_clamped: the gate clamped to at most limit, the up projection u to [-limit, limit], then (u + 1) "
        "times the gate's activation (gpt-oss)")
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
    position_offset: int = param(
        0, "learned or sinusoidal positions: position p reads row p + this of a table of max_seq_len + this rows "
        "(fairseq's padding rows: OPT, BioGPT, XGLM 2)")
    sinusoid: Literal["vaswani", "tensor2tensor", "vaswani_blocked"] = param(
        "vaswani", "sinusoidal positions: vaswani: sin and cos interleaved at 10000^(-2j/d); tensor2tensor: the sines "
        "then the cosines at 10000^(-j/(d/2 - 1)) (fairseq's, XGLM); vaswani_blocked: the sines then the cosines at "
        "10000^(-2j/d) (CTRL)")
    rope_theta: float = param(10000.0, "RoPE base frequency")
    rope_scaling: Optional[dict] = param(
        None,
        "RoPE frequency scaling: {rope_type: linear|llama3|yarn|longrope, ...its keys, as transformers names them}",
    )
    rope_interleaved: bool = param(False, "rotate pairs (2j, 2j+1) (GPT-J, GLM, Cohere) instead of halves (j, j+d/2)")
    rope_fraction: float = param(1.0, "fraction of head_dim that is rotated (partial rotary: NeoX, Phi, GLM)")
    rope_local_theta: Optional[float] = param(
        None, "RoPE base of sliding-window layers, which rope_scaling leaves unscaled (Gemma3); null: rope_theta"
    )
    rope_local_fraction: Optional[float] = param(
        None, "fraction of head_dim the sliding layers' table (rope_local_theta) rotates (Laguna: 1 beside its full "
        "layers' 0.5); null: rope_fraction")
    nope_layers: list[int] = param([], "layers without positions (SmolLM3's NoPE layers)")
    layer_types: Optional[list[str]] = param(
        None, "per layer 'full', 'sliding' or 'chunked' attention, or 'linear' (a Gated DeltaNet mixer: Qwen3-Next, "
        "Qwen3.5), 'mamba' (a Mamba-2 mixer: Bamba, Granite 4.0) or 'short_conv' (LFM2's gated short convolution); "
        "'mlp': a block with a feed_forward alone (single_sublayer); null: all sliding when sliding_window is set, "
        "else all full")
    single_sublayer: bool = param(
        False, "each block holds one sublayer behind its norm: its mixer alone (attention or a recurrent kind, no "
        "feed_forward), or a feed_forward alone in layer_types 'mlp' layers (Nemotron-H, Mamba-2)")
    attention_chunk_size: Optional[int] = param(
        None, "chunked layers: positions cut into chunks of this many, a query sees only keys of its own chunk (Llama 4)")
    sliding_window: Optional[int] = param(None, "window of the sliding layers, in tokens (the query included)")
    attention_scale: Optional[float] = param(
        None, "multiplier of q.k; null: 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar, Granite's attention_multiplier)"
    )
    attn_softcap: Optional[float] = param(None, "attention-logit soft-capping: cap * tanh(scores / cap) (Gemma2)")
    attention_sinks: bool = param(
        False, "a learned logit per head joins each query's softmax as an extra column, dropped after it, so the "
        "weights of a row sum to less than 1 (gpt-oss's sinks)")
    attention_gate: Literal["none", "sigmoid", "softplus"] = param(
        "none", "the attention's output times act(wg x) before wo, from a projection of its own, attention.wg (AFMoE, "
        "Qwen3-Next: sigmoid; Laguna: softplus)")
    attention_gate_bias: bool = param(False, "a bias on the output gate's projection wg (Qwen3-Next's q_proj bias)")
    attention_gate_per_head: bool = param(
        False, "attention_gate: one gate per head (wg makes num_heads values, each scaling its head's head_dim "
        "outputs: Laguna) instead of one per output element")
    linear_num_key_heads: int = param(0, "linear layers: query/key heads of the Gated DeltaNet")
    linear_num_value_heads: int = param(0, "linear layers: value heads (a multiple of the key heads, which each serve "
                                           "value_heads / key_heads consecutive ones)")
    linear_key_head_dim: int = param(0, "linear layers: width of a query/key head")
    linear_value_head_dim: int = param(0, "linear layers: width of a value head (and of the recurrent state's rows)")
    linear_conv_kernel: int = param(4, "linear layers: taps of the causal depthwise convolution over q, k and v")
    linear_chunk_size: int = param(64, "linear layers: tokens per chunk of the chunked delta rule in a forward of "
                                       "many tokens (a speed choice: every size gives the same numbers)")
    mamba_num_heads: int = param(0, "mamba layers: heads of the Mamba-2 mixer (its inner width is heads x head_dim)")
    mamba_head_dim: int = param(0, "mamba layers: channels per head")
    mamba_groups: int = param(0, "mamba layers: groups of heads sharing one B and one C (and one group of the gated norm)")
    mamba_state_size: int = param(0, "mamba layers: state size N per head channel (d_state)")
    mamba_conv_kernel: int = param(4, "mamba layers: taps of the causal depthwise convolution over x, B and C")
    mamba_conv_bias: bool = param(True, "mamba layers: a bias on the convolution")
    mamba_proj_bias: bool = param(False, "mamba layers: biases on the input and output projections")
    mamba_chunk_size: int = param(256, "mamba layers: tokens per chunk of the chunked (SSD) scan in a forward of many "
                                       "tokens (a speed choice: every size gives the same numbers)")
    mamba_dt_floor: float = param(0.0, "mamba layers: the time step softplus(dt + dt_bias) is clamped to at least this "
                                       "(time_step_limit[0]; Nemotron-H's time_step_min)")
    mamba_dt_ceiling: Optional[float] = param(None, "mamba layers: the time step's upper clamp; null: none")
    short_conv_kernel: int = param(3, "short_conv layers: taps of the causal depthwise convolution (LFM2's conv_L_cache)")
    short_conv_bias: bool = param(False, "short_conv layers: biases on the projections and the convolution")
    qk_norm: bool = param(False, "a norm on queries and keys before RoPE (Qwen3, OLMo2, Gemma3)")
    qk_norm_per_head: bool = param(True, "qk_norm over each head's head_dim (Qwen3); false: over the whole projection (OLMo2)")
    qk_norm_after_rope: bool = param(False, "qk_norm applies to the rotated queries and keys (HunYuan); needs qk_norm_per_head")
    v_norm: bool = param(False, "a weightless RMS norm (norm_eps) over each value head (Gemma 4)")
    full_head_dim: Optional[int] = param(
        None, "head width of the full-attention layers, their q/k/v and the global RoPE table's (Gemma 4's "
        "global_head_dim; the sliding layers keep head_dim and the local table); null: head_dim")
    full_kv_heads: Optional[int] = param(
        None, "key/value heads of the full-attention layers (Gemma 4's num_global_key_value_heads); null: num_kv_heads")
    full_values_from_keys: bool = param(
        False, "full-attention layers have no wv: their values are wk's output, before k_norm and RoPE (and v_norm "
        "applies; Gemma 4's attention_k_eq_v)")
    layer_scalar: bool = param(
        False, "each block's output, residual included, times a stored scalar of its own, layers.{i}.layer_scalar "
        "(Gemma 4's; a buffer, not trained)")
    qk_l2_norm: bool = param(
        False, "a weightless RMS norm (norm_eps) over each head of the rotated q and k, on RoPE layers only (Llama 4)")
    attn_temperature_floor: Optional[float] = param(
        None, "the layers of attn_temperature_layers scale q by 1 + attn_temperature_scale * log1p(floor((position + "
        "attn_temperature_offset) / this)) (Llama 4's floor_scale); null: off")
    attn_temperature_scale: float = param(0.1, "see attn_temperature_floor (Llama 4's attn_scale)")
    attn_temperature_offset: int = param(
        1, "attn_temperature_floor: the position p enters as p + this (Llama 4: 1; Ministral 3, whose floor is YaRN's "
        "original length: 0)")
    attn_temperature_layers: Literal["nope", "all"] = param(
        "nope", "attn_temperature_floor: the layers whose q it scales, after RoPE (Llama 4: its NoPE layers; Ministral 3: all)")
    qkv_clip: Optional[float] = param(None, "clamp q, k and v to [-clip, clip] (OLMo's clip_qkv)")
    qkv_bias: bool = param(False, "bias on the q/k/v projections (Qwen2)")
    linear_bias: bool = param(False, "bias on every other linear layer (the default of out_bias and mlp_bias)")
    out_bias: Optional[bool] = param(None, "bias on the attention output projection; null: linear_bias")
    mlp_bias: Optional[bool] = param(None, "bias on the MLP projections; null: linear_bias")
    output_bias: bool = param(False, "bias on the output head (GPT-J, Phi)")
    tie_embeddings: bool = param(False, "share the token embedding with the output head")
    output_vocab_size: Optional[int] = param(
        None, "rows of the lm head: logits (and labels) over token ids 0..N-1 only, while the embedding keeps every id "
        "(Apertus 1.5's head pruned to its text tokens); null: vocab_size")
    embedding_norm: bool = param(False, "a norm right after the embedding (BLOOM)")
    embedding_multiplier: float = param(1.0, "scale of the embedding output (Gemma: sqrt(hidden_size); Granite)")
    residual_multiplier: float = param(1.0, "scale of each sublayer's output before the residual add (Granite)")
    logit_multiplier: float = param(1.0, "scale of the logits (Cohere's logit_scale; Granite's 1 / logits_scaling)")
    logit_softcap: Optional[float] = param(None, "final-logit soft-capping: cap * tanh(logits / cap); null disables")
    norm_head: bool = param(False, "normalise each row of the head weight before the matmul (Baichuan2's NormHead)")
    head: Literal["lm", "score"] = param(
        "lm", "lm: next-token logits over the vocabulary; score: one scalar per position, read at a sequence's last "
        "token (a reward model; Hugging Face's *ForSequenceClassification with one label)"
    )
    attention: Literal["gqa", "mla"] = param(
        "gqa", "attention kind: grouped-query (MHA and MQA included) or multi-head latent attention (DeepSeek-V2/V3)"
    )
    mla_q_lora_rank: Optional[int] = param(None, "mla: rank of the compressed queries (q_lora_rank); null: one projection")
    mla_kv_lora_rank: int = param(0, "mla: rank of the latent shared by keys and values (kv_lora_rank)")
    mla_rope_head_dim: int = param(0, "mla: rotated dims per query/key head, the last of head_dim (qk_rope_head_dim)")
    mla_v_head_dim: int = param(0, "mla: value width per head (v_head_dim)")
    mla_norm_eps: Optional[float] = param(
        None, "mla: epsilon of the latent norms (q_a_norm, kv_a_norm); null: model.norm_eps (transformers' DeepSeek "
        "V2/V3 and GLM-4.7-Flash fix it at 1e-6)")
    dsa_index_topk: Optional[int] = param(
        None, "mla: DeepSeek Sparse Attention: keys each query attends to, chosen by the lightning indexer (index_topk); "
        "null: every key")
    dsa_index_heads: int = param(0, "dsa: indexer heads (index_n_heads)")
    dsa_index_head_dim: int = param(0, "dsa: indexer head width (index_head_dim); its first mla_rope_head_dim dims rotated")
    dsa_index_rope_interleaved: bool = param(False, "dsa: the indexer rotates pairs (GLM-5) instead of halves (DeepSeek-V3.2)")
    dsa_indexer_frozen: bool = param(
        False, "dsa: train with the indexer fixed (a trainable indexer learns only from dsa_indexer_loss_coeff)")
    dsa_indexer_loss_coeff: float = param(
        0.0, "dsa: weight of megatron-core's indexer loss (dsa_indexer_loss_coeff): KL from the main attention's "
        "head-summed distribution to the indexer's softmax, mean over queries, per layer")
    moe_experts: int = param(0, "routed experts of a mixture-of-experts feed-forward; 0: every layer dense")
    moe_top_k: int = param(2, "experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = param(None, "inner width of each routed expert; null: ffn_hidden_size")
    moe_score: Literal["softmax", "sigmoid"] = param("softmax", "router scores: softmax over experts or per-expert sigmoid (DeepSeek-V3)")
    moe_renormalize: bool = param(True, "divide the top-k scores by their sum (Mixtral; Qwen2/3-MoE and OLMoE: false)")
    moe_routed_scale: float = param(1.0, "multiplier of the routed experts' weights (DeepSeek's routed_scaling_factor)")
    moe_groups: int = param(1, "expert groups of group-limited routing (DeepSeek n_group); 1: no groups")
    moe_topk_groups: int = param(1, "groups a token may use, ranked by the sum of each group's best moe_group_rank_top scores")
    moe_group_rank_top: int = param(
        2, "a group's rank in group-limited routing: the sum of its n best scores (DeepSeek-V3: 2, Megatron: top_k / "
        "topk_groups; DeepSeek-V2's group_limited_greedy: 1, its best)")
    moe_router_bias: bool = param(False, "a bias on the router's logits, choice and weights alike (gpt-oss)")
    moe_ffn_bias: bool = param(False, "biases on the routed experts' projections, [E, ...] each (gpt-oss)")
    moe_expert_bias: bool = param(False, "aux-loss-free balancing: a per-expert bias added to the scores for the choice only")
    moe_router_softcap: Optional[float] = param(
        None, "router logits soft-capped, cap * tanh(logits / cap), before scores, choice and losses (Laguna); null: off")
    moe_expert_bias_on: Literal["scores", "logits"] = param(
        "scores", "what the expert bias is added to for the choice: the scores (DeepSeek-V3) or the router's logits "
        "(Kolibri-1: top-k of logits + bias; the weights stay the chosen experts' scores)")
    moe_bias_update_rate: float = param(1e-3, "step of the expert bias towards balance after each optimizer step")
    moe_shared_ffn_hidden_size: int = param(0, "inner width of the shared experts every token passes through; 0: none")
    moe_weight_input: bool = param(
        False, "the router's weight scales each expert's input, and the k outputs are summed unweighted (Llama 4)")
    moe_shared_gate: bool = param(False, "scale the shared experts' output by sigmoid(w x) (Qwen2-MoE)")
    moe_layer_freq: int = param(1, "every n-th layer is MoE (layer i when (i + 1) % n == 0; Qwen2-MoE's decoder_sparse_step)")
    moe_dense_layers: list[int] = param([], "layers kept dense (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)")
    moe_capacity_factor: Optional[float] = param(None, "expert capacity = factor x tokens x top_k / experts, the rest dropped; null: dropless")
    moe_token_drop_policy: Literal["position", "probs"] = param(
        "position", "past capacity an expert keeps its earliest tokens (position) or its largest router weights "
        "(probs: megatron-core's default); ties go to the earlier sequence position, as Megatron on CUDA"
    )
    moe_capacity_sequence_shards: int = param(
        1, "drop per this many equal contiguous pieces of the sequence, each with its own capacity and earliest "
        "tokens (Megatron at tp = n with sequence parallelism); a sequence they do not divide is one piece"
    )
    moe_aux_loss_coeff: float = param(0.0, "load-balancing loss coefficient (Switch; transformers' router_aux_loss_coef)")
    moe_z_loss_coeff: float = param(0.0, "router z-loss coefficient: mean(logsumexp(router logits)^2) (ST-MoE)")
    moe_aux_loss_scope: Literal["model", "layer", "sequence"] = param(
        "model", "router losses over all MoE layers of a forward together, f summing to top_k (model: transformers' "
        "formula) or per layer, f summing to 1, summed over layers (layer: Megatron's; works with parallel.pp > 1); "
        "sequence: per layer with the balance loss per sequence, averaged over the micro-batch's sequences "
        "(Megatron's seq_aux_loss, DeepSeek-V3's complementary sequence-wise loss)"
    )
    moe_aux_loss_global: bool = param(
        False, "balance over the global micro-batch: f from assignment counts summed over the data-parallel ranks "
        "(Megatron's global_aux_loss, without its running mean over micro-batches); false: each rank's own tokens"
    )
    moe_aux_loss_probs: Literal["scores", "softmax"] = param(
        "scores", "the router probabilities the load-balancing loss takes: the scores (a sigmoid router's normalised "
        "per token, as DeepSeek-V3 and megatron-core) or softmax(logits) whatever the scores (transformers' MiniMax-M2)")
    moe_shared_combine: Literal["sum", "average"] = param(
        "sum", "routed plus shared experts' outputs, or their mean ((routed + shared) / 2: Cohere2-MoE's average)")
    moe_post_norm: bool = param(
        False, "a norm on each MoE layer's feed-forward output (routed plus shared experts) before the residual add, in "
        "the ffn_post_norm slot; dense layers have none (A.X-K1's post_mlp_layernorm)")
    mtp_layers: int = param(
        0, "multi-token prediction depths (DeepSeek-V3; Megatron's mtp_num_layers): depth k adds one block of the last "
        "layer's kind that predicts token t + k + 1 through the shared head, in training only (model/mtp.py)")
    mtp_loss_coeff: float = param(
        0.1, "the mean over depths of the multi-token prediction losses is added times this (Megatron's "
        "mtp_loss_scaling_factor; DeepSeek-V3 trains with 0.3, then 0.1)")
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
        if self.moe_experts and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.rope_scaling is not None and "rope_type" not in self.rope_scaling:
            self.rope_scaling = {"rope_type": "llama3", **self.rope_scaling}  # the only kind before rope_type

    # ---------------------------------------------------------------------------------------------
    # Derived values: one place each.

    @property
    def gated(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def rope_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates (even); the rest pass through. Latent attention
        rotates its own decoupled dims (model/mla.py)."""
        if self.attention == "mla":
            return self.mla_rope_head_dim
        return int(self.head_dim * self.rope_fraction) // 2 * 2

    @property
    def head_vocab_size(self) -> int:
        """Rows of the lm head: the token ids it predicts (output_vocab_size where the head is pruned)."""
        return self.output_vocab_size or self.vocab_size

    def table_rope_dim(self, table: str) -> int:
        """rope_dim of RoPE table `table` ("global", or "local": the sliding layers' with rope_local_fraction)."""
        if table == "local" and self.rope_local_fraction is not None:
            return int(self.head_dim * self.rope_local_fraction) // 2 * 2
        if table == "global" and self.full_head_dim is not None:  # read by full layers only (validated)
            return int(self.full_head_dim * self.rope_fraction) // 2 * 2
        return self.rope_dim

    @property
    def residual_alpha(self) -> float:
        """DeepNet's residual scale for a decoder of N layers, (2N)^(1/4); 1 elsewhere."""
        return (2 * self.num_layers) ** 0.25 if self.norm_placement == "deepnorm" else 1.0

    @property
    def init_beta(self) -> float:
        """DeepNet's init gain of the value, output and MLP projections, (8N)^(-1/4); 1 elsewhere."""
        return (8 * self.num_layers) ** -0.25 if self.norm_placement == "deepnorm" else 1.0

    def layer(self, i: int) -> LayerSpec:
        """Layer i's window, RoPE table, mixer, feed-forward kind and sublayers."""
        kind = self.layer_types[i] if self.layer_types else ("sliding" if self.sliding_window else "full")
        moe = self.moe_experts > 0 and (i + 1) % self.moe_layer_freq == 0 and i not in self.moe_dense_layers
        if kind == "mlp":  # a feed_forward alone (single_sublayer)
            return LayerSpec(None, None, moe, None, sublayers="ffn")
        if self.single_sublayer:  # a mixer alone: nothing of the feed-forward's, experts included
            return replace(self._mixer_layer(i, kind, False), sublayers="mixer")
        return self._mixer_layer(i, kind, moe)

    def _mixer_layer(self, i: int, kind: str, moe: bool) -> LayerSpec:
        """Layer i's spec from its layer_types kind (the mixer's), with feed-forward kind `moe`."""
        window = self.sliding_window if kind == "sliding" else None
        chunk = self.attention_chunk_size if kind == "chunked" else None
        if kind in ("linear", "mamba", "short_conv"):  # positions come from the recurrence's order: no RoPE
            return LayerSpec(None, None, moe, None, mixer=kind)
        rope = None if self.position != "rope" or i in self.nope_layers else (
            "local" if window and self.rope_local_theta is not None else "global")
        if kind == "full":  # Gemma 4's global layers: a head width, key/value heads and values of their own
            return LayerSpec(window, rope, moe, chunk, head_dim=self.full_head_dim, kv_heads=self.full_kv_heads,
                             values_from_keys=self.full_values_from_keys)
        return LayerSpec(window, rope, moe, chunk)

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
        self._validate_moe()
        self._validate_mla()
        if self.attention_gate != "none" and self.attention == "mla":
            raise UsageError("model.attention_gate gates grouped-query attention through its own projection: not with "
                             "model.attention mla")
        if self.attention_gate_bias and self.attention_gate == "none":
            raise UsageError("model.attention_gate_bias is the bias of the output gate: set model.attention_gate")
        if self.mtp_layers < 0 or not (math.isfinite(self.mtp_loss_coeff) and self.mtp_loss_coeff >= 0):
            raise UsageError(f"model.mtp_layers ({self.mtp_layers}) and model.mtp_loss_coeff ({self.mtp_loss_coeff}) "
                             "must not be negative")
        if self.mtp_layers and self.head != "lm":
            raise UsageError("model.mtp_layers predicts tokens, which a model.head score does not: set mtp_layers 0")

    def _validate_scalars(self) -> None:
        for key in ("norm_eps", "init_std", "embedding_multiplier", "residual_multiplier", "logit_multiplier"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"model.{key} must be a positive finite number, got {value}")
        for key in ("swiglu_alpha", "swiglu_limit"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise UsageError(f"model.{key} must be a positive finite number, got {getattr(self, key)}")
        for key in ("logit_softcap", "attn_softcap", "attention_scale", "qkv_clip", "rope_local_theta", "mla_norm_eps",
                    "attn_temperature_floor", "moe_router_softcap"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"model.{key} must be a positive finite number or null, got {value}")
        if self.attn_temperature_offset < 0:
            raise UsageError(f"model.attn_temperature_offset must not be negative, got {self.attn_temperature_offset}")

    def _validate_positions(self) -> None:
        if not 0 < self.rope_fraction <= 1:
            raise UsageError(f"model.rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.rope_local_fraction is not None and not (0 < self.rope_local_fraction <= 1 and self.rope_local_theta):
            raise UsageError(f"model.rope_local_fraction ({self.rope_local_fraction}) must be in (0, 1] and is the "
                             "sliding layers' own table's: set model.rope_local_theta too")
        if self.position_offset < 0 or (self.position_offset and self.position not in ("learned", "sinusoidal")):
            raise UsageError(f"model.position_offset ({self.position_offset}) shifts the rows of an absolute position "
                             "table: it must not be negative, and needs model.position learned or sinusoidal")
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
            kinds = {"full", "sliding", "chunked", "linear", "mamba", "short_conv", "mlp"}
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - kinds:
                raise UsageError(
                    f"model.layer_types needs {self.num_layers} entries (num_layers), each 'full', 'sliding', 'chunked', "
                    "'linear', 'mamba', 'short_conv' or 'mlp'"
                )
            if "mlp" in self.layer_types and not self.single_sublayer:
                raise UsageError("model.layer_types 'mlp' is a block with a feed_forward alone: set model.single_sublayer "
                                 "(every other block then holds its mixer alone)")
            if "linear" in self.layer_types:
                self._validate_linear()
            if "mamba" in self.layer_types:
                self._validate_mamba()
            if "short_conv" in self.layer_types and self.short_conv_kernel <= 0:
                raise UsageError(f"model.short_conv_kernel must be positive, got {self.short_conv_kernel}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise UsageError("model.layer_types has sliding layers: set model.sliding_window")
            if "chunked" in self.layer_types and not self.attention_chunk_size:
                raise UsageError("model.layer_types has chunked layers: set model.attention_chunk_size")
        if self.single_sublayer and self.parallel_residual:
            raise UsageError("model.single_sublayer blocks hold one sublayer, model.parallel_residual sums two: set one "
                             "of them false")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise UsageError(f"model.attention_chunk_size must be positive or null, got {self.attention_chunk_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UsageError(f"model.sliding_window must be positive or null, got {self.sliding_window}")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise UsageError(f"model.nope_layers {self.nope_layers}: layer indices are 0..{self.num_layers - 1}")
        self._validate_full_layers()

    def _validate_full_layers(self) -> None:
        """The full-attention layers' own shape (Gemma 4): positive, whole groups, and a global RoPE table no other
        layer reads (its width is theirs)."""
        sizes = [v for v in (self.full_head_dim, self.full_kv_heads) if v is not None]
        if min(sizes, default=1) <= 0 or self.num_heads % (self.full_kv_heads or 1):
            raise UsageError(f"model.full_head_dim ({self.full_head_dim}) and model.full_kv_heads ({self.full_kv_heads}) "
                             f"must be positive, and full_kv_heads divide model.num_heads ({self.num_heads})")
        if self.full_head_dim is None:
            return
        others = [i for i in range(self.num_layers) if self.layer(i).rope == "global" and self.layer(i).head_dim is None]
        if others:
            raise UsageError(f"model.full_head_dim gives the global RoPE table the full layers' width, but layers {others} "
                             "(sliding or chunked) read it too: set model.rope_local_theta for the sliding layers")

    def _validate_linear(self) -> None:
        sizes = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel", "linear_chunk_size")
        for key in sizes:
            if getattr(self, key) <= 0:
                raise UsageError(f"model.layer_types has linear layers: model.{key} must be positive, got {getattr(self, key)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise UsageError(f"model.linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                             f"model.linear_num_key_heads ({self.linear_num_key_heads})")

    def _validate_mamba(self) -> None:
        for key in ("mamba_num_heads", "mamba_head_dim", "mamba_groups", "mamba_state_size", "mamba_conv_kernel",
                    "mamba_chunk_size"):
            if getattr(self, key) <= 0:
                raise UsageError(f"model.layer_types has mamba layers: model.{key} must be positive, got {getattr(self, key)}")
        if self.mamba_num_heads % self.mamba_groups:
            raise UsageError(f"model.mamba_num_heads ({self.mamba_num_heads}) must be a multiple of model.mamba_groups "
                             f"({self.mamba_groups})")
        ceiling = self.mamba_dt_ceiling if self.mamba_dt_ceiling is not None else math.inf
        if not 0 <= self.mamba_dt_floor < ceiling:
            raise UsageError(f"model.mamba_dt_floor ({self.mamba_dt_floor}) must be >= 0 and below model.mamba_dt_ceiling "
                             f"({self.mamba_dt_ceiling})")

    def _validate_norms(self) -> None:
        if self.norm_unit_offset and not self.norm_affine:
            raise UsageError("model.norm_unit_offset needs model.norm_affine true (an offset of which weight?)")
        if self.parallel_residual and self.norm_placement != "pre":
            raise UsageError(
                f"model.parallel_residual uses pre-norm: model.norm_placement {self.norm_placement!r} cannot combine"
            )
        if self.qk_norm_after_rope and not (self.qk_norm and self.qk_norm_per_head):
            raise UsageError("model.qk_norm_after_rope moves the per-head norm: set model.qk_norm and model.qk_norm_per_head")
        if self.moe_post_norm and (self.norm_placement != "pre" or self.parallel_residual):
            raise UsageError(f"model.moe_post_norm adds a norm after the MoE layers' feed-forward, which model.norm_placement "
                             f"{self.norm_placement!r} (or parallel_residual) places otherwise: set norm_placement pre, "
                             "parallel_residual false")
        if self.norm_head and self.tie_embeddings:
            raise UsageError("model.norm_head normalises the head alone: it cannot be tied (set tie_embeddings false)")
        if self.head == "score" and (self.tie_embeddings or self.norm_head or self.output_bias):
            raise UsageError("model.head score is a plain [1, hidden] projection: set tie_embeddings, norm_head and "
                             "output_bias false")
        if self.output_vocab_size is not None and not (
                1 <= self.output_vocab_size <= self.vocab_size and self.head == "lm" and not self.tie_embeddings):
            raise UsageError(f"model.output_vocab_size ({self.output_vocab_size}) keeps the first rows of an lm head: it "
                             f"must be in 1..model.vocab_size ({self.vocab_size}), with head lm and tie_embeddings false "
                             "(a tied head is the whole embedding)")

    def _validate_moe(self) -> None:
        if self.moe_experts < 0:
            raise UsageError(f"model.moe_experts must be 0 (dense) or positive, got {self.moe_experts}")
        if not self.moe_experts:
            return
        if self.mlp == "xielu":
            raise UsageError("model.mlp xielu learns scalars per MLP, which the stacked experts do not hold: choose another model.mlp")
        if not 0 < self.moe_top_k <= self.moe_experts:
            raise UsageError(f"model.moe_top_k ({self.moe_top_k}) must be in 1..model.moe_experts ({self.moe_experts})")
        for key in ("moe_ffn_hidden_size", "moe_layer_freq", "moe_groups", "moe_topk_groups", "moe_group_rank_top",
                    "moe_capacity_sequence_shards"):
            if getattr(self, key) <= 0:
                raise UsageError(f"model.{key} must be positive, got {getattr(self, key)}")
        for key in ("moe_routed_scale", "moe_capacity_factor"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"model.{key} must be a positive finite number, got {value}")
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_bias_update_rate", "moe_shared_ffn_hidden_size"):
            if getattr(self, key) < 0:
                raise UsageError(f"model.{key} must not be negative, got {getattr(self, key)}")
        if self.moe_experts % self.moe_groups or self.moe_topk_groups > self.moe_groups:
            raise UsageError(
                f"model.moe_groups ({self.moe_groups}) must divide model.moe_experts ({self.moe_experts}) and be at "
                f"least model.moe_topk_groups ({self.moe_topk_groups})"
            )
        if self.moe_groups > 1 and self.moe_experts // self.moe_groups < self.moe_group_rank_top:
            raise UsageError(f"model.moe_groups ranks groups by their best {self.moe_group_rank_top} scores "
                             "(model.moe_group_rank_top): each group needs at least that many experts")
        if self.moe_top_k > self.moe_topk_groups * self.moe_experts // self.moe_groups:
            raise UsageError(
                f"model.moe_top_k ({self.moe_top_k}) exceeds the experts of model.moe_topk_groups groups "
                f"({self.moe_topk_groups} x {self.moe_experts // self.moe_groups})"
            )
        if self.moe_capacity_sequence_shards > 1 and self.moe_capacity_factor is None:
            raise UsageError("model.moe_capacity_sequence_shards splits token dropping: set model.moe_capacity_factor or "
                             "leave it 1 (dropless)")
        if self.moe_expert_bias_on != "scores" and not self.moe_expert_bias:
            raise UsageError("model.moe_expert_bias_on says where the expert bias goes: set model.moe_expert_bias")
        if self.moe_aux_loss_global and self.moe_aux_loss_scope == "sequence":
            raise UsageError("model.moe_aux_loss_global balances over the global micro-batch, model.moe_aux_loss_scope "
                             "sequence over each sequence: choose one")
        for key in ("moe_shared_gate", "moe_shared_combine"):
            if getattr(self, key) not in (False, "sum") and not self.moe_shared_ffn_hidden_size:
                raise UsageError(f"model.{key} acts on the shared experts: set model.moe_shared_ffn_hidden_size")
        if any(not 0 <= i < self.num_layers for i in self.moe_dense_layers):
            raise UsageError(f"model.moe_dense_layers {self.moe_dense_layers}: layer indices are 0..{self.num_layers - 1}")

    def _validate_mla(self) -> None:
        if self.attention != "mla":
            if self.dsa_index_topk is not None:
                raise UsageError("model.dsa_index_topk selects keys for latent attention: set model.attention mla")
            return
        if self.mla_kv_lora_rank <= 0 or self.mla_v_head_dim <= 0 or (self.mla_q_lora_rank or 1) <= 0:
            raise UsageError("model.attention mla needs positive model.mla_kv_lora_rank and model.mla_v_head_dim")
        if not (0 < self.mla_rope_head_dim < self.head_dim and self.mla_rope_head_dim % 2 == 0):
            raise UsageError(
                f"model.mla_rope_head_dim ({self.mla_rope_head_dim}) must be even and in 1..model.head_dim - 1 "
                f"({self.head_dim - 1}): the rest of each query/key head carries no positions"
            )
        if self.dsa_index_topk is not None and (
                self.dsa_index_topk <= 0 or self.dsa_index_heads <= 0 or self.mla_q_lora_rank is None
                or not self.mla_rope_head_dim <= self.dsa_index_head_dim or self.attn_softcap is not None
                or self.dsa_indexer_loss_coeff < 0 or (self.dsa_indexer_frozen and self.dsa_indexer_loss_coeff)):
            raise UsageError(
                f"model.dsa_index_topk ({self.dsa_index_topk}) needs positive model.dsa_index_heads, "
                "model.mla_q_lora_rank (the indexer's queries come from the query latent), model.dsa_index_head_dim "
                "at least model.mla_rope_head_dim, no model.attn_softcap, and model.dsa_indexer_loss_coeff >= 0, 0 "
                "with model.dsa_indexer_frozen")
        if (self.position not in ("rope", "none") or self.qk_norm or self.qkv_clip is not None or self.attention_sinks
                or self.qk_l2_norm or self.attn_temperature_floor is not None or "chunked" in (self.layer_types or [])):
            raise UsageError("model.attention mla takes position rope or none, and no qk_norm, qkv_clip or attention_sinks "
                             "(nor qk_l2_norm, attn_temperature_floor or chunked layers)")
