"""Mixture-of-experts families whose layers slide or attend fully by type, each type with a RoPE block of its own
(rope_parameters keyed by layer type, Gemma3's form): Mellum. The expert tables are moe.py's. Every config value a
table cannot reproduce is refused by name on read."""

from megatron_llm.checkpoint.families.common import LAYERS, ROPE, layers_defaulting
from megatron_llm.checkpoint.families.deepseek import mlp_layer_types
from megatron_llm.checkpoint.families.llama import QWEN3
from megatron_llm.checkpoint.families.moe import QWEN_EXPERTS, ROUTING, expert_count
from megatron_llm.checkpoint.families.table import Derived, Family, Key
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

FAMILIES = (MELLUM,)
