"""Pieces most family tables share: the Llama-style keys and tensor names, RoPE parameters, activations,
sliding-window layer patterns. A family table takes these and states only how it differs."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from megatron_llm.checkpoint.families.table import Derived, Fixed, Key
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ROPE_SCALING_KEYS, ModelConfig

# Hugging Face activation names -> our MLP kind, for a gated and a plain MLP. Export writes the first name.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
                     "gelu_new": "geglu_tanh", "relu": "reglu"}
PLAIN_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "relu": "relu", "relu2": "relu2", "silu": "silu"}


def activation(hf_key: str, table: dict, default=None) -> Key:
    """hidden_act (or the family's name for it) <-> model.mlp through one of the tables above."""
    inverse = {}
    for name, ours in table.items():
        inverse.setdefault(ours, name)

    def read(name: str) -> str:
        if name not in table:
            raise UsageError(f"config.json {hf_key} {name!r} is not supported here; supported: {', '.join(table)}")
        return table[name]

    def write(mlp: str) -> str:
        return inverse.get(mlp, f"<no {hf_key} for model.mlp {mlp}>")

    return Key(hf_key, "mlp", read=read, write=write, **({} if default is None else {"default": default}))


def _rope_block(params: dict, hf: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling, partial rotary fraction) from one rope_parameters dict (or transformers 4's keys)."""
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "proportional":  # its fraction picks frequencies over the whole head: a part of the scaling
        fraction = 1.0
    if kind == "default":
        return float(theta), None, float(fraction)
    if kind not in ROPE_SCALING_KEYS:
        raise UsageError(f"config.json RoPE type {kind!r} is not supported; supported: default, {', '.join(ROPE_SCALING_KEYS)}")
    needed, optional = ROPE_SCALING_KEYS[kind]
    scaling = {"rope_type": kind, **{k: params[k] for k in needed | optional if params.get(k) is not None}}
    if "original_max_position_embeddings" in needed and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]  # Phi-3 keeps it outside
    return float(theta), scaling, float(fraction)


def _read_rope(hf: dict) -> dict:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "full_attention" in params:  # Gemma3: one block per layer type; the sliding layers' base is local
        theta, scaling, fraction = _rope_block(params["full_attention"], hf)
        local, local_scaling, _ = _rope_block(params["sliding_attention"], hf) if "sliding_attention" in params else (None,) * 3
        if local_scaling is not None:
            raise UsageError("config.json scales the sliding layers' RoPE too (rope_parameters.sliding_attention); "
                             "only the full layers' scaling is supported")
        return dict(rope_theta=theta, rope_scaling=scaling, rope_fraction=fraction, rope_local_theta=local)
    theta, scaling, fraction = _rope_block(params, hf)
    return dict(rope_theta=theta, rope_scaling=scaling, rope_fraction=fraction)


def _rope_params(cfg: ModelConfig, theta: float, scaling: dict | None) -> dict:
    out = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    if cfg.rope_fraction != 1.0:
        out["partial_rotary_factor"] = cfg.rope_fraction
    return out


def _write_rope(cfg: ModelConfig) -> dict:
    if cfg.rope_local_theta is not None:
        return {"rope_parameters": {"full_attention": _rope_params(cfg, cfg.rope_theta, cfg.rope_scaling),
                                    "sliding_attention": _rope_params(cfg, cfg.rope_local_theta, None)}}
    return {"rope_parameters": _rope_params(cfg, cfg.rope_theta, cfg.rope_scaling)}


ROPE = Derived(_read_rope, _write_rope)  # transformers 5's rope_parameters; 4's rope_theta/rope_scaling read too


def partial_rope(default: float) -> Derived:
    """ROPE for a family whose config class fills partial_rotary_factor with `default` when config.json
    omits it (GLM, Nemotron: 0.5), so it is always written."""

    def read(hf: dict) -> dict:
        return _read_rope({**hf, "partial_rotary_factor": hf.get("partial_rotary_factor") or default})

    def write(cfg: ModelConfig) -> dict:
        return {"rope_parameters": {**_rope_params(cfg, cfg.rope_theta, cfg.rope_scaling), "partial_rotary_factor": cfg.rope_fraction}}

    return Derived(read, write)


def _read_layers(hf: dict) -> dict:
    """Sliding windows per layer: transformers 5's layer_types, or a window on every layer (Mistral), or
    Qwen2's use_sliding_window flag."""
    window = hf.get("sliding_window")
    if not window or hf.get("use_sliding_window") is False:
        return dict(sliding_window=None, layer_types=None)
    types = hf.get("layer_types")
    if types is None:
        return dict(sliding_window=window, layer_types=None)
    ours = ["sliding" if t == "sliding_attention" else "full" for t in types]
    if "sliding" not in ours:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=None if set(ours) == {"sliding"} else ours)


def _write_layers(cfg: ModelConfig) -> dict:
    """The plainest form: no window, a window on every layer, or layer_types only for a mix (transformers
    takes a Mistral config that carries layer_types for a Ministral one)."""
    if not cfg.sliding_window:
        return {"sliding_window": None}
    out = {"sliding_window": cfg.sliding_window, "use_sliding_window": True}
    if cfg.layer_types is not None and "full" in cfg.layer_types:
        out["layer_types"] = [f"{kind}_attention" for kind in cfg.layer_types]
    return out


