"""Mixture-of-experts families whose layers slide or attend fully by type, each type with a RoPE block of its own
(rope_parameters keyed by layer type, Gemma3's form: Mellum, Laguna) or rotate in the sliding layers only (Flint, Kolibri-1, AFMoE).
The expert tables are moe.py's. Every config value a
table cannot reproduce is refused by name on read."""

import math
from typing import Callable

from megatron_llm.checkpoint.families.common import (
    HEAD_DIM,
    LAYERS,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    layers_defaulting,
    shape_defaulting,
    without_mlp,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.deepseek import mlp_layer_types
from megatron_llm.checkpoint.families.llama import QWEN3
from megatron_llm.checkpoint.families.moe import (
    EXPERT_BIAS,
    EXPERTS_REQUIRED,
    QWEN_EXPERTS,
    ROUTING,
    expert_count,
    experts,
    shared_experts,
    shared_mlp,
    unsupported,
)
from megatron_llm.checkpoint.families.sigmoid_moe import EVERY_LAYER_SPARSE
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key, get_family_value
from megatron_llm.errors import UsageError


# Qwen3's attention and block keys (QK-norm per head, biases under attention_bias, no MLP bias) without its shape,
# RoPE and windows, which these families fill their own way.
QWEN3_ATTENTION = tuple(e for e in QWEN3.config if e not in SHAPE and e not in (ROPE, LAYERS))


def rope_per_type(full: dict, sliding: dict) -> Derived:
    """ROPE with one block per layer type (the sliding layers' base is model.rope_local_theta), the config class's
    blocks `full` and `sliding` where config.json has no rope_parameters; the sliding block's own partial_rotary_factor
    is model.rope_local_fraction."""

    def read(hf: dict) -> dict:
        params = hf.get("rope_parameters") or {"full_attention": full, "sliding_attention": sliding}
        out = ROPE.read({**hf, "rope_parameters": params})
        local = (params.get("sliding_attention") or {}).get("partial_rotary_factor", 1.0)
        return {**out, "rope_local_fraction": None if local == out["rope_fraction"] else float(local)}

    def write(cfg) -> dict:
        out = ROPE.write(cfg)
        if cfg.rope_local_fraction is not None:  # ROPE writes rope_fraction into both blocks
            out["rope_parameters"]["sliding_attention"]["partial_rotary_factor"] = cfg.rope_local_fraction
        return out

    return Derived(read, write)


# Mellum: Qwen3-MoE's block (per-head QK-norm, a softmax top-k renormalised by default) in sliding and full layers
# whose RoPE bases differ; the class fills every layer full and every layer sparse.
MELLUM = Family(
    "mellum", "MellumForCausalLM",
    (*shape_defaulting(128, 4), *QWEN3_ATTENTION,
     rope_per_type({"rope_type": "default", "rope_theta": 500000.0}, {"rope_type": "default", "rope_theta": 10000.0}),
     layers_defaulting(1024, lambda i: True), *ROUTING, expert_count("num_local_experts", "num_experts"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), Key("norm_topk_prob", "moe_renormalize", default=True),
     mlp_layer_types(0, first_key=None)),
    QWEN_EXPERTS,
)



def full_layers_nope(window: int, is_full: Callable[[int, int], bool], without_window: str) -> Derived:
    """Sliding and full layers, the full ones without positions: the config class's window and pattern (layer i of n
    full where is_full(i, n)) where config.json leaves them out. Where no window is set, the layers that rotate are
    `without_window`: none (Flint), all (Kolibri-1) or those typed sliding (AFMoE)."""

    def read(hf: dict) -> dict:
        n = hf["num_hidden_layers"]
        size = hf["sliding_window"] if "sliding_window" in hf else window
        types = hf.get("layer_types") or ["full_attention" if is_full(i, n) else "sliding_attention" for i in range(n)]
        sliding = {i for i, kind in enumerate(types) if kind == "sliding_attention"}
        rotating = sliding if size else {"none": set(), "all": set(range(n)), "sliding": sliding}[without_window]
        return {**LAYERS.read({**hf, "sliding_window": size, "layer_types": types}),
                "nope_layers": [i for i in range(n) if i not in rotating]}

    return Derived(read, write_every_layer_type)


# Flint: Qwen3-MoE's attention with a sink per head (stored as softmax_offset) in every layer, RoPE in the sliding
# layers only; a sigmoid top-k (no expert bias), renormalised by default, beside an ungated shared expert; the first
# two layers dense by default. transformers' balance loss takes the softmax of the router's logits.
FLINT = Family(
    "flint", "FlintForCausalLM",
    (*shape_defaulting(128, 4), *QWEN3_ATTENTION, ROPE,
     full_layers_nope(513, lambda i, n: i < 2 or i % 4 == 1 or i == n - 1, without_window="none"),
     Fixed("attention_sinks", True), expert_count("num_experts", "num_local_experts"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), Key("decoder_sparse_step", "moe_layer_freq", default=1),
     Key("norm_topk_prob", "moe_renormalize", default=True), Key("mlp_only_layers", "moe_dense_layers", default=[0, 1]),
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", default=1024),
     Key("num_experts_per_tok", "moe_top_k"), Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.0005),
     Fixed("moe_score", "sigmoid"), Fixed("moe_aux_loss_probs", "softmax")),
    {**QWEN_EXPERTS, **shared_mlp("shared_expert"),
     "model.layers.{i}.self_attn.softmax_offset": "layers.{i}.attention.sinks.weight"},
)

