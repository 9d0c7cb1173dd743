"""Families on DeepSeek's mixture of experts: its router as config keys (V2's softmax; V3's sigmoid with the expert
bias and group-limited top-k, which GLM-4.5, GLM-4.7-Flash, Sarvam, dots.llm1, EXAONE-MoE and A.X-K1 copied), the
shared experts and dense first layers, and multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, Sarvam-MLA,
A.X-K1; the dense families on it are latent.py's). The expert pieces every MoE table shares come from moe.py. Every
config value a table cannot reproduce is refused by name on read."""

from typing import Optional

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    HEAD_DIM,
    LAYERS,
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    activation,
    also,
    partial_rope,
    rope_defaulting,
    without,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.dense import EXAONE4_LAYERS
from megatron_llm.checkpoint.families.llama import QWEN3
from megatron_llm.checkpoint.families.moe import EXPERT_BIAS, EXPERTS_REQUIRED, experts, shared_experts, shared_mlp
from megatron_llm.checkpoint.families.table import (Derived, Family, Fixed, Fused, Key, MTPLayers, Stored,
                                                     get_family_value)
from megatron_llm.errors import UsageError
from megatron_llm.model.rope import yarn_mscale


def first_dense_layers(default: int) -> Derived:
    """model.moe_dense_layers from first_k_dense_replace: the first k layers dense (DeepSeek-V3, GLM-4.5, dots.llm1).
    Other dense layers write a k that reads back differently, so export refuses them."""
    return Derived(
        lambda hf: dict(moe_dense_layers=list(range(get_family_value(hf, "first_k_dense_replace", default=default)))),
        lambda cfg: {"first_k_dense_replace": len(cfg.moe_dense_layers)})


def mlp_layer_types(first_dense: int, first_key: Optional[str] = "first_k_dense_replace",
                    freq_key: Optional[str] = None) -> Derived:
    """model.moe_dense_layers from mlp_layer_types ('dense' or 'sparse' per layer); where it is absent, the
    config class's fill: the first `first_key` layers dense (`first_dense` without the key; GLM-4.7-Flash reads
    no such key, its class always fills one dense layer), and with `freq_key` n, of the rest only the layers i with
    i % n == 0 sparse (A.X-K1's legacy moe_layer_freq)."""

    def read(hf: dict) -> dict:
        first = get_family_value(hf, first_key, default=first_dense) if first_key else first_dense
        freq = get_family_value(hf, freq_key, default=1) if freq_key else 1
        types = hf.get("mlp_layer_types") or ["dense" if i < first or i % freq else "sparse"
                                              for i in range(hf["num_hidden_layers"])]
        if set(types) - {"dense", "sparse"}:
            raise UsageError(f"config.json mlp_layer_types {types!r}: each entry is 'dense' or 'sparse'")
        return dict(moe_dense_layers=[i for i, kind in enumerate(types) if kind == "dense"])

    def write(cfg) -> dict:
        return {"mlp_layer_types": ["sparse" if cfg.layer(i).moe else "dense" for i in range(cfg.num_layers)]}

    return Derived(read, write)


def deepseek_experts(experts: str = "n_routed_experts", shared: str = "n_shared_experts", *, scale: float = 1.0,
                     shared_count: int = 1) -> tuple:
    """DeepSeek's expert keys (V2 and V3 and the families that copied V3): the counts (under the family's names),
    their width moe_intermediate_size, the routed scale, shared experts; the defaults are the config class's (what a
    config.json without the key means). transformers computes no aux loss for any of them."""
    return (EXPERTS_REQUIRED, Key(experts, "moe_experts"), Key("num_experts_per_tok", "moe_top_k"),
            Key("moe_intermediate_size", "moe_ffn_hidden_size"),
            Key("routed_scaling_factor", "moe_routed_scale", default=scale),
            shared_experts(shared, shared_count), Fixed("moe_aux_loss_coeff", 0.0))