LAYERS = Derived(_read_layers, _write_layers)


def write_every_layer_type(cfg: ModelConfig) -> dict:
    """Every layer's type, always: left out, transformers would apply its pattern (EXAONE 4, OLMo 3, Cohere2)."""
    kinds = ["sliding_attention" if cfg.layer(i).window else "full_attention" for i in range(cfg.num_layers)]
    return {"sliding_window": cfg.sliding_window, "layer_types": kinds}


def layers_defaulting(window: int, is_full: Callable[[int], bool]) -> Derived:
    """LAYERS for a config class that fills a missing sliding_window and layer_types with its own: `window`,
    and layer i full where is_full(i) (OLMo 3, CWM)."""

    def read(hf: dict) -> dict:
        types = hf.get("layer_types") or [
            "full_attention" if is_full(i) else "sliding_attention" for i in range(hf["num_hidden_layers"])]
        return LAYERS.read({**hf, "sliding_window": hf["sliding_window"] if "sliding_window" in hf else window,
                            "layer_types": types})

    return Derived(read, write_every_layer_type)


def rope_defaulting(default: dict) -> Derived:
    """ROPE for a config class that fills a missing rope_parameters with its own `default` (Apertus, CWM)."""
    return Derived(lambda hf: ROPE.read({**hf, "rope_parameters": hf.get("rope_parameters") or default}), ROPE.write)


def _read_head_dim(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    return dict(head_dim=hf.get("head_dim") or hf["hidden_size"] // heads)


HEAD_DIM = Derived(_read_head_dim, lambda cfg: {"head_dim": cfg.head_dim})
KV_HEADS = Derived(lambda hf: dict(num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                   lambda cfg: {"num_key_value_heads": cfg.num_kv_heads})

# The keys nearly every family names the same way.
SHAPE = (
    Key("vocab_size", "vocab_size"),
    Key("hidden_size", "hidden_size"),
    Key("num_hidden_layers", "num_layers"),
    Key("num_attention_heads", "num_heads"),
    KV_HEADS,
    HEAD_DIM,
    Key("intermediate_size", "ffn_hidden_size"),
    Key("max_position_embeddings", "max_seq_len"),
    Key("tie_word_embeddings", "tie_embeddings", default=False),
)


def shape_defaulting(head_dim: int, kv_heads: int) -> tuple:
    """SHAPE for a config class that fills a missing head_dim and num_key_value_heads with constants of
    its own (GLM, Helium, Seed-OSS) rather than from the other keys."""
    return (*(e for e in SHAPE if e not in (HEAD_DIM, KV_HEADS)), Key("head_dim", "head_dim", default=head_dim),
            Key("num_key_value_heads", "num_kv_heads", default=kv_heads))


LLAMA_CONFIG = (
    *SHAPE,
    activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
    Key("rms_norm_eps", "norm_eps", default=1e-6),
    ROPE,
    Key("attention_bias", "qkv_bias", default=False),
    Key("attention_bias", "out_bias", default=False),
    Key("mlp_bias", "mlp_bias", default=False),
)

LLAMA_TENSORS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
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
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "layers.{i}.feed_forward.w1.bias",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.feed_forward.w3.bias",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.down_proj.bias": "layers.{i}.feed_forward.w2.bias",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def without_mlp(tensors: dict) -> dict:
    """A tensor table minus its MLP's entries: a mixture-of-experts family puts its router and experts there."""
    return {k: v for k, v in tensors.items() if ".mlp." not in k}


def without(config: tuple, *ours: str) -> tuple:
    """A config table minus the entries that set the given fields (a family that fixes them instead)."""
    return tuple(e for e in config if not (isinstance(e, (Key, Fixed)) and e.ours in ours))


def also(config: tuple, **older: str) -> tuple:
    """A config table whose keys are also read under older names (hf key=older name), as a family's
    published config.json spells them (EXAONE 3's num_layers, InternLM3's qkv_bias); its Derived entries read
    a config whose missing keys are filled from their older names (Sarvam's num_shared_experts)."""

    def respelled(hf: dict) -> dict:
        return {**hf, **{key: hf[old] for key, old in older.items() if hf.get(key) is None and hf.get(old) is not None}}

    def spelled(e):
        if isinstance(e, Key) and e.hf in older:
            return dataclasses.replace(e, also=(*e.also, older[e.hf]))
        return Derived(lambda hf, read=e.read: read(respelled(hf)), e.write) if isinstance(e, Derived) else e

    return tuple(spelled(e) for e in config)


def scale_key(hf_key: str, ours: str) -> Key:
    """A key stored as a scalar s whose effect we hold as s ** -0.5 (Gemma's query_pre_attn_scalar)."""
    def write(value):
        scalar = None if value is None else round(value**-2, 6)
        return int(scalar) if scalar is not None and scalar.is_integer() else scalar  # transformers types it int

    return Key(hf_key, ours, default=None, read=lambda v: None if v is None else v**-0.5, write=write)


SQRT_HIDDEN_EMBEDDING = Derived(lambda hf: dict(embedding_multiplier=math.sqrt(hf["hidden_size"])), lambda cfg: {})
