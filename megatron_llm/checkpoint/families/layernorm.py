"""LayerNorm families: Phi (phi-2), StarCoder2, StableLM, Cohere and Cohere2, each Llama's table with its norms'
biases and what the family changes; and Persimmon, with names of its own."""

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    HEAD_DIM,
    LAYERS,
    LLAMA_TENSORS,
    ROPE,
    PLAIN_ACTIVATIONS,
    SHAPE,
    activation,
    partial_rope,
    without,
    without_mlp,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.dense import layer_types_by_pattern
from megatron_llm.checkpoint.families.gpt import LAYERNORM, MHA_SHAPE, QKV, WHOLE_ROPE, modules, refused
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key
from megatron_llm.errors import UsageError

LAYERNORM_TENSORS = {
    **LLAMA_TENSORS,
    **{k.replace(".weight", ".bias"): v.replace(".weight", ".bias") for k, v in LLAMA_TENSORS.items() if "norm" in k},
}
TIED = (*without(SHAPE, "tie_embeddings"), Key("tie_word_embeddings", "tie_embeddings", default=True))

# Phi (phi-2): attention and MLP in parallel from one norm, half of each head rotated (rotate-half), a
# plain fc1/fc2 MLP, every bias including the head's, an optional LayerNorm on each head's q and k.
PHI = Family(
    "phi", "PhiForCausalLM",
    (*SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="gelu_new"), Key("layer_norm_eps", "norm_eps", default=1e-5),
     LAYERNORM, partial_rope(0.5), Key("qk_layernorm", "qk_norm", default=False), Fixed("parallel_residual", True),
     Fixed("qkv_bias", True), Fixed("linear_bias", True), Fixed("output_bias", True)),
    modules({
        "model.embed_tokens": "tok_embeddings",
        "model.layers.{i}.input_layernorm": "layers.{i}.attention_norm",
        "model.layers.{i}.self_attn.q_proj": "layers.{i}.attention.wq",
        "model.layers.{i}.self_attn.k_proj": "layers.{i}.attention.wk",
        "model.layers.{i}.self_attn.v_proj": "layers.{i}.attention.wv",
        "model.layers.{i}.self_attn.dense": "layers.{i}.attention.wo",
        "model.layers.{i}.self_attn.q_layernorm": "layers.{i}.attention.q_norm",
        "model.layers.{i}.self_attn.k_layernorm": "layers.{i}.attention.k_norm",
        "model.layers.{i}.mlp.fc1": "layers.{i}.feed_forward.w1",
        "model.layers.{i}.mlp.fc2": "layers.{i}.feed_forward.w2",
        "model.final_layernorm": "norm",
        "lm_head": "output",
    }),
)

# StarCoder2: a plain c_fc/c_proj MLP (tanh GELU), use_bias on every linear layer, a sliding window on
# every layer when set.
STARCODER2 = Family(
    "starcoder2", "Starcoder2ForCausalLM",
    (*TIED, activation("hidden_act", {"gelu_pytorch_tanh": "gelu_tanh", **PLAIN_ACTIVATIONS}, default="gelu_pytorch_tanh"),
     Key("norm_epsilon", "norm_eps", default=1e-5), LAYERNORM, *WHOLE_ROPE,
     Key("sliding_window", "sliding_window", default=None),
     Key("use_bias", "qkv_bias", default=True), Key("use_bias", "out_bias", default=True),
     Key("use_bias", "mlp_bias", default=True)),
    {**without_mlp(LAYERNORM_TENSORS),
     **modules({"model.layers.{i}.mlp.c_fc": "layers.{i}.feed_forward.w1",
                "model.layers.{i}.mlp.c_proj": "layers.{i}.feed_forward.w2"})},
)

# StableLM: a quarter of each head rotated, q/k/v biases optional, attention and MLP in parallel from one
# norm when use_parallel_residual. Its head width is hidden / heads whatever head_dim says.
STABLELM = Family(
    "stablelm", "StableLmForCausalLM",
    (*(e for e in SHAPE if e is not HEAD_DIM), activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
     Key("layer_norm_eps", "norm_eps", default=1e-5), LAYERNORM, partial_rope(0.25),
     Key("use_qkv_bias", "qkv_bias", default=False), Key("use_parallel_residual", "parallel_residual", default=False),
     refused("qk_layernorm", "StableLM's q/k LayerNorm has weights per head; model.qk_norm shares one across heads")),
    LAYERNORM_TENSORS,
)

# Cohere (Command-R): attention and MLP in parallel from one LayerNorm without bias, RoPE in interleaved
# pairs, the logits scaled by logit_scale.
COHERE_CONFIG = (
    *TIED, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("layer_norm_eps", "norm_eps", default=1e-5),
    LAYERNORM, Fixed("norm_bias", False), *WHOLE_ROPE, Fixed("rope_interleaved", True), Fixed("parallel_residual", True),
    Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
    Key("logit_scale", "logit_multiplier", default=0.0625),
)
COHERE = Family(
    "cohere", "CohereForCausalLM",
    (*COHERE_CONFIG,
     refused("use_qk_norm", "Cohere's q/k LayerNorm has weights per head; model.qk_norm shares one across heads")),
    LLAMA_TENSORS,
)