# Kolibri-1: EXAONE 4's attention (per-head QK-norm; full layers without positions where a window is set; no biases)
# in GLM-4's sandwich block (norms after each sublayer too), every layer sparse: a sigmoid router whose expert bias
# moves the logits for the choice, renormalised only where norm_topk_prob says, beside shared experts.
KOLIBRI1 = Family(
    "kolibri1", "Kolibri1ForCausalLM",
    (*(e for e in shape_defaulting(128, 4) if getattr(e, "ours", None) != "ffn_hidden_size"), EVERY_LAYER_SPARSE, ROPE,
     *(e for e in QWEN3_ATTENTION if getattr(e, "ours", None) not in
       ("qkv_bias", "out_bias")), Fixed("qkv_bias", False), Fixed("out_bias", False),
     Fixed("norm_placement", "sandwich"), full_layers_nope(513, lambda i, n: (i + 1) % 5 == 0, without_window="all"),
     EXPERTS_REQUIRED, expert_count("num_local_experts", "num_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"),
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", default=512),
     Key("norm_topk_prob", "moe_renormalize", default=False), Fixed("moe_score", "sigmoid"),
     Fixed("moe_expert_bias", True), Fixed("moe_expert_bias_on", "logits"), Fixed("moe_aux_loss_coeff", 0.0)),
    {**without_mlp(LLAMA_TENSORS), **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     **shared_mlp("shared_experts"), "model.layers.{i}.moe.router.expert_bias": EXPERT_BIAS,
     "model.layers.{i}.post_attn_norm.weight": "layers.{i}.attention_post_norm.weight",
     "model.layers.{i}.post_ffn_norm.weight": "layers.{i}.ffn_post_norm.weight"},
)



def _read_afmoe_mup(hf: dict) -> dict:
    """mup_enabled scales the embedding by sqrt(hidden_size)."""
    return dict(embedding_multiplier=math.sqrt(hf["hidden_size"]) if hf.get("mup_enabled") else 1.0)


def _write_afmoe_mup(cfg) -> dict:
    return {"mup_enabled": cfg.embedding_multiplier != 1.0}  # read back: any other multiplier is refused


