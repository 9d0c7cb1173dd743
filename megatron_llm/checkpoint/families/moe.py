"""Mixture-of-experts families: a dense family's table plus the router, the experts (stored one tensor per
expert, stacked into our [E, ...] weights by `Stacked`) and the shared experts."""

import math

from megatron_llm.checkpoint.families.common import GATED_ACTIVATIONS, LLAMA_TENSORS, ROPE, activation, without
from megatron_llm.checkpoint.families.llama import MISTRAL, OLMO2, QWEN2, QWEN3
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key, Stacked
from megatron_llm.errors import UsageError


def unsupported(hf_key: str, why: str) -> Derived:
    """A key whose non-null value the model cannot reproduce: refused by name on read, never written."""

    def read(hf: dict) -> dict:
        if hf.get(hf_key):
            raise UsageError(f"config.json {hf_key}={hf[hf_key]!r} is not supported: {why}")
        return {}

    return Derived(read, lambda cfg: {})


def expert_count(hf_key: str, other: str) -> Derived:
    """model.moe_experts from `hf_key`, or from `other` where transformers' attribute map wrote that name
    (Qwen3-MoE's config.json says num_experts, its to_dict num_local_experts)."""

    def read(hf: dict) -> dict:
        count = hf.get(hf_key) or hf.get(other)
        if not count:
            raise UsageError(f"config.json lacks {hf_key!r}, the number of experts")
        return dict(moe_experts=count)

    return Derived(read, lambda cfg: {hf_key: cfg.moe_experts})


def experts(prefix: str, gate: str, up: str, down: str) -> dict:
    """The router and the stacked experts under `prefix` (the layer's MoE module), with the family's names
    for the gate, up and down projections of one expert."""
    ours = "layers.{i}.feed_forward"
    return {
        f"{prefix}.gate.weight": f"{ours}.router.weight",
        f"{prefix}.experts.{{e}}.{gate}.weight": Stacked(f"{ours}.experts.w1"),
        f"{prefix}.experts.{{e}}.{up}.weight": Stacked(f"{ours}.experts.w3"),
        f"{prefix}.experts.{{e}}.{down}.weight": Stacked(f"{ours}.experts.w2"),
    }


