"""Mixture-of-experts families: a dense family's table plus the router, the experts (stored one tensor per
expert, stacked into our [E, ...] weights by `Stacked`) and the shared experts."""

from megatron_llm.checkpoint.families.common import LLAMA_TENSORS, without
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

FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
