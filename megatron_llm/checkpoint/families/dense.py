"""More dense decoders written as differences from Llama: Nemotron and Arcee (a plain squared-ReLU MLP),
Seed-OSS (its own output-projection bias), Helium (interleaved RoPE), EXAONE 4 (output norms, QK-norm,
no positions on its full-attention layers)."""

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    LAYERS,
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    PLAIN_ACTIVATIONS,
    ROPE,
    SHAPE,
    activation,
    partial_rope,
    shape_defaulting,
    without,
)
from megatron_llm.checkpoint.families.llama import OLMO2
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key
from megatron_llm.errors import UsageError

# A plain MLP: up_proj is our w1 (the projection the activation reads), down_proj w2; no gate.
PLAIN_MLP_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if ".gate_proj." not in k and ".up_proj." not in k},
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.feed_forward.w1.bias",
}

# Nemotron: LayerNorm1P (a LayerNorm with bias whose weight acts as 1 + w), half of each head rotated.
NEMOTRON_NORMS = ("model.layers.{i}.input_layernorm", "model.layers.{i}.post_attention_layernorm", "model.norm")
NEMOTRON = Family(
    "nemotron", "NemotronForCausalLM",
    (*SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="relu2"), Key("norm_eps", "norm_eps", default=1e-5),
     Fixed("norm", "layernorm"), Fixed("norm_unit_offset", True), partial_rope(0.5),
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Key("mlp_bias", "mlp_bias", default=False)),
    {**PLAIN_MLP_TENSORS,
     **{f"{norm}.bias": PLAIN_MLP_TENSORS[f"{norm}.weight"].replace(".weight", ".bias") for norm in NEMOTRON_NORMS}},
)

ARCEE = Family(
    "arcee", "ArceeForCausalLM",
    (*without(LLAMA_CONFIG, "mlp"), activation("hidden_act", PLAIN_ACTIVATIONS, default="relu2")),
    PLAIN_MLP_TENSORS,
)

SEED_OSS = Family(
    "seed_oss", "SeedOssForCausalLM",
    (*shape_defaulting(head_dim=128, kv_heads=8), activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
     Key("rms_norm_eps", "norm_eps", default=1e-6), ROPE, Key("attention_bias", "qkv_bias", default=True),
     Key("attention_out_bias", "out_bias", default=False), Key("mlp_bias", "mlp_bias", default=False)),
    LLAMA_TENSORS,
)


def _helium_heads(hf: dict) -> dict:
    """Helium's o_proj is hidden_size x hidden_size, so its heads must fill the width exactly."""
    if hf["num_attention_heads"] * hf.get("head_dim", 128) != hf["hidden_size"]:
        raise UsageError("helium needs num_attention_heads * head_dim == hidden_size (its o_proj is square)")
    return {}


HELIUM = Family(
    "helium", "HeliumForCausalLM",
    (*shape_defaulting(head_dim=128, kv_heads=20), Derived(_helium_heads, lambda cfg: {}),
     activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-8),
     ROPE, Fixed("rope_interleaved", True), Key("attention_bias", "qkv_bias", default=False), Fixed("out_bias", False),
     Key("mlp_bias", "mlp_bias", default=False)),
    LLAMA_TENSORS,
)


def _exaone4_layer_types(hf: dict):
    """layer_types, or transformers' pattern: every sliding_window_pattern-th layer full, the rest sliding."""
    if hf.get("layer_types") or not hf.get("sliding_window"):
        return hf.get("layer_types")
    pattern = hf.get("sliding_window_pattern", 4)
    if not isinstance(pattern, int) or pattern <= 0:
        raise UsageError(f"config.json sliding_window_pattern {pattern!r} is not a layer count; give layer_types")
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hf["num_hidden_layers"])]


def _read_exaone4_layers(hf: dict) -> dict:
    """With a sliding window configured, EXAONE 4's full-attention layers have no positions (NoPE)."""
    types = _exaone4_layer_types(hf) or []
    nope = [i for i, kind in enumerate(types) if kind == "full_attention"] if hf.get("sliding_window") else []
    return {**LAYERS.read({**hf, "layer_types": types or None}), "nope_layers": nope}


def _write_exaone4_layers(cfg) -> dict:
    """Every layer's type, always: left out, transformers would apply its pattern."""
    kinds = ["sliding_attention" if cfg.layer(i).window else "full_attention" for i in range(cfg.num_layers)]
    return {"sliding_window": cfg.sliding_window, "layer_types": kinds}


EXAONE4 = Family(
    "exaone4", "Exaone4ForCausalLM",
    (*SHAPE, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     ROPE, Derived(_read_exaone4_layers, _write_exaone4_layers), Fixed("norm_placement", "output"),
     Fixed("qk_norm", True), Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False)),
    OLMO2.tensors,
)

FAMILIES = (NEMOTRON, ARCEE, SEED_OSS, HELIUM, EXAONE4)