def sigmoid_routing(experts: str = "n_routed_experts", shared: str = "n_shared_experts", *, renormalize: bool = True,
                    scale: float = 1.0, groups: int = 1, topk_groups: int = 1, shared_count: int = 1) -> tuple:
    """DeepSeek-V3's router as config keys: a sigmoid per expert, the aux-loss-free expert bias (its
    e_score_correction_bias), group-limited top-k (groups ranked by their best two scores, our default); GLM-4.5,
    dots.llm1, EXAONE-MoE, Sarvam-MoE and GLM-4.7-Flash copied it with defaults and count names of their own."""
    return (
        *deepseek_experts(experts, shared, scale=scale, shared_count=shared_count),
        Fixed("moe_score", "sigmoid"), Fixed("moe_expert_bias", True),
        Key("norm_topk_prob", "moe_renormalize", default=renormalize),
        Key("n_group", "moe_groups", default=groups), Key("topk_group", "moe_topk_groups", default=topk_groups),
    )


# The DeepSeek-style MoE block: the router (mlp.gate), the experts, the shared experts; SIGMOID_MOE_TENSORS adds the
# router's expert bias (DeepSeek-V2 has none; EXAONE-MoE keeps it one level up).
DEEPSEEK_MOE_TENSORS = {**experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
                        **shared_mlp("shared_experts")}
ROUTER_BIAS = "model.layers.{i}.mlp.gate.e_score_correction_bias"
SIGMOID_MOE_TENSORS = {**DEEPSEEK_MOE_TENSORS, ROUTER_BIAS: EXPERT_BIAS}


def _read_mla_shape(hf: dict) -> dict:
    """Our query/key head is [nope | rope]; YaRN's mscale_all_dim also scales the softmax (mscale squared)."""
    rope, head = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scale, factor = None, params.get("factor", 1.0)
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim") and factor > 1:
        scale = head**-0.5 * yarn_mscale(factor, params["mscale_all_dim"]) ** 2
    return dict(head_dim=head, mla_rope_head_dim=rope, attention_scale=scale, num_kv_heads=hf["num_attention_heads"])


def _write_mla_shape(cfg) -> dict:
    return {"qk_nope_head_dim": cfg.head_dim - cfg.mla_rope_head_dim, "qk_rope_head_dim": cfg.mla_rope_head_dim,
            "num_key_value_heads": cfg.num_kv_heads}


LATENT_NORM_EPS = 1e-6  # transformers' latent norms (q_a_layernorm, kv_a_layernorm): RMSNorm's own, whatever rms_norm_eps


def latent_norm_eps(default: float) -> Derived:
    """norm_eps from rms_norm_eps (`default` where absent, the config class's) and mla_norm_eps LATENT_NORM_EPS, as
    null where the two agree: a model trained here with norm_eps 1e-6 and no mla_norm_eps exports as it is."""

    def read(hf: dict) -> dict:
        eps = get_family_value(hf, "rms_norm_eps", default=default)
        return dict(norm_eps=eps, mla_norm_eps=None if eps == LATENT_NORM_EPS else LATENT_NORM_EPS)

    return Derived(read, lambda cfg: {"rms_norm_eps": cfg.norm_eps})


def q_lora_rank(default: Optional[int]) -> Derived:
    """model.mla_q_lora_rank from q_lora_rank, `default` (the config class's) only where config.json lacks the key:
    its null means one query projection, so it cannot stand for absent as Key's default does."""
    return Derived(lambda hf: dict(mla_q_lora_rank=hf["q_lora_rank"] if "q_lora_rank" in hf else default),
                   lambda cfg: {"q_lora_rank": cfg.mla_q_lora_rank})


