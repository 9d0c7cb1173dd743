"""More dense decoders written as differences from Llama: Nemotron, Arcee and Jais2 (a plain squared-ReLU
MLP), Seed-OSS (its own output-projection bias), Helium (interleaved RoPE), EXAONE 4 (output norms, QK-norm,
no positions on its full-attention layers), OLMo 3 (OLMo 2 with sliding layers, the full ones' RoPE scaled
alone), HunYuan dense (QK-norm after RoPE), Apertus (a plain xIELU MLP, QK-norm), CWM (sliding layers),
NanoChat (weightless norms, its rotation the other way round)."""

import dataclasses

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    HEAD_DIM,
    LAYERS,
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    PLAIN_ACTIVATIONS,
    ROPE,
    SHAPE,
    activation,
    layers_defaulting,
    partial_rope,
    rope_defaulting,
    shape_defaulting,
    without,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.llama import OLMO2, OLMO2_CONFIG
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, HalvesSwapped, Key
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

# Jais2: Llama with LayerNorms (with biases) and a plain squared-ReLU MLP, biases on every projection by default.
JAIS2 = Family(
    "jais2", "Jais2ForCausalLM",
    (*SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="relu2"), Key("layer_norm_eps", "norm_eps", default=1e-5),
     Fixed("norm", "layernorm"), ROPE, Key("attention_bias", "qkv_bias", default=True),
     Key("attention_bias", "out_bias", default=True), Key("mlp_bias", "mlp_bias", default=True)),
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


def layer_types_by_pattern(hf: dict):
    """layer_types, or transformers' pattern: every sliding_window_pattern-th layer full, the rest sliding
    (EXAONE 4, Cohere2)."""
    if hf.get("layer_types") or not hf.get("sliding_window"):
        return hf.get("layer_types")
    pattern = hf.get("sliding_window_pattern", 4)
    if not isinstance(pattern, int) or pattern <= 0:
        raise UsageError(f"config.json sliding_window_pattern {pattern!r} is not a layer count; give layer_types")
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hf["num_hidden_layers"])]


def _read_exaone4_layers(hf: dict) -> dict:
    """With a sliding window configured, EXAONE 4's full-attention layers have no positions (NoPE)."""
    types = layer_types_by_pattern(hf) or []
    nope = [i for i, kind in enumerate(types) if kind == "full_attention"] if hf.get("sliding_window") else []
    return {**LAYERS.read({**hf, "layer_types": types or None}), "nope_layers": nope}


EXAONE4_LAYERS = Derived(_read_exaone4_layers, write_every_layer_type)  # EXAONE-MoE's too


EXAONE4 = Family(
    "exaone4", "Exaone4ForCausalLM",
    (*SHAPE, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     ROPE, EXAONE4_LAYERS, Fixed("norm_placement", "output"),
     Fixed("qk_norm", True), Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False)),
    OLMO2.tensors,
)



def _read_olmo3_rope(hf: dict) -> dict:
    """Each layer type's own rope_parameters (the full layers' may be scaled, e.g. YaRN). A sliding base equal
    to the unscaled full one is the same table, read as no local base (so a Llama-like model converts)."""
    out = ROPE.read(hf)
    if out.get("rope_local_theta") == out["rope_theta"] and out["rope_scaling"] is None:
        out["rope_local_theta"] = None
    return out


def _write_olmo3_rope(cfg) -> dict:
    """Both blocks, always: Olmo3Config fills a missing one with its own base (500000), not ours."""
    theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    return ROPE.write(dataclasses.replace(cfg, rope_local_theta=theta))


OLMO3 = Family(
    "olmo3", "Olmo3ForCausalLM",
    (*(e for e in OLMO2_CONFIG if e is not ROPE), Derived(_read_olmo3_rope, _write_olmo3_rope),
     layers_defaulting(4096, lambda i: (i + 1) % 4 == 0)),  # Olmo3Config's: three sliding layers of four
    OLMO2.tensors,
)


