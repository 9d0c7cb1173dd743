"""Mixture-of-experts families whose layers slide or attend fully by type, each type with a RoPE block of its own
(rope_parameters keyed by layer type, Gemma3's form: Mellum) or rotate in the sliding layers only (Flint, Kolibri-1).
The expert tables are moe.py's. Every config value a
table cannot reproduce is refused by name on read."""

from typing import Callable

from megatron_llm.checkpoint.families.common import (
    LAYERS,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    layers_defaulting,
    without_mlp,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.deepseek import mlp_layer_types
from megatron_llm.checkpoint.families.llama import QWEN3
from megatron_llm.checkpoint.families.moe import EXPERT_BIAS, EXPERTS_REQUIRED, QWEN_EXPERTS, ROUTING, experts, expert_count, shared_mlp
from megatron_llm.checkpoint.families.sigmoid_moe import EVERY_LAYER_SPARSE
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key
from megatron_llm.errors import UsageError


def rope_per_type(full_theta: float, sliding_theta: float) -> Derived:
    """ROPE with one block per layer type (the sliding layers' base is model.rope_local_theta), the config class's
    bases where config.json has no rope_parameters; refused where the two blocks rotate different parts of a head
    (one model.rope_fraction holds for every layer)."""

    def read(hf: dict) -> dict:
        params = hf.get("rope_parameters") or {"full_attention": {"rope_type": "default", "rope_theta": full_theta},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}}
        blocks = [params[kind] or {} for kind in ("full_attention", "sliding_attention") if kind in params]
        fractions = sorted({block.get("partial_rotary_factor", 1.0) for block in blocks})
        if len(fractions) > 1:
            raise UsageError(f"config.json rope_parameters.partial_rotary_factor={fractions!r} is not supported: it "
                             "differs by layer type, and every layer here rotates the same part of each head")
        return ROPE.read({**hf, "rope_parameters": params})

    return Derived(read, ROPE.write)


# Mellum: Qwen3-MoE's block (per-head QK-norm, a softmax top-k renormalised by default) in sliding and full layers
# whose RoPE bases differ; the class fills every layer full and every layer sparse.
MELLUM = Family(
    "mellum", "MellumForCausalLM",
    (*(e for e in QWEN3.config if e not in (ROPE, LAYERS)), rope_per_type(500000.0, 10000.0),
     layers_defaulting(1024, lambda i: True), *ROUTING, expert_count("num_local_experts", "num_experts"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), Key("norm_topk_prob", "moe_renormalize", default=True),
     mlp_layer_types(0, first_key=None)),
    QWEN_EXPERTS,
)



def full_layers_nope(window: int, is_full: Callable[[int], bool], rotate_without_window: bool) -> Derived:
    """Sliding and full layers, the full ones without positions: the config class's window and pattern (layer i full
    where is_full(i, n)) where config.json leaves them out; without a window every layer rotates or none does (the
    attention rotates where a window is set, or also where none is: `rotate_without_window`)."""

    def read(hf: dict) -> dict:
        n = hf["num_hidden_layers"]
        size = hf["sliding_window"] if "sliding_window" in hf else window
        types = hf.get("layer_types") or ["full_attention" if is_full(i, n) else "sliding_attention" for i in range(n)]
        rotating = {i for i, kind in enumerate(types) if (kind == "sliding_attention" and size) or
                    (rotate_without_window and not size)}
        return {**LAYERS.read({**hf, "sliding_window": size, "layer_types": types}),
                "nope_layers": [i for i in range(n) if i not in rotating]}

    return Derived(read, write_every_layer_type)


# Flint: Qwen3-MoE's attention with a sink per head (stored as softmax_offset) in every layer, RoPE in the sliding
# layers only; a sigmoid top-k (no expert bias), renormalised by default, beside an ungated shared expert; the first
# two layers dense by default. transformers' balance loss takes the softmax of the router's logits.
FLINT = Family(
    "flint", "FlintForCausalLM",
    (*(e for e in QWEN3.config if e is not LAYERS),
     full_layers_nope(513, lambda i, n: i < 2 or i % 4 == 1 or i == n - 1, rotate_without_window=False),
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
    (*(e for e in SHAPE if getattr(e, "ours", None) != "ffn_hidden_size"), EVERY_LAYER_SPARSE,
     *(e for e in QWEN3.config if e not in SHAPE and e is not LAYERS and getattr(e, "ours", None) not in
       ("qkv_bias", "out_bias")), Fixed("qkv_bias", False), Fixed("out_bias", False),
     Fixed("norm_placement", "sandwich"), full_layers_nope(513, lambda i, n: (i + 1) % 5 == 0, rotate_without_window=True),
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

FAMILIES = (MELLUM, FLINT, KOLIBRI1)