# Multi-head latent attention (DeepSeek-V2/V3): compressed q (or one projection) and kv with their norms, the
# decoupled RoPE dims interleaved or not, every head its own key and value; each family adds its q_lora_rank default.
MLA_CONFIG = (
    Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size"), Key("num_hidden_layers", "num_layers"),
    Key("num_attention_heads", "num_heads"), Key("intermediate_size", "ffn_hidden_size"),
    Key("max_position_embeddings", "max_seq_len"), Key("tie_word_embeddings", "tie_embeddings", default=False),
    activation("hidden_act", GATED_ACTIVATIONS, default="silu"), ROPE,
    Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
    Fixed("mlp_bias", False), Fixed("attention", "mla"), Derived(_read_mla_shape, _write_mla_shape),
    Key("kv_lora_rank", "mla_kv_lora_rank"),
    Key("v_head_dim", "mla_v_head_dim"), Key("rope_interleave", "rope_interleaved", default=True),
)
MLA_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if ".self_attn." not in k},
    **{f"model.layers.{{i}}.self_attn.{theirs}": f"layers.{{i}}.attention.{ours}" for theirs, ours in (
        ("q_proj.weight", "wq.weight"), ("q_a_proj.weight", "wq_a.weight"), ("q_a_proj.bias", "wq_a.bias"),
        ("q_a_layernorm.weight", "q_a_norm.weight"), ("q_b_proj.weight", "wq_b.weight"),
        ("kv_a_proj_with_mqa.weight", "wkv_a.weight"), ("kv_a_proj_with_mqa.bias", "wkv_a.bias"),
        ("kv_a_layernorm.weight", "kv_a_norm.weight"), ("kv_b_proj.weight", "wkv_b.weight"),
        ("o_proj.weight", "wo.weight"), ("o_proj.bias", "wo.bias"))},
}

# DeepSeek-V3's multi-token prediction as published (model.layers.61 of V3; vLLM's deepseek_mtp.py and GLM-4.5's
# glm4_moe_mtp.py read these names): each depth a decoder layer plus its projection, norms and its own copies of the
# embedding and head, which our model shares (transformers' models skip the layer on load and never write it).
DEEPSEEK_MTP = MTPLayers(
    "num_nextn_predict_layers",
    {f"model.layers.{{i}}.{theirs}": f"layers.{{i}}.mtp.{ours}" for theirs, ours in (
        ("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"), ("eh_proj.weight", "eh_proj.weight"),
        ("shared_head.norm.weight", "norm.weight"))},
    {"model.layers.{i}.embed_tokens.weight": "tok_embeddings.weight", "model.layers.{i}.shared_head.head.weight": "output.weight"},
)

# DeepSeek-V3: latent attention, the sigmoid router over groups of experts, the first k layers dense.
DEEPSEEK_V3 = Family(
    "deepseek_v3", "DeepseekV3ForCausalLM",
    (*MLA_CONFIG, q_lora_rank(1536), latent_norm_eps(1e-6), *sigmoid_routing(scale=2.5, groups=8, topk_groups=4),
     first_dense_layers(3)),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS}, mtp=DEEPSEEK_MTP,
)


def _read_v2_groups(hf: dict) -> dict:
    """DeepSeek-V2's topk_method: greedy (no groups) or group_limited_greedy (groups ranked by their best score)."""
    method = hf.get("topk_method") or "greedy"
    if method == "greedy":
        return dict(moe_groups=1, moe_topk_groups=1)
    if method != "group_limited_greedy":
        raise UsageError(f"config.json topk_method={method!r} is not supported: deepseek_v2 has greedy or "
                         "group_limited_greedy")
    return dict(moe_groups=hf["n_group"], moe_topk_groups=hf["topk_group"], moe_group_rank_top=1)


def _write_v2_groups(cfg) -> dict:
    if cfg.moe_groups == 1:
        return {"topk_method": "greedy"}
    return {"topk_method": "group_limited_greedy", "n_group": cfg.moe_groups, "topk_group": cfg.moe_topk_groups}


# DeepSeek-V2: latent attention (RoPE in interleaved pairs), a softmax router whose top-k weights are never
# renormalised (transformers ignores norm_topk_prob), greedy or group-limited; biases on the dense MLPs optional.
DEEPSEEK_V2 = Family(
    "deepseek_v2", "DeepseekV2ForCausalLM",
    (*without(MLA_CONFIG, "rope_interleaved", "mlp_bias"), q_lora_rank(1536), Fixed("rope_interleaved", True),
     Key("mlp_bias", "mlp_bias", default=False), latent_norm_eps(1e-6),
     *deepseek_experts(shared_count=2), Fixed("moe_score", "softmax"), Fixed("moe_renormalize", False),
     Derived(_read_v2_groups, _write_v2_groups),
     first_dense_layers(0)),
    {**MLA_TENSORS, **DEEPSEEK_MOE_TENSORS},
)


