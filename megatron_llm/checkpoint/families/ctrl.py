"""CTRL (Salesforce's conditional transformer): a pre-norm decoder with ReLU, every bias, embeddings scaled by
sqrt(n_embd) and Vaswani's sinusoids laid out as the sines then the cosines; its head is tied to the embedding and
has a bias of its own."""

from __future__ import annotations

import math

from megatron_llm.checkpoint.families.gpt import ALL_BIASES, LAYERNORM, modules
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key
from megatron_llm.errors import UsageError

# transformers builds the blocks' LayerNorms at 1e-6 whatever layer_norm_epsilon says (it sets the final one alone)
BLOCK_EPS = 1e-6


def _read_eps(hf: dict) -> dict:
    if hf.get("layer_norm_epsilon", BLOCK_EPS) != BLOCK_EPS:
        raise UsageError(f"config.json layer_norm_epsilon={hf['layer_norm_epsilon']!r} is not supported: CTRL's blocks "
                         f"normalise at {BLOCK_EPS} whatever it says, and the menu has one norm_eps for every norm")
    return dict(norm_eps=BLOCK_EPS)


def _scale(hf: dict) -> dict:
    return dict(embedding_multiplier=math.sqrt(hf["n_embd"]))


def _write_scale(cfg) -> dict:
    """CTRL always scales by sqrt(n_embd): another multiplier has no key to go to."""
    if cfg.embedding_multiplier != math.sqrt(cfg.hidden_size):
        raise UsageError(f"model.embedding_multiplier={cfg.embedding_multiplier} cannot be written as ctrl: CTRL scales "
                         f"its embeddings by sqrt(hidden_size) = {math.sqrt(cfg.hidden_size)}")
    return {}


CTRL = Family(
    "ctrl", "CTRLLMHeadModel",
    (Key("vocab_size", "vocab_size"), Key("n_embd", "hidden_size"), Key("n_layer", "num_layers"),
     Key("n_head", "num_heads"), Key("dff", "ffn_hidden_size"), Key("n_positions", "max_seq_len", default=256),
     Key("tie_word_embeddings", "tie_embeddings", default=True), Fixed("mlp", "relu"), LAYERNORM,
     Derived(_read_eps, lambda cfg: {"layer_norm_epsilon": cfg.norm_eps}), Derived(_scale, _write_scale), *ALL_BIASES,
     Fixed("output_bias", True), Fixed("position", "sinusoidal"), Fixed("sinusoid", "vaswani_blocked")),
    modules({
        "transformer.w": "tok_embeddings",
        **{f"transformer.h.{{i}}.multi_head_attention.W{p}": f"layers.{{i}}.attention.w{p}" for p in "qkv"},
        "transformer.h.{i}.multi_head_attention.dense": "layers.{i}.attention.wo",
        "transformer.h.{i}.layernorm1": "layers.{i}.attention_norm",
        "transformer.h.{i}.ffn.0": "layers.{i}.feed_forward.w1",
        "transformer.h.{i}.ffn.2": "layers.{i}.feed_forward.w2",
        "transformer.h.{i}.layernorm2": "layers.{i}.ffn_norm",
        "transformer.layernorm": "norm",
        "lm_head": "output",
    }),
)

FAMILIES = (CTRL,)