# AFMoE (Arcee's Trinity): Qwen3's per-head QK-norm with a sigmoid output gate from its own projection (gate_proj),
# RoPE in the sliding layers only, GLM-4's sandwich block, muP's embedding scale; after num_dense_layers dense layers,
# a sigmoid router choosing with the expert bias (mlp.expert_bias), always renormalised, scaled by route_scale, beside
# shared experts. transformers computes no aux loss for it.
AFMOE = Family(
    "afmoe", "AfmoeForCausalLM",
    (*(e for e in SHAPE if e is not HEAD_DIM), Key("head_dim", "head_dim", default=128), *QWEN3_ATTENTION, ROPE,
     Fixed("norm_placement", "sandwich"),
     Fixed("attention_gate", "sigmoid"), Derived(_read_afmoe_mup, _write_afmoe_mup),
     full_layers_nope(1024, lambda i, n: (i + 1) % 4 == 0, without_window="sliding"),
     EXPERTS_REQUIRED, Key("num_experts", "moe_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), shared_experts("num_shared_experts", 2),
     Key("route_scale", "moe_routed_scale", default=1.0), Fixed("moe_score", "sigmoid"), Fixed("moe_expert_bias", True),
     Fixed("moe_renormalize", True), Fixed("moe_aux_loss_coeff", 0.0),
     Derived(lambda hf: dict(moe_dense_layers=list(range(get_family_value(hf, "num_dense_layers", default=1)))),
             lambda cfg: {"num_dense_layers": len(cfg.moe_dense_layers)})),
    {**LLAMA_TENSORS, **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj", router="router.gate"),
     **shared_mlp("shared_experts"),
     "model.layers.{i}.mlp.expert_bias": EXPERT_BIAS,
     "model.layers.{i}.self_attn.gate_proj.weight": "layers.{i}.attention.wg.weight",
     "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attention_post_norm.weight",
     "model.layers.{i}.pre_mlp_layernorm.weight": "layers.{i}.ffn_norm.weight",
     "model.layers.{i}.post_mlp_layernorm.weight": "layers.{i}.ffn_post_norm.weight"},
)



def _read_laguna_heads(hf: dict) -> dict:
    """num_attention_heads_per_layer: one count for every layer here."""
    counts = hf.get("num_attention_heads_per_layer") or [hf["num_attention_heads"]]
    if set(counts) != {hf["num_attention_heads"]}:
        raise UsageError(f"config.json num_attention_heads_per_layer={counts!r} is not supported: every layer here has "
                         f"num_attention_heads ({hf['num_attention_heads']}) query heads")
    return {}


# Laguna: Qwen3's per-head QK-norm with a softplus output gate from its own projection (g_proj: one value per head
# where gating is true or "per-head", else per element), sliding and full layers whose RoPE blocks differ in base and
# rotated part (full: half of each head); after the dense first layer, a sigmoid router over soft-capped logits
# choosing with the expert bias, always renormalised, its output scaled, beside a shared expert; transformers'
# balance loss takes the softmax of the (capped) logits.
LAGUNA = Family(
    "laguna", "LagunaForCausalLM",
    (*shape_defaulting(128, 8), *QWEN3_ATTENTION,
     rope_per_type({"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
                   {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
     layers_defaulting(512, lambda i: True), Derived(_read_laguna_heads, lambda cfg: {
         "num_attention_heads_per_layer": [cfg.num_heads] * cfg.num_layers}),
     Fixed("attention_gate", "softplus"), Key("gating", "attention_gate_per_head", default=True,
                                              read=lambda v: v is True or v == "per-head"),
     unsupported("moe_apply_router_weight_on_input", "transformers' Laguna does not run it either"),
     expert_count("num_experts", "num_local_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"),
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", default=512),
     Key("moe_routed_scaling_factor", "moe_routed_scale", default=1.0),
     Key("moe_router_logit_softcapping", "moe_router_softcap", default=0.0, read=lambda v: v or None,
         write=lambda v: v or 0.0),
     Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001), Fixed("moe_score", "sigmoid"),
     Fixed("moe_expert_bias", True), Fixed("moe_renormalize", True), Fixed("moe_aux_loss_probs", "softmax"),
     mlp_layer_types(1, first_key=None)),
    {**LLAMA_TENSORS, **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     **shared_mlp("shared_expert"), "model.layers.{i}.mlp.experts.e_score_correction_bias": EXPERT_BIAS,
     "model.layers.{i}.self_attn.g_proj.weight": "layers.{i}.attention.wg.weight"},
)

FAMILIES = (MELLUM, FLINT, KOLIBRI1, AFMOE, LAGUNA)