def _read_whole_rope(hf: dict) -> dict:
    """GLM-4.7-Flash rotates partial_rotary_factor of qk_rope_head_dim only in its table, not in its attention."""
    fraction = ROPE.read(hf)["rope_fraction"]
    if fraction != 1.0:
        raise UsageError(f"config.json partial_rotary_factor={fraction} is not supported: latent attention rotates all "
                         "qk_rope_head_dim dims (set qk_rope_head_dim instead)")
    return {}


# GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's latent attention and router; its dense layers by mlp_layer_types.
GLM4_MOE_LITE = Family(
    "glm4_moe_lite", "Glm4MoeLiteForCausalLM",
    (*MLA_CONFIG, q_lora_rank(768), Derived(_read_whole_rope, lambda cfg: {}), latent_norm_eps(1e-5),
     *sigmoid_routing(scale=1.8),
     mlp_layer_types(1, first_key=None)),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS},
)


def glm4_moe_config(rope: Derived, eps: float, qk_norm: bool, scale: float, head_dim=HEAD_DIM) -> tuple:
    """GLM-4.5's keys with a config class's defaults: its RoPE block (and partial factor), norm epsilon, QK-norm,
    routed scale and head width where config.json leaves them out."""
    return (*(e for e in without(LLAMA_CONFIG, "norm_eps", "out_bias", "mlp_bias") if e not in (ROPE, HEAD_DIM)),
            head_dim, rope, Key("rms_norm_eps", "norm_eps", default=eps), Fixed("out_bias", False), Fixed("mlp_bias", False),
            Key("use_qk_norm", "qk_norm", default=qk_norm), *sigmoid_routing(scale=scale), first_dense_layers(1))


# GLM-4.5/4.6 (glm4_moe): Llama's attention with q/k/v biases only, half of each head rotated (by halves, unlike
# GLM-4's pairs), an optional per-head QK-norm; DeepSeek-V3's router.
GLM4_MOE = Family("glm4_moe", "Glm4MoeForCausalLM", glm4_moe_config(partial_rope(0.5), 1e-5, False, 1.0),
                  {**LLAMA_TENSORS, **SIGMOID_MOE_TENSORS}, mtp=DEEPSEEK_MTP)

# Sarvam-MoE: GLM-4.5's model (transformers runs it on that code) with defaults of its own, q/k/v fused in one
# query_key_value and names of its own.
SARVAM_MOE = Family(
    "sarvam_moe", "Glm4MoeForCausalLM",
    also(glm4_moe_config(rope_defaulting({"rope_type": "default", "rope_theta": 8000000.0}), 1e-6, True, 2.5,
                         Key("head_dim", "head_dim", default=64)), attention_bias="use_qkv_bias"),
    {**{k: v for k, v in LLAMA_TENSORS.items() if ".self_attn." not in k and "embed_tokens" not in k},
     **{k.replace(".gate.e_score_correction_bias", ".gate.expert_bias"): v for k, v in SIGMOID_MOE_TENSORS.items()},
     "model.word_embeddings.weight": "tok_embeddings.weight",
     **{f"model.layers.{{i}}.attention.query_key_value.{kind}": Fused(tuple(f"layers.{{i}}.attention.{w}.{kind}"
                                                                             for w in ("wq", "wk", "wv")))
        for kind in ("weight", "bias")},
     "model.layers.{i}.attention.dense.weight": "layers.{i}.attention.wo.weight",
     "model.layers.{i}.attention.query_layernorm.weight": "layers.{i}.attention.q_norm.weight",
     "model.layers.{i}.attention.key_layernorm.weight": "layers.{i}.attention.k_norm.weight"},
)


def _read_dots1_layers(hf: dict) -> dict:
    """Dots1Config's fill for a missing layer_types: the layers from max_window_layers on slide (window 4096)."""
    window = hf["sliding_window"] if "sliding_window" in hf else 4096
    first = get_family_value(hf, "max_window_layers", default=62)
    types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
    return LAYERS.read({**hf, "sliding_window": window, "layer_types": types, "use_sliding_window": None})  # not its key