def _read_cohere2_layers(hf: dict) -> dict:
    """Cohere2 rotates only in its sliding layers: the full layers, or every layer without a window, have no
    positions (NoPE). Without the key, Cohere2Config's window of 4096 holds."""
    hf = {"sliding_window": 4096, **hf}
    types = layer_types_by_pattern(hf) or []
    nope = [i for i, kind in enumerate(types) if kind == "full_attention" or not hf.get("sliding_window")]
    return {**LAYERS.read({**hf, "layer_types": types or None}), "nope_layers": nope}


# Cohere2 (Command R7B, Command A): Cohere with sliding layers (RoPE) and full ones (NoPE); its head width is
# always hidden / heads.
COHERE2 = Family(
    "cohere2", "Cohere2ForCausalLM",
    (*(e for e in COHERE_CONFIG if e is not HEAD_DIM), Derived(_read_cohere2_layers, write_every_layer_type)),
    LLAMA_TENSORS,
)



def _compass_types(hf: dict) -> list[str]:
    return hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]  # CohereCompassTextConfig's default


def _read_compass_positions(hf: dict) -> dict:
    """rope_parameters holds a block per layer type, None where that type has no positions (NoPE); the full layers'
    block is the main table, the sliding layers' base their local one (left unscaled, as the reader of two blocks
    refuses otherwise). Without a block for a type transformers cannot run the model: refused by name."""
    types, params = _compass_types(hf), hf.get("rope_parameters") or {}
    missing = [kind for kind in dict.fromkeys(types) if kind not in params]
    if missing:
        raise UsageError(f"config.json rope_parameters has no block for the layer types {missing}; "
                         "cohere_compass_text keeps one per layer type (null: no positions)")
    full, sliding = params.get("full_attention"), params.get("sliding_attention")
    blocks = {"full_attention": full, "sliding_attention": sliding} if full and sliding else full or sliding or {}
    out = ROPE.read({**hf, "rope_parameters": blocks})
    if out.get("rope_local_theta") == out["rope_theta"] and out["rope_scaling"] is None:
        out["rope_local_theta"] = None  # one table
    nope = [i for i, kind in enumerate(types) if params[kind] is None]
    return {**out, **LAYERS.read({"sliding_window": 4096, **hf, "layer_types": types}), "nope_layers": nope}


def _write_compass_positions(cfg) -> dict:
    """A layer type's block, or None where its layers have no positions; a type whose layers differ reads back
    otherwise and is refused."""
    both = ROPE.write(cfg)["rope_parameters"]  # one block, or full and sliding ones with a local base
    blocks = {}
    for i, kind in enumerate(write_every_layer_type(cfg)["layer_types"]):
        blocks.setdefault(kind, None if cfg.layer(i).rope is None else both.get(kind, both))
    return {"rope_parameters": blocks, **write_every_layer_type(cfg)}


# Cohere Compass's language model (North): Cohere2 whose layer types each have their own RoPE block or none, rotating
# q/k by halves (Qwen3-VL's M-RoPE, which on text is RoPE), its logits unscaled unless logit_scale says.
COHERE_COMPASS_TEXT = Family(
    "cohere_compass_text", "CohereCompassForCausalLM",
    (*(e for e in COHERE_CONFIG if e not in (HEAD_DIM, *WHOLE_ROPE) and getattr(e, "ours", None) not in (
        "rope_interleaved", "logit_multiplier")),
     Derived(_read_compass_positions, _write_compass_positions), Fixed("rope_fraction", 1.0),
     Key("logit_scale", "logit_multiplier", default=1.0)),
    LLAMA_TENSORS,
)

# Persimmon: q/k/v fused per head (as GPT-NeoX), a LayerNorm over each head's q and k shared by the heads, half
# of each head rotated, a plain squared-ReLU MLP, every bias but the head's.
PERSIMMON = Family(
    "persimmon", "PersimmonForCausalLM",
    (*MHA_SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="relu2"), Key("layer_norm_eps", "norm_eps", default=1e-5),
     LAYERNORM, partial_rope(0.5), Key("qk_layernorm", "qk_norm", default=True), Fixed("qkv_bias", True),
     Fixed("linear_bias", True)),
    modules({
        "model.embed_tokens": "tok_embeddings",
        "model.layers.{i}.input_layernorm": "layers.{i}.attention_norm",
        "model.layers.{i}.self_attn.query_key_value": Fused(QKV, "heads"),
        "model.layers.{i}.self_attn.dense": "layers.{i}.attention.wo",
        "model.layers.{i}.self_attn.q_layernorm": "layers.{i}.attention.q_norm",
        "model.layers.{i}.self_attn.k_layernorm": "layers.{i}.attention.k_norm",
        "model.layers.{i}.post_attention_layernorm": "layers.{i}.ffn_norm",
        "model.layers.{i}.mlp.dense_h_to_4h": "layers.{i}.feed_forward.w1",
        "model.layers.{i}.mlp.dense_4h_to_h": "layers.{i}.feed_forward.w2",
        "model.final_layernorm": "norm",
        "lm_head": "output",
    }),
)

FAMILIES = (PHI, STARCODER2, STABLELM, COHERE, COHERE2, COHERE_COMPASS_TEXT, PERSIMMON)
