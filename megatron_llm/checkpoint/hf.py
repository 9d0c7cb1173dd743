"""Hugging Face <-> native: one key table, and the config mapping, for llama, mistral, qwen2 and qwen3.

Both directions of the state-dict conversion read HF_TO_NATIVE; `{i}` stands for the layer index.
No tensor is permuted: our RoPE uses Hugging Face's rotate-half layout (see model/rope.py). Keys a
model does not have (biases, q_norm/k_norm) are simply absent from its state dict.
"""

import dataclasses
import re

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

HF_TO_NATIVE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.input_layernorm.bias": "layers.{i}.attention_norm.bias",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attention.wo.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.bias": "layers.{i}.ffn_norm.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "layers.{i}.feed_forward.w1.bias",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.feed_forward.w3.bias",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.down_proj.bias": "layers.{i}.feed_forward.w2.bias",
    "model.norm.weight": "norm.weight",
    "model.norm.bias": "norm.bias",
    "lm_head.weight": "output.weight",
}
NATIVE_TO_HF = {native: hf for hf, native in HF_TO_NATIVE.items()}

# Older Hugging Face checkpoints saved the RoPE table; we recompute it from the config.
HF_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
LAYER = re.compile(r"(?<![^.])layers\.(\d+)\.")  # "layers.N." at the start or after a dot

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}
ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}  # HF hidden_act of a gated MLP -> our mlp
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rename_key(key: str, table: dict) -> str:
    """One key through HF_TO_NATIVE or NATIVE_TO_HF; KeyError when the table has no such key."""
    match = LAYER.search(key)
    template = LAYER.sub("layers.{i}.", key, count=1)
    if template not in table:
        raise KeyError(f"no mapping for checkpoint key {key!r}")
    return table[template].format(i=match.group(1) if match else "")


def _rename(state_dict: dict, table: dict) -> dict:
    return {rename_key(key, table): value for key, value in state_dict.items() if not HF_IGNORED.match(key)}


def hf_to_native(state_dict: dict) -> dict:
    """Renames a Hugging Face state dict to ours. A tied checkpoint may omit lm_head.weight; the
    native dict then gets output.weight = tok_embeddings.weight, as a tied model's state_dict has."""
    out = _rename(state_dict, HF_TO_NATIVE)
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def native_to_hf(state_dict: dict) -> dict:
    """Renames our state dict to Hugging Face's (lm_head.weight is kept even when tied)."""
    return _rename(state_dict, NATIVE_TO_HF)


def _rope(hf_config: dict) -> tuple[float, "dict | None"]:
    """(theta, llama3 scaling) from either transformers 5's rope_parameters or 4's rope_theta/rope_scaling."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), {key: rope[key] for key in LLAMA3_KEYS}
    raise UsageError(f"RoPE type {kind!r} is not supported (only default and llama3)")


def _biases(hf_config: dict, family: str) -> tuple[bool, bool]:
    """(qkv_bias, linear_bias). Qwen2 hard-codes q/k/v biases; llama's attention_bias covers o_proj
    too and mlp_bias the MLP, so they must agree to fit our two switches; Qwen3's covers q/k/v/o only."""
    attn, mlp = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
    if family == "qwen2":
        return True, False
    if attn != mlp:
        raise UsageError(f"{family}: attention_bias={attn} with mlp_bias={mlp} has no native equivalent")
    return attn, mlp


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
    family = hf_config.get("model_type")
    if family not in ARCHITECTURES:
        raise UsageError(f"model_type {family!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    act = hf_config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UsageError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    heads = hf_config["num_attention_heads"]
    theta, scaling = _rope(hf_config)
    qkv_bias, linear_bias = _biases(hf_config, family)
    # Full causal attention equals sliding-window attention up to the window, so cap the length there.
    max_seq_len = hf_config["max_position_embeddings"]
    if hf_config.get("sliding_window") and hf_config.get("use_sliding_window", True):
        max_seq_len = min(max_seq_len, hf_config["sliding_window"])
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        mlp=ACTIVATIONS[act],
        norm="rmsnorm",
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        qk_norm=family == "qwen3",
        qkv_bias=qkv_bias,
        linear_bias=linear_bias,
        tie_embeddings=hf_config.get("tie_word_embeddings", False),
        init_std=hf_config.get("initializer_range", 0.02),
    )


def hf_config_from_model_config(cfg: ModelConfig, family: str) -> dict:
    """The inverse of model_config_from_hf, in transformers 4's config.json layout (5 reads it too).

    Raises UsageError when `family` cannot express `cfg` (a layernorm, a softcap, QK-norm outside
    qwen3, ...): the result is read back and every field must survive.
    """
    if family not in ARCHITECTURES:
        raise UsageError(f"family {family!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    out = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": {mlp: act for act, mlp in ACTIVATIONS.items()}.get(cfg.mlp, cfg.mlp),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {"rope_type": "llama3", **cfg.rope_scaling},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.linear_bias)
    elif family == "qwen3":
        out.update(attention_bias=cfg.qkv_bias)
    elif family == "mistral":
        out.update(sliding_window=None)
    try:
        back = dataclasses.asdict(model_config_from_hf(out))
    except UsageError as e:
        raise UsageError(f"{family} cannot express this model: {e}") from None
    back["scaled_init"] = cfg.scaled_init  # an init choice Hugging Face does not record
    for key, value in dataclasses.asdict(cfg).items():
        if back[key] != value:
            raise UsageError(f"{family} cannot express model.{key}={value!r} (it would read back as {back[key]!r})")
    return out


# Rewritten by hf_config_from_model_config in transformers 4's layout, so dropped from a carried-over
# config: transformers 5 writes `rope_parameters` and `dtype`, which would otherwise contradict ours.
REWRITTEN_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype")


def infer_family(cfg: ModelConfig) -> str:
    """The plainest family that expresses `cfg`: QK-norm needs qwen3, q/k/v bias alone qwen2."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.linear_bias:
        return "qwen2"
    return "llama"


def export_hf_config(cfg: ModelConfig, dtype: str, base: "dict | None" = None, family: "str | None" = None) -> dict:
    """config.json for `cfg`. `base` is the source model's own config.json when known (from a Hugging Face
    input or carried beside a converted checkpoint): its other fields (token ids, ...) are kept.
    The family is `family`, else base's, else the plainest that fits."""
    base = {k: v for k, v in (base or {}).items() if k not in REWRITTEN_KEYS}
    family = family or base.get("model_type") or infer_family(cfg)
    return {**base, **hf_config_from_model_config(cfg, family), "torch_dtype": dtype}