# dots.llm1 (dots1): Qwen3's attention (per-head QK-norm, biases on every projection or none, sliding layers; no
# partial rotation, whatever the config says) and DeepSeek-V3's router.
DOTS1 = Family(
    "dots1", "Dots1ForCausalLM",
    (*(e for e in QWEN3.config if e is not LAYERS), Fixed("rope_fraction", 1.0),
     Derived(_read_dots1_layers, write_every_layer_type), *sigmoid_routing(renormalize=False), first_dense_layers(0)),
    {**LLAMA_TENSORS, **SIGMOID_MOE_TENSORS},
)


def _read_exaone_moe_layers(hf: dict) -> dict:
    """EXAONE 4's layers, with ExaoneMoeConfig's window (4096) where config.json has no sliding_window key."""
    return EXAONE4_LAYERS.read({**hf, "sliding_window": hf["sliding_window"] if "sliding_window" in hf else 4096})


# EXAONE-MoE: EXAONE 4's attention (per-head QK-norm, sliding layers, no positions on the full ones) in a pre-norm
# block (every head rotated whole, whatever the config says); DeepSeek-V3's router, its expert bias one level up
# (mlp.e_score_correction_bias).
EXAONE_MOE = Family(
    "exaone_moe", "ExaoneMoeForCausalLM",
    (*SHAPE, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     ROPE, Fixed("rope_fraction", 1.0), Derived(_read_exaone_moe_layers, write_every_layer_type), Fixed("qk_norm", True),
     Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False),
     *sigmoid_routing("num_experts", "num_shared_experts", scale=2.5), mlp_layer_types(1)),
    {**LLAMA_TENSORS, **DEEPSEEK_MOE_TENSORS,
     "model.layers.{i}.mlp.e_score_correction_bias": EXPERT_BIAS},
)


def _read_deepseek_yarn(hf: dict) -> dict:
    """RoPE where the published config.json names YaRN 'deepseek_yarn' (Sarvam's remote code; transformers reads
    it as yarn, the same computation) under rope_scaling."""
    scaling = hf.get("rope_scaling") or {}
    if "deepseek_yarn" in (scaling.get("type"), scaling.get("rope_type")):
        hf = {**hf, "rope_scaling": {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn"}}
    return ROPE.read(hf)


# Sarvam-MLA (sarvam_mla): transformers runs DeepSeek-V3's model under its own defaults (one query projection, one
# group, a dense first layer); the published config.json spells the expert counts num_experts and num_shared_experts
# and its YaRN deepseek_yarn. Its released checkpoints hold no multi-token prediction layers.
SARVAM_MLA = Family(
    "sarvam_mla", "DeepseekV3ForCausalLM",
    also((*(e for e in MLA_CONFIG if e is not ROPE), Derived(_read_deepseek_yarn, ROPE.write), q_lora_rank(None),
          latent_norm_eps(1e-6), *sigmoid_routing(scale=2.5), first_dense_layers(1)),
         n_routed_experts="num_experts", n_shared_experts="num_shared_experts"),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS},
)

# A.X-K1 (axk1): DeepSeek-V3 (compressed queries always) with a norm on each MoE layer's output (post_mlp_layernorm,
# model.moe_post_norm), its dense layers by mlp_layer_types or the legacy first_k_dense_replace / moe_layer_freq. Its
# released files store that norm for the dense layers too, unused, and no router expert bias (routing without it is
# routing with transformers' zero fill), which transformers' save writes.
AXK1_NORM = "model.layers.{i}.post_mlp_layernorm.weight"
AXK1 = Family(
    "axk1", "AXK1ForCausalLM",
    (*MLA_CONFIG, q_lora_rank(1536), latent_norm_eps(1e-6),
     *without(sigmoid_routing(scale=2.5, groups=8, topk_groups=4), "moe_expert_bias"),
     Stored(ROUTER_BIAS, "moe_expert_bias"),
     mlp_layer_types(1, freq_key="moe_layer_freq"), Fixed("moe_post_norm", True)),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS, AXK1_NORM: "layers.{i}.ffn_post_norm.weight"}, unused=(AXK1_NORM,),
)

