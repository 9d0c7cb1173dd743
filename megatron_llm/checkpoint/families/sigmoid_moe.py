"""Mixture-of-experts families of the last year whose router is DeepSeek-V3's sigmoid with the expert bias, in an
attention block of the Llama or Qwen3 kind: Solar Open (GLM-4.5's router under Llama's attention) and HunYuan v3
(Qwen3's attention, the expert bias beside the router). The router pieces are families/deepseek.py's, the expert
tables moe.py's. Every config value a table cannot reproduce is refused by name on read."""

from megatron_llm.checkpoint.families.common import (
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    rope_defaulting,
    shape_defaulting,
    without,
    without_mlp,
)
from megatron_llm.checkpoint.families.deepseek import SIGMOID_MOE_TENSORS, mlp_layer_types, sigmoid_routing
from megatron_llm.checkpoint.families.moe import EXPERT_BIAS, EXPERTS_REQUIRED, experts, shared_experts, shared_mlp
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key


def theta(default: float) -> Derived:
    """ROPE for a config class whose default_theta fills a missing rope_parameters."""
    return rope_defaulting({"rope_type": "default", "rope_theta": default})


# Llama's keys with the class's fills for head_dim (128) and num_key_value_heads (8), where config.json leaves them
# out, and the block's own RoPE, epsilon and biases in their place.
LLAMA_SHAPE_128 = (*shape_defaulting(128, 8), *(e for e in without(LLAMA_CONFIG, "norm_eps", "qkv_bias", "out_bias",
                                                                    "mlp_bias") if e is not ROPE and e not in SHAPE))


def _read_every_layer_sparse(hf: dict) -> dict:
    """Every layer sparse, and a config class without intermediate_size (Solar Open, Kolibri-1): the dense width we
    still hold is config.json's where a saved one carries it, else the experts'."""
    return dict(ffn_hidden_size=hf.get("intermediate_size") or hf["moe_intermediate_size"], moe_dense_layers=[])


EVERY_LAYER_SPARSE = Derived(_read_every_layer_sparse, lambda cfg: {"intermediate_size": cfg.ffn_hidden_size})


# Solar Open: Llama's attention (q/k/v biases under attention_bias, none on the output; every dim rotated, as its
# rotate-half over the whole head does) and GLM-4.5's MoE block in every layer (sigmoid router with the expert bias,
# optional groups, renormalised top-k, a routed scale, shared experts).
SOLAR_OPEN = Family(
    "solar_open", "SolarOpenForCausalLM",
    (*(e for e in LLAMA_SHAPE_128 if getattr(e, "ours", None) != "ffn_hidden_size"),
     EVERY_LAYER_SPARSE,
     theta(1_000_000.0), Fixed("rope_fraction", 1.0), Key("rms_norm_eps", "norm_eps", default=1e-5),
     Key("attention_bias", "qkv_bias", default=False), Fixed("out_bias", False), Fixed("mlp_bias", False),
     *sigmoid_routing()),
    {**without_mlp(LLAMA_TENSORS), **SIGMOID_MOE_TENSORS},
)

# HunYuan v3 (Hy3): Qwen3's attention (a per-head QK-norm before RoPE; attention_bias on all four projections) and
# mlp_bias on the dense MLPs and shared experts; after the dense first layers (mlp_layer_types), a sigmoid router
# choosing with the expert bias (kept in the MoE block, mlp.expert_bias), always renormalised and scaled by
# router_scaling_factor, no groups, beside shared experts. transformers computes no aux loss for it.
HY_V3 = Family(
    "hy_v3", "HYV3ForCausalLM",
    (*LLAMA_SHAPE_128, theta(11_158_840.0), Key("rms_norm_eps", "norm_eps", default=1e-5),
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Key("mlp_bias", "mlp_bias", default=False), Fixed("qk_norm", True),
     EXPERTS_REQUIRED, Key("num_experts", "moe_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), shared_experts("num_shared_experts", 1),
     Key("router_scaling_factor", "moe_routed_scale", default=2.826), Fixed("moe_score", "sigmoid"),
     Fixed("moe_expert_bias", True), Fixed("moe_renormalize", True), Fixed("moe_aux_loss_coeff", 0.0),
     mlp_layer_types(1, first_key=None)),
    {**LLAMA_TENSORS,
     **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj", router="router.gate"),
     **shared_mlp("shared_mlp"), "model.layers.{i}.mlp.expert_bias": EXPERT_BIAS},
)

FAMILIES = (SOLAR_OPEN, HY_V3)