ROUTING = (  # transformers' names: top-k of a softmax, the load-balancing coefficient
    Key("num_experts_per_tok", "moe_top_k"),
    Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001),
    Fixed("moe_score", "softmax"),
)
# Qwen-style MoE layers: an expert width of their own, every n-th layer sparse, some layers kept dense.
QWEN_LAYOUT = (
    expert_count("num_experts", "num_local_experts"),
    Key("moe_intermediate_size", "moe_ffn_hidden_size"),
    Key("norm_topk_prob", "moe_renormalize", default=False),
    Key("decoder_sparse_step", "moe_layer_freq", default=1),
    Key("mlp_only_layers", "moe_dense_layers", default=[]),
)
QWEN_EXPERTS = {**LLAMA_TENSORS, **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj")}

MIXTRAL = Family(
    "mixtral", "MixtralForCausalLM",
    (*MISTRAL.config, *ROUTING, expert_count("num_local_experts", "num_experts"),
     Fixed("moe_renormalize", True), unsupported("router_jitter_noise", "the router has no jitter")),
    {**{k: v for k, v in LLAMA_TENSORS.items() if ".mlp." not in k},
     **experts("model.layers.{i}.block_sparse_moe", "w1", "w3", "w2")},
)

QWEN2_MOE = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM",
    (*without(QWEN2.config, "qkv_bias"), Key("qkv_bias", "qkv_bias", default=True), *ROUTING, *QWEN_LAYOUT,
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size"), Fixed("moe_shared_gate", True)),
    {**QWEN_EXPERTS,
     **{k.replace(".mlp.", ".mlp.shared_expert."): v.replace(".feed_forward.", ".feed_forward.shared_experts.")
        for k, v in LLAMA_TENSORS.items() if ".mlp." in k},
     "model.layers.{i}.mlp.shared_expert_gate.weight": "layers.{i}.feed_forward.shared_gate.weight"},
)

QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", (*QWEN3.config, *ROUTING, *QWEN_LAYOUT), QWEN_EXPERTS)

# OLMoE: OLMo2's QK-norm over the whole projection in a pre-norm block, and experts of intermediate_size.
OLMOE = Family(
    "olmoe", "OlmoeForCausalLM",
    (*without(OLMO2.config, "norm_placement"), *ROUTING, expert_count("num_experts", "num_local_experts"),
     Key("norm_topk_prob", "moe_renormalize", default=False),
     unsupported("clip_qkv", "OLMoE clips q, k and v after their norms, the model before")),
    QWEN_EXPERTS,
)



def _read_mla_shape(hf: dict) -> dict:
    """Our query/key head is [nope | rope]; YaRN's mscale_all_dim also scales the softmax (mscale squared)."""
    rope, head = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scale, factor = None, params.get("factor", 1.0)
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim") and factor > 1:
        scale = head**-0.5 * (0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0) ** 2
    return dict(head_dim=head, mla_rope_head_dim=rope, attention_scale=scale, num_kv_heads=hf["num_attention_heads"])


def _write_mla_shape(cfg) -> dict:
    return {"qk_nope_head_dim": cfg.head_dim - cfg.mla_rope_head_dim, "qk_rope_head_dim": cfg.mla_rope_head_dim,
            "num_key_value_heads": cfg.num_kv_heads}


def _read_shared(hf: dict) -> dict:
    return dict(moe_shared_ffn_hidden_size=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"],
                moe_dense_layers=list(range(hf.get("first_k_dense_replace") or 0)))


def _write_shared(cfg) -> dict:
    return {"n_shared_experts": cfg.moe_shared_ffn_hidden_size // cfg.moe_ffn_hidden_size,
            "first_k_dense_replace": len(cfg.moe_dense_layers)}


# DeepSeek-V3: latent attention, a sigmoid router over groups of experts with the aux-loss-free bias (its
# e_score_correction_bias), shared experts, the first k layers dense. transformers computes no aux loss for it.
DEEPSEEK_V3 = Family(
    "deepseek_v3", "DeepseekV3ForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size"), Key("num_hidden_layers", "num_layers"),
     Key("num_attention_heads", "num_heads"), Key("intermediate_size", "ffn_hidden_size"),
     Key("max_position_embeddings", "max_seq_len"), Key("tie_word_embeddings", "tie_embeddings", default=False),
     activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-6), ROPE,
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Fixed("mlp_bias", False), Fixed("attention", "mla"), Derived(_read_mla_shape, _write_mla_shape),
     Key("kv_lora_rank", "mla_kv_lora_rank"), Key("q_lora_rank", "mla_q_lora_rank", default=None),
     Key("v_head_dim", "mla_v_head_dim"), Key("rope_interleave", "rope_interleaved", default=True),
     Key("n_routed_experts", "moe_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), Fixed("moe_score", "sigmoid"), Fixed("moe_expert_bias", True),
     Key("norm_topk_prob", "moe_renormalize", default=True), Key("routed_scaling_factor", "moe_routed_scale", default=1.0),
     Key("n_group", "moe_groups", default=1), Key("topk_group", "moe_topk_groups", default=1),
     Derived(_read_shared, _write_shared), Fixed("moe_aux_loss_coeff", 0.0)),
    {**{k: v for k, v in LLAMA_TENSORS.items() if ".self_attn." not in k},
     **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     "model.layers.{i}.mlp.gate.e_score_correction_bias": "layers.{i}.feed_forward.router.expert_bias",
     **{k.replace(".mlp.", ".mlp.shared_experts."): v.replace(".feed_forward.", ".feed_forward.shared_experts.")
        for k, v in LLAMA_TENSORS.items() if ".mlp." in k},
     **{f"model.layers.{{i}}.self_attn.{theirs}": f"layers.{{i}}.attention.{ours}" for theirs, ours in (
         ("q_proj.weight", "wq.weight"), ("q_a_proj.weight", "wq_a.weight"), ("q_a_proj.bias", "wq_a.bias"),
         ("q_a_layernorm.weight", "q_a_norm.weight"), ("q_b_proj.weight", "wq_b.weight"),
         ("kv_a_proj_with_mqa.weight", "wkv_a.weight"), ("kv_a_proj_with_mqa.bias", "wkv_a.bias"),
         ("kv_a_layernorm.weight", "kv_a_norm.weight"), ("kv_b_proj.weight", "wkv_b.weight"),
         ("o_proj.weight", "wo.weight"), ("o_proj.bias", "wo.bias"))}},
)

FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3)