def sparse_attention(heads: int, interleaved: bool) -> tuple:
    """DeepSeek Sparse Attention's keys (model/sparse_attention.py) with a config class's defaults: top-k, the
    indexer's heads and width; its RoPE pairs interleaved (GLM-5) or by halves (DeepSeek-V3.2), not a key."""
    return (Key("index_topk", "dsa_index_topk", default=2048), Key("index_n_heads", "dsa_index_heads", default=heads),
            Key("index_head_dim", "dsa_index_head_dim", default=128), Fixed("dsa_index_rope_interleaved", interleaved))


# The lightning indexer of each layer: its query projection from the query latent, its key with a LayerNorm, the
# per-head weights.
DSA_TENSORS = {f"model.layers.{{i}}.self_attn.indexer.{theirs}": f"layers.{{i}}.attention.indexer.{ours}"
               for theirs, ours in (("wq_b.weight", "wq_b.weight"), ("wk.weight", "wk.weight"),
                                    ("k_norm.weight", "k_norm.weight"), ("k_norm.bias", "k_norm.bias"),
                                    ("weights_proj.weight", "head_weights.weight"))}

# DeepSeek-V3.2: DeepSeek-V3 (compressed queries always, RoPE pairs always interleaved whatever rope_interleave says)
# with the sparse attention's indexer in every layer, its RoPE by halves; dense layers by mlp_layer_types or
# first_k_dense_replace; its published multi-token prediction layer (61) as DeepSeek-V3's, an indexer in its block.
DEEPSEEK_V32 = Family(
    "deepseek_v32", "DeepseekV32ForCausalLM",
    (*without(MLA_CONFIG, "rope_interleaved"), Fixed("rope_interleaved", True), q_lora_rank(1536), latent_norm_eps(1e-6),
     *sigmoid_routing(scale=2.5, groups=8, topk_groups=4), mlp_layer_types(3), *sparse_attention(64, False)),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS, **DSA_TENSORS}, mtp=DEEPSEEK_MTP,
)


def _read_indexer_types(hf: dict) -> dict:
    """GLM-5's indexer_types (GlmMoeDsaConfig's fill from index_topk_pattern or index_topk_freq and
    index_skip_topk_offset): a 'shared' layer reuses the previous layer's top-k, which a block cannot see."""
    freq, offset = max(hf.get("index_topk_freq", 1), 1), hf.get("index_skip_topk_offset", 2)
    pattern = hf.get("index_topk_pattern")
    types = hf.get("indexer_types") or (
        [{"F": "full", "S": "shared"}.get(c, c) for c in pattern] if pattern is not None else
        ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(hf["num_hidden_layers"])])
    if set(types) != {"full"}:
        raise UsageError(f"config.json indexer_types {types!r} is not supported: a 'shared' layer reuses the previous "
                         "layer's top-k keys, and each layer here selects its own (every layer 'full' only)")
    return {}


# GLM-5 (glm_moe_dsa): DeepSeek-V3.2 with GLM's defaults (one expert group, 32 indexer heads), its indexer's RoPE
# in interleaved pairs.
GLM_MOE_DSA = Family(
    "glm_moe_dsa", "GlmMoeDsaForCausalLM",
    (*without(MLA_CONFIG, "rope_interleaved"), Fixed("rope_interleaved", True), q_lora_rank(2048), latent_norm_eps(1e-5),
     *sigmoid_routing(scale=2.5), mlp_layer_types(3), *sparse_attention(32, True),
     Derived(_read_indexer_types, lambda cfg: {"indexer_types": ["full"] * cfg.num_layers})),
    {**MLA_TENSORS, **SIGMOID_MOE_TENSORS, **DSA_TENSORS}, mtp=DEEPSEEK_MTP,
)

FAMILIES = (DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE_LITE, GLM4_MOE, SARVAM_MOE, DOTS1, EXAONE_MOE, SARVAM_MLA, AXK1, DEEPSEEK_V32,
            GLM_MOE_DSA)
