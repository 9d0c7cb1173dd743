"""Families that fuse projections into one tensor: Phi-3 (q/k/v and gate/up), GLM and GLM-4 (gate/up).
Each is Llama's table with the fused entries (table.Fused, concat layout) and what else it changes."""

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    LAYERS,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    activation,
    partial_rope,
    shape_defaulting,
)
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key
from megatron_llm.errors import UsageError

ATTENTION = tuple(f"layers.{{i}}.attention.{w}.weight" for w in ("wq", "wk", "wv"))
GATE_UP = ("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w3.weight")  # chunk(2): gate, then up
NO_BIASES = (Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False))


def _unfused(*projections: str) -> dict:
    """Llama's tensor names without the given projections (weights and biases)."""
    return {k: v for k, v in LLAMA_TENSORS.items() if not any(f".{p}." in k for p in projections)}


def _read_phi3_rope(hf: dict) -> dict:
    """Phi-3 keeps original_max_position_embeddings beside the RoPE block and transformers takes it from
    there (its default 4096 when absent); its old rope types su and yarn are longrope; it has no other."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.pop("type", params.get("rope_type", "default"))
    params["rope_type"] = "longrope" if kind in ("su", "yarn") else kind
    if params["rope_type"] not in ("default", "longrope"):
        raise UsageError(f"config.json rope type {kind!r} is not one phi3 has; it has default or longrope")
    params["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
    return ROPE.read({**hf, "rope_parameters": params})


def _write_phi3_rope(cfg) -> dict:
    old_len = (cfg.rope_scaling or {}).get("original_max_position_embeddings")
    return {**ROPE.write(cfg), **({"original_max_position_embeddings": old_len} if old_len else {})}


PHI3 = Family(
    "phi3", "Phi3ForCausalLM",
    (*SHAPE, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     Derived(_read_phi3_rope, _write_phi3_rope), LAYERS, *NO_BIASES),
    {**_unfused("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
     "model.layers.{i}.self_attn.qkv_proj.weight": Fused(ATTENTION),
     "model.layers.{i}.mlp.gate_up_proj.weight": Fused(GATE_UP)},
)

# GLM: half of each head rotated, in interleaved pairs; q/k/v biases only; gate/up fused. Its config class
# fills a missing head_dim with 128 and num_key_value_heads with 2, not from the other keys.
GLM_CONFIG = (
    *shape_defaulting(head_dim=128, kv_heads=2),
    activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1.5625e-07),
    partial_rope(0.5), Fixed("rope_interleaved", True),
    Key("attention_bias", "qkv_bias", default=True), Fixed("out_bias", False), Fixed("mlp_bias", False),
)
GLM_TENSORS = {**_unfused("gate_proj", "up_proj"), "model.layers.{i}.mlp.gate_up_proj.weight": Fused(GATE_UP)}
GLM = Family("glm", "GlmForCausalLM", GLM_CONFIG, GLM_TENSORS)

# GLM-4: GLM with sandwich norms; post_attention_layernorm is the MLP's input norm here.
GLM4 = Family(
    "glm4", "Glm4ForCausalLM", (*GLM_CONFIG, Fixed("norm_placement", "sandwich")),
    {**GLM_TENSORS,
     "model.layers.{i}.post_self_attn_layernorm.weight": "layers.{i}.attention_post_norm.weight",
     "model.layers.{i}.post_mlp_layernorm.weight": "layers.{i}.ffn_post_norm.weight"},
)

FAMILIES = (PHI3, GLM, GLM4)
