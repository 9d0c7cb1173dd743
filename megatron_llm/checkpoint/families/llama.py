"""Llama and the families written as a difference from it (transformers' modular files do the same):
each table is Llama's keys and tensor names plus what the family changes."""

import dataclasses

from megatron_llm.checkpoint.families.common import (
    KV_HEADS,
    LAYERS,
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    ROPE,
    SHAPE,
    SQRT_HIDDEN_EMBEDDING,
    also,
    layers_defaulting,
    rope_defaulting,
    scale_key,
    shape_defaulting,
    without,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key
from megatron_llm.errors import UsageError

LLAMA = Family("llama", "LlamaForCausalLM", LLAMA_CONFIG, LLAMA_TENSORS)

# Families transformers builds with its Llama code: only their config defaults (and, for EXAONE 3, the
# published tensor and key names) differ.
LLAMA_REST = tuple(e for e in LLAMA_CONFIG if e not in SHAPE)  # Llama's keys past the shape


def _same_biases(hf: dict) -> dict:
    if bool(hf.get("attention_bias", hf.get("qkv_bias"))) != bool(hf.get("mlp_bias", hf.get("bias"))):
        raise UsageError("internlm3 runs on Llama's code, which needs attention_bias == mlp_bias (qkv_bias == bias)")
    return {}


INTERNLM3 = Family(
    "internlm3", "LlamaForCausalLM",
    (*shape_defaulting(head_dim=128, kv_heads=2), *also(LLAMA_REST, attention_bias="qkv_bias", mlp_bias="bias"),
     Derived(_same_biases, lambda cfg: {})),
    LLAMA_TENSORS,
)
IQUESTCODER = Family("iquestcoder", "LlamaForCausalLM", (*shape_defaulting(head_dim=128, kv_heads=8), *LLAMA_REST), LLAMA_TENSORS)
EXAONE = Family(
    "exaone", "LlamaForCausalLM",
    also(LLAMA_CONFIG, num_hidden_layers="num_layers", rms_norm_eps="layer_norm_epsilon", hidden_act="activation_function"),
    {"transformer.wte.weight": "tok_embeddings.weight",
     "transformer.h.{i}.ln_1.weight": "layers.{i}.attention_norm.weight",
     **{f"transformer.h.{{i}}.attn.attention.{theirs}.{kind}": f"layers.{{i}}.attention.{ours}.{kind}"
        for theirs, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("out_proj", "wo")) for kind in ("weight", "bias")},
     "transformer.h.{i}.ln_2.weight": "layers.{i}.ffn_norm.weight",
     **{f"transformer.h.{{i}}.mlp.{theirs}.{kind}": f"layers.{{i}}.feed_forward.{ours}.{kind}"
        for theirs, ours in (("c_fc_0", "w1"), ("c_fc_1", "w3"), ("c_proj", "w2")) for kind in ("weight", "bias")},
     "transformer.ln_f.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
)

# Llama has no sliding windows; these families add them (LAYERS: a window on all layers or a pattern).
MISTRAL = Family(
    "mistral", "MistralForCausalLM",
    (*without(LLAMA_CONFIG, "qkv_bias", "out_bias", "mlp_bias"), Fixed("qkv_bias", False), Fixed("out_bias", False),
     Fixed("mlp_bias", False), LAYERS),
    LLAMA_TENSORS,
)

MINISTRAL = Family("ministral", "MinistralForCausalLM", MISTRAL.config, LLAMA_TENSORS)

# Ministral 3: Mistral whose queries, rotated, are scaled by 1 + beta * log1p(floor(p / L)) on every layer, with beta
# rope_parameters' llama_4_scaling_beta and L YaRN's original length (Llama 4's query temperature, with the position
# not offset by one and on RoPE layers too). Its config class's defaults: YaRN x16 from 16384 and beta 0.1.
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def _read_ministral3_rope(hf: dict) -> dict:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or MINISTRAL3_ROPE
    out = ROPE.read({**hf, "rope_parameters": params})
    if not params.get("llama_4_scaling_beta"):  # 0 scales by 1
        return out
    if not params.get("original_max_position_embeddings"):
        raise UsageError("config.json rope_parameters has llama_4_scaling_beta but no original_max_position_embeddings, "
                         "the length Ministral 3 divides the positions by")
    return {**out, "attn_temperature_floor": float(params["original_max_position_embeddings"]),
            "attn_temperature_scale": float(params["llama_4_scaling_beta"]), "attn_temperature_offset": 0,
            "attn_temperature_layers": "all"}


def _write_ministral3_rope(cfg) -> dict:
    """The temperature's length is written as the RoPE block's original length, which transformers needs even
    without one (it divides by it whatever beta is): a length other than YaRN's own reads back otherwise, refused."""
    floor = cfg.attn_temperature_floor
    length = floor if floor is not None else (cfg.rope_scaling or {}).get("original_max_position_embeddings", cfg.max_seq_len)
    beta = cfg.attn_temperature_scale if floor is not None else 0.0
    return {"rope_parameters": {"original_max_position_embeddings": int(length) if float(length).is_integer() else length,
                                **ROPE.write(cfg)["rope_parameters"], "llama_4_scaling_beta": beta}}


MINISTRAL3 = Family(
    "ministral3", "Ministral3ForCausalLM",
    (*shape_defaulting(head_dim=128, kv_heads=8),
     *(e for e in without(MISTRAL.config, "norm_eps") if e is not ROPE and e not in SHAPE),
     Key("rms_norm_eps", "norm_eps", default=1e-5), Derived(_read_ministral3_rope, _write_ministral3_rope)),
    LLAMA_TENSORS,
)

QWEN2 = Family(
    "qwen2", "Qwen2ForCausalLM",
    (*without(LLAMA_CONFIG, "qkv_bias", "out_bias", "mlp_bias"), Fixed("qkv_bias", True), Fixed("out_bias", False),
     Fixed("mlp_bias", False), LAYERS),
    LLAMA_TENSORS,
)

QWEN3 = Family(
    "qwen3", "Qwen3ForCausalLM",
    (*without(LLAMA_CONFIG, "mlp_bias"), Fixed("mlp_bias", False), Fixed("qk_norm", True), LAYERS),
    LLAMA_TENSORS,
)

SMOLLM3 = Family(
    "smollm3", "SmolLM3ForCausalLM",
    (*LLAMA_CONFIG, LAYERS,
     # no_rope_layers holds 1 where a layer uses RoPE and 0 where it has no positions.
     Derived(lambda hf: dict(nope_layers=[i for i, use in enumerate(hf.get("no_rope_layers") or []) if not use]),
             lambda cfg: {"no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)]})),
    LLAMA_TENSORS,
)

GRANITE = Family(
    "granite", "GraniteForCausalLM",
    (*LLAMA_CONFIG,
     Key("embedding_multiplier", "embedding_multiplier", default=1.0),
     Key("residual_multiplier", "residual_multiplier", default=1.0),
     Key("attention_multiplier", "attention_scale", default=1.0),  # GraniteConfig's (it takes no null)
     Key("logits_scaling", "logit_multiplier", default=1.0, read=lambda v: 1.0 / v, write=lambda v: 1.0 / v)),
    LLAMA_TENSORS,
)



def _granite_swa_types(hf: dict) -> list[str]:
    """layer_types, or GraniteSWAConfig's pattern: every fourth layer full, from the first."""
    return hf.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention"
                                     for i in range(hf["num_hidden_layers"])]


def _read_granite_swa_rope(hf: dict) -> dict:
    """layer_rope_theta: a RoPE base per layer, 0 for none (NoPE). The menu has one base for the full layers and one
    for the sliding ones (rope_local_theta, unscaled), so a model with more is refused by name."""
    out = ROPE.read(hf)
    thetas = hf.get("layer_rope_theta") or [out["rope_theta"]] * hf["num_hidden_layers"]
    sliding = [kind == "sliding_attention" and bool(hf.get("sliding_window", 128)) for kind in _granite_swa_types(hf)]
    bases = {kind: {t for t, s in zip(thetas, sliding) if t and s == kind} for kind in (False, True)}
    if len(bases[False]) > 1 or len(bases[True]) > 1:
        raise UsageError(f"config.json layer_rope_theta {thetas} gives one kind of layer several RoPE bases; the menu has "
                         "one for the full layers and one for the sliding ones")
    full = next(iter(bases[False] or bases[True] or {out["rope_theta"]}))
    local = next(iter(bases[True] - {full}), None)
    if local is not None and out["rope_scaling"] is not None:
        raise UsageError("config.json scales the RoPE of every base in layer_rope_theta; the sliding layers' own base is "
                         "left unscaled here: only one base with rope scaling is supported")
    return {**out, "rope_theta": float(full), "rope_local_theta": None if local is None else float(local),
            "nope_layers": [i for i, t in enumerate(thetas) if not t]}


def _write_granite_swa_rope(cfg) -> dict:
    thetas = [{None: 0, "global": cfg.rope_theta, "local": cfg.rope_local_theta}[cfg.layer(i).rope]
              for i in range(cfg.num_layers)]
    return {**ROPE.write(dataclasses.replace(cfg, rope_local_theta=None)), "layer_rope_theta": thetas}


# Granite SWA: Granite with a learned sink per head (gpt-oss's), sliding layers and a RoPE base per layer.
GRANITE_SWA = Family(
    "granite_swa", "GraniteSWAForCausalLM",
    (*(e for e in without(GRANITE.config, "tie_embeddings") if e is not ROPE),
     Key("tie_word_embeddings", "tie_embeddings", default=True),
     Derived(_read_granite_swa_rope, _write_granite_swa_rope), Fixed("attention_sinks", True),
     layers_defaulting(128, lambda i: i % 4 == 0)),
    {**LLAMA_TENSORS, "model.layers.{i}.self_attn.sinks": "layers.{i}.attention.sinks.weight"},
)

# Emu3's language model (transformers saves Emu3ForCausalLM as this type): Llama without projection biases, with its
# config class's defaults (8 key/value heads, RMSNorm epsilon 1e-5, RoPE base 1e6).
EMU3_TEXT = Family(
    "emu3_text_model", "Emu3ForCausalLM",
    (*(e for e in without(LLAMA_CONFIG, "qkv_bias", "out_bias", "mlp_bias", "norm_eps", "num_kv_heads")
       if e not in (ROPE, KV_HEADS)),
     Key("num_key_value_heads", "num_kv_heads", default=8), Key("rms_norm_eps", "norm_eps", default=1e-5),
     rope_defaulting({"rope_type": "default", "rope_theta": 1000000.0}),
     Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False)),
    LLAMA_TENSORS,
)

# HyperCLOVA X: Granite with norms after each sublayer too (use_post_norm: sandwich), its logits multiplied by
# logits_scaling where Granite divides.
HYPERCLOVAX = Family(
    "hyperclovax", "HyperCLOVAXForCausalLM",
    (*without(GRANITE.config, "logit_multiplier", "attention_scale"), Key("logits_scaling", "logit_multiplier", default=1.0),
     Key("attention_multiplier", "attention_scale", default=None),
     Key("use_post_norm", "norm_placement", default=True, read=lambda v: "sandwich" if v else "pre",
         write=lambda placement: placement == "sandwich")),
    {**LLAMA_TENSORS, "model.layers.{i}.post_norm1.weight": "layers.{i}.attention_post_norm.weight",
     "model.layers.{i}.post_norm2.weight": "layers.{i}.ffn_post_norm.weight"},
)

# Gemma: RMSNorm weights act as 1 + w, embeddings are scaled by sqrt(hidden), the MLP is GeGLU (tanh).
# Every Gemma config class ties the head unless told otherwise (Gemma 3 1b's config.json does not say).
GEMMA_NORMS = (Fixed("norm_unit_offset", True), SQRT_HIDDEN_EMBEDDING,
               Key("tie_word_embeddings", "tie_embeddings", default=True))
GEMMA = Family(
    "gemma", "GemmaForCausalLM",
    (*without(LLAMA_CONFIG, "mlp_bias", "tie_embeddings"), Fixed("mlp_bias", False), *GEMMA_NORMS),
    LLAMA_TENSORS,
)

# Gemma2/3: sandwich norms around both sublayers, a query scale of their own, soft-caps (Gemma2),
# QK-norm and a local RoPE base for the sliding layers (Gemma3).
SANDWICH_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attention_post_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.ffn_post_norm.weight",
}
GEMMA2_CONFIG = (
    *without(LLAMA_CONFIG, "mlp", "mlp_bias", "tie_embeddings"),
    LAYERS,
    *GEMMA_NORMS,
    Fixed("norm_placement", "sandwich"), Fixed("mlp_bias", False),
    Key("hidden_activation", "mlp", default="gelu_pytorch_tanh", read=lambda v: {"gelu_pytorch_tanh": "geglu_tanh"}.get(v, v),
        write=lambda v: {"geglu_tanh": "gelu_pytorch_tanh"}.get(v, v)),
    scale_key("query_pre_attn_scalar", "attention_scale"),
    Key("attn_logit_softcapping", "attn_softcap", default=None),
    Key("final_logit_softcapping", "logit_softcap", default=None),
)
GEMMA2 = Family("gemma2", "Gemma2ForCausalLM", GEMMA2_CONFIG, SANDWICH_TENSORS)
# VaultGemma: Gemma2 without the norms after each sublayer (plain pre-norm).
VAULTGEMMA = Family(
    "vaultgemma", "VaultGemmaForCausalLM", without(GEMMA2_CONFIG, "norm_placement"),
    {k: v for k, v in SANDWICH_TENSORS.items() if "post_" not in k},
)


def _gemma3_layout(hf: dict) -> dict:
    """config.json as Gemma3TextConfig reads it: the published checkpoints (transformers 4.x) give
    sliding_window_pattern (default 6: every 6th layer full), rope_theta and rope_scaling for the full layers and
    rope_local_base_freq for the sliding ones, where 5.x writes layer_types and rope_parameters per layer type."""
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention"
        for i in range(hf["num_hidden_layers"])]
    params = hf.get("rope_parameters") or {}
    full = {"rope_type": "default", **(params.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    sliding = {"rope_type": "default", **(params.get("sliding_attention") or {})}
    sliding.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    return {**hf, "layer_types": types, "rope_parameters": {"full_attention": full, "sliding_attention": sliding}}


GEMMA3_CONFIG = tuple(
    Derived(lambda hf: LAYERS.read(_gemma3_layout(hf)), write_every_layer_type) if entry is LAYERS else  # left out,
    Derived(lambda hf: ROPE.read(_gemma3_layout(hf)), ROPE.write) if entry is ROPE else entry  # transformers' pattern
    for entry in (*GEMMA2_CONFIG, Fixed("qk_norm", True)))
GEMMA3 = Family("gemma3_text", "Gemma3ForCausalLM", GEMMA3_CONFIG, SANDWICH_TENSORS)

# OLMo: a parameter-free LayerNorm, optional q/k/v clipping. OLMo2: RMSNorm on each sublayer's output
# inside the residual, QK-norm over the whole projection.
OLMO = Family(
    "olmo", "OlmoForCausalLM",
    (*without(LLAMA_CONFIG, "norm_eps"), Fixed("norm", "layernorm"), Fixed("norm_affine", False), Fixed("norm_eps", 1e-5),
     Key("clip_qkv", "qkv_clip", default=None)),
    {k: v for k, v in LLAMA_TENSORS.items() if "norm" not in k},
)
OLMO2_CONFIG = (*LLAMA_CONFIG, Fixed("norm_placement", "output"), Fixed("qk_norm", True), Fixed("qk_norm_per_head", False))
OLMO2 = Family(
    "olmo2", "Olmo2ForCausalLM",
    OLMO2_CONFIG,
    {**{k: v for k, v in LLAMA_TENSORS.items() if "layernorm" not in k},
     "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attention_post_norm.weight",
     "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.ffn_post_norm.weight"},
)

FAMILIES = (LLAMA, INTERNLM3, IQUESTCODER, EXAONE, MISTRAL, MINISTRAL, MINISTRAL3, QWEN2, QWEN3, SMOLLM3, GRANITE,
            GRANITE_SWA, EMU3_TEXT, HYPERCLOVAX, GEMMA, GEMMA2, VAULTGEMMA, GEMMA3, OLMO, OLMO2)
