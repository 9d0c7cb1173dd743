"""Mixture-of-experts families whose layers slide or attend fully by type, each type with a RoPE block of its own
(rope_parameters keyed by layer type, Gemma3's form: Mellum) or rotate in the sliding layers only (Flint). The expert
tables are moe.py's. Every config value a
table cannot reproduce is refused by name on read."""

from megatron_llm.checkpoint.families.common import LAYERS, ROPE, layers_defaulting, write_every_layer_type
from megatron_llm.checkpoint.families.deepseek import mlp_layer_types
from megatron_llm.checkpoint.families.llama import QWEN3
from megatron_llm.checkpoint.families.moe import QWEN_EXPERTS, ROUTING, expert_count, shared_mlp
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



def _read_flint_layers(hf: dict) -> dict:
    """FlintConfig's fills (window 513; full layers 0, 1, every fourth from 1 and the last), the full layers without
    positions: its attention rotates only where a window is set."""
    n = hf["num_hidden_layers"]
    window = hf["sliding_window"] if "sliding_window" in hf else 513
    types = hf.get("layer_types") or ["full_attention" if i < 2 or i % 4 == 1 or i == n - 1 else "sliding_attention"
                                      for i in range(n)]
    rotating = {i for i, kind in enumerate(types) if kind == "sliding_attention" and window}
    return {**LAYERS.read({**hf, "sliding_window": window, "layer_types": types}),
            "nope_layers": [i for i in range(n) if i not in rotating]}


# Flint: Qwen3-MoE's attention with a sink per head (stored as softmax_offset) in every layer, RoPE in the sliding
# layers only; a sigmoid top-k (no expert bias), renormalised by default, beside an ungated shared expert; the first
# two layers dense by default. transformers' balance loss takes the softmax of the router's logits.
FLINT = Family(
    "flint", "FlintForCausalLM",
    (*(e for e in QWEN3.config if e is not LAYERS), Derived(_read_flint_layers, write_every_layer_type),
     Fixed("attention_sinks", True), expert_count("num_experts", "num_local_experts"),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), Key("decoder_sparse_step", "moe_layer_freq", default=1),
     Key("norm_topk_prob", "moe_renormalize", default=True), Key("mlp_only_layers", "moe_dense_layers", default=[0, 1]),
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", default=1024),
     Key("num_experts_per_tok", "moe_top_k"), Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.0005),
     Fixed("moe_score", "sigmoid"), Fixed("moe_aux_loss_probs", "softmax")),
    {**QWEN_EXPERTS, **shared_mlp("shared_expert"),
     "model.layers.{i}.self_attn.softmax_offset": "layers.{i}.attention.sinks.weight"},
)

FAMILIES = (MELLUM, FLINT)