def _read_hunyuan_rope(hf: dict) -> dict:
    """HunYuan's checkpoints label their RoPE "dynamic" with a fixed alpha (NTK-alpha): only the base is
    stretched, theta * alpha ** (d / (d - 2)), a plain RoPE table that is written back as one."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type")) != "dynamic" or not params.get("alpha"):
        return ROPE.read(hf)
    d = HEAD_DIM.read(hf)["head_dim"]
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0)) * params["alpha"] ** (d / (d - 2))
    return ROPE.read({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": theta}})


# ERNIE 4.5 (dense): Llama with RoPE over whole heads in interleaved pairs and use_bias on every projection but the
# head; its config class fills a missing head_dim with 128, num_key_value_heads with 2 and ties the head.
ERNIE4_5 = Family(
    "ernie4_5", "Ernie4_5ForCausalLM",
    (*without(shape_defaulting(head_dim=128, kv_heads=2), "tie_embeddings"),
     Key("tie_word_embeddings", "tie_embeddings", default=True), activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
     Key("rms_norm_eps", "norm_eps", default=1e-5), rope_defaulting({"rope_type": "default", "rope_theta": 500000.0}),
     Fixed("rope_fraction", 1.0), Fixed("rope_interleaved", True),
     *(Key("use_bias", ours, default=False) for ours in ("qkv_bias", "out_bias", "mlp_bias"))),
    LLAMA_TENSORS,
)

HUNYUAN_DENSE = Family(
    "hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM",
    (*(e for e in without(LLAMA_CONFIG, "mlp_bias") if e is not ROPE), Derived(_read_hunyuan_rope, ROPE.write),
     Fixed("mlp_bias", False), Fixed("qk_norm", True), Fixed("qk_norm_after_rope", True)),
    {**{k: v for k, v in LLAMA_TENSORS.items() if "_norm." not in k},
     "model.layers.{i}.self_attn.query_layernorm.weight": "layers.{i}.attention.q_norm.weight",
     "model.layers.{i}.self_attn.key_layernorm.weight": "layers.{i}.attention.k_norm.weight"},
)

# Apertus: the default a config.json without rope_parameters gets (ApertusConfig's).
APERTUS_ROPE = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}
APERTUS = Family(
    "apertus", "ApertusForCausalLM",
    (*(e for e in without(LLAMA_CONFIG, "mlp", "mlp_bias") if e is not ROPE),
     activation("hidden_act", {**PLAIN_ACTIVATIONS, "xielu": "xielu"}, default="xielu"),
     rope_defaulting(APERTUS_ROPE),
     Fixed("mlp_bias", False), Fixed("qk_norm", True)),
    {**{k: v for k, v in PLAIN_MLP_TENSORS.items() if "layernorm" not in k},
     "model.layers.{i}.attention_layernorm.weight": "layers.{i}.attention_norm.weight",
     "model.layers.{i}.feedforward_layernorm.weight": "layers.{i}.ffn_norm.weight",
     **{f"model.layers.{{i}}.mlp.act_fn.{t}": f"layers.{{i}}.feed_forward.act.{t}" for t in ("alpha_p", "alpha_n", "beta", "eps")}},
)



def _read_output_vocab(hf: dict) -> dict:
    """Apertus 1.5's head may keep only the first output_vocab_size rows (the text tokens: the released checkpoints'
    heads drop the image and audio codes' rows); its config class writes a full head as null, as we do."""
    rows = hf.get("output_vocab_size")
    return {"output_vocab_size": None if rows == hf["vocab_size"] else rows}


APERTUS1P5_TEXT = Family(
    "apertus1p5_text", "Apertus1p5TextForCausalLM",
    (*APERTUS.config, Derived(_read_output_vocab, lambda cfg: {"output_vocab_size": cfg.output_vocab_size})),
    APERTUS.tensors,
)

# CWM (Code World Model): Llama without projection biases, sliding and full layers.
CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}  # CwmConfig's, for a config.json without rope_parameters
CWM = Family(
    "cwm", "CwmForCausalLM",
    (*(e for e in without(LLAMA_CONFIG, "qkv_bias", "out_bias", "mlp_bias") if e is not ROPE),
     rope_defaulting(CWM_ROPE), Fixed("qkv_bias", False), Fixed("out_bias", False), Key("mlp_bias", "mlp_bias", default=False),
     layers_defaulting(8192, lambda i: i % 4 == 0)),  # CwmConfig's: every fourth layer full, the first of them
    LLAMA_TENSORS,
)

# NanoChat: weightless RMSNorms (also right after the embedding), QK-norm after RoPE, a plain squared-ReLU MLP,
# soft-capped logits. Its rotation turns the other way (rotate_half with the signs flipped): stored with each
# q/k head's halves swapped, our rotation gives its scores (table.HalvesSwapped).
NANOCHAT = Family(
    "nanochat", "NanoChatForCausalLM",
    (*SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="relu2"), Key("rms_norm_eps", "norm_eps", default=1e-6),
     ROPE, Fixed("rope_fraction", 1.0), Fixed("rope_interleaved", False), Fixed("norm_affine", False),
     Fixed("embedding_norm", True), Fixed("qk_norm", True), Fixed("qk_norm_after_rope", True),
     Derived(lambda hf: dict(logit_softcap=hf["final_logit_softcapping"] if "final_logit_softcapping" in hf else 15.0),
             lambda cfg: {"final_logit_softcapping": cfg.logit_softcap}),
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Fixed("mlp_bias", False)),
    {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        **{f"model.layers.{{i}}.self_attn.{theirs}.{kind}": HalvesSwapped(f"layers.{{i}}.attention.{ours}.{kind}")
           for theirs, ours in (("q_proj", "wq"), ("k_proj", "wk")) for kind in ("weight", "bias")},
        **{f"model.layers.{{i}}.self_attn.{theirs}.{kind}": f"layers.{{i}}.attention.{ours}.{kind}"
           for theirs, ours in (("v_proj", "wv"), ("o_proj", "wo")) for kind in ("weight", "bias")},
        "model.layers.{i}.mlp.fc1.weight": "layers.{i}.feed_forward.w1.weight",
        "model.layers.{i}.mlp.fc2.weight": "layers.{i}.feed_forward.w2.weight",
        "lm_head.weight": "output.weight",
    },
)

FAMILIES = (NEMOTRON, JAIS2, ARCEE, SEED_OSS, HELIUM, EXAONE4, OLMO3, ERNIE4_5, HUNYUAN_DENSE, APERTUS, APERTUS1P5_TEXT, CWM,
            NANOCHAT)
