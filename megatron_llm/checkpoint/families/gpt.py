"""The GPT lineage with names of its own: GPT (OpenAI's), GPT-2, GPT-J, GPT-NeoX, BLOOM, Falcon,
GPT-BigCode, GPT-Neo and MPT. All use LayerNorm and a plain MLP; their tables are written by module
(`modules`: each module's weight and bias are ours of the same module), and their fused q/k/v tensors in
the layouts table.Fused names."""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron_llm.checkpoint.families.common import (
    LAYERS,
    PLAIN_ACTIVATIONS,
    ROPE,
    SHAPE,
    activation,
    partial_rope,
    without,
)
from megatron_llm.checkpoint.families.table import (
    Derived,
    Family,
    Fixed,
    Fused,
    Key,
    Mapped,
    TensorEntry,
    Transposed,
    When,
    get_family_value,
)
from megatron_llm.errors import UsageError

QKV = ("layers.{i}.attention.wq", "layers.{i}.attention.wk", "layers.{i}.attention.wv")


def modules(table: dict) -> dict[str, TensorEntry]:
    """A tensor table from module names ('{i}': the layer): a Hugging Face module's weight and bias are ours
    of the module it maps to (an entry for a tensor our model lacks is never asked for). Fused and
    Transposed entries name modules too; Conv1D's transposition applies to the weight alone (table.py)."""

    def tensor(entry, kind: str) -> TensorEntry:
        if isinstance(entry, Fused):
            return dataclasses.replace(entry, parts=tuple(f"{part}.{kind}" for part in entry.parts))
        if isinstance(entry, Transposed):
            return Transposed(f"{entry.ours}.{kind}")
        return f"{entry}.{kind}"

    return {f"{hf}.{kind}": tensor(ours, kind) for hf, ours in table.items() for kind in ("weight", "bias")}


def refused(key: str, why: str) -> Derived:
    """A config key whose true value the menu cannot express: refused by name on read, written false."""

    def read(hf: dict) -> dict:
        if hf.get(key):
            raise UsageError(f"config.json {key}={hf[key]!r} is not supported: {why}")
        return {}

    return Derived(read, lambda cfg: {key: False})


def inner_size(key: str, *hidden: str) -> Derived:
    """The MLP width under `key`; 4 * the hidden size (under the first of `hidden` present) where it is null."""
    return Derived(lambda hf: dict(ffn_hidden_size=hf.get(key) or 4 * get_family_value(hf, *hidden)),
                   lambda cfg: {key: cfg.ffn_hidden_size})


# SHAPE's plain keys: a config without key/value heads or a head width of its own. Both follow from
# hidden_size / num_attention_heads, and export refuses a model where they do not.
MHA_SHAPE = tuple(e for e in SHAPE if isinstance(e, Key))
# RoPE over whole heads from one table: these families' rotary reads no partial_rotary_factor.
WHOLE_ROPE = (ROPE, Fixed("rope_fraction", 1.0), Fixed("rope_local_theta", None))
LAYERNORM = Fixed("norm", "layernorm")
ALL_BIASES = (Fixed("qkv_bias", True), Fixed("linear_bias", True))

# GPT-2 and GPT-J: their own key names, 4 * hidden for a null n_inner.
GPT2_CONFIG = (
    Key("vocab_size", "vocab_size"), Key("n_embd", "hidden_size"), Key("n_layer", "num_layers"),
    Key("n_head", "num_heads"), Key("n_positions", "max_seq_len"), inner_size("n_inner", "n_embd"),
    activation("activation_function", PLAIN_ACTIVATIONS, default="gelu_new"),
    Key("layer_norm_epsilon", "norm_eps", default=1e-5), LAYERNORM,
)

# GPT-2: learned absolute positions; Conv1D layers store weights [in, out]; c_attn holds q, k, v in turn.
# reorder_and_upcast_attn is read as the same model: it changes where the attention scale is applied and
# the precision of the scores, not the function.
GPT2 = Family(
    "gpt2", "GPT2LMHeadModel",
    (*GPT2_CONFIG, Key("tie_word_embeddings", "tie_embeddings", default=True), Fixed("position", "learned"), *ALL_BIASES,
     # scale_attn_weights false: scores are q.k unscaled
     Key("scale_attn_weights", "attention_scale", default=True, read=lambda v: None if v else 1.0,
         write=lambda scale: scale is None),
     refused("scale_attn_by_inverse_layer_idx", "a query scale per layer (1 / (layer + 1)) is not in the menu"),
     refused("add_cross_attention", "cross-attention to an encoder is not in the menu")),
    modules({
        "transformer.wte": "tok_embeddings",
        "transformer.wpe": "pos_embeddings",
        "transformer.h.{i}.ln_1": "layers.{i}.attention_norm",
        "transformer.h.{i}.attn.c_attn": Fused(QKV, transpose=True),
        "transformer.h.{i}.attn.c_proj": Transposed("layers.{i}.attention.wo"),
        "transformer.h.{i}.ln_2": "layers.{i}.ffn_norm",
        "transformer.h.{i}.mlp.c_fc": Transposed("layers.{i}.feed_forward.w1"),
        "transformer.h.{i}.mlp.c_proj": Transposed("layers.{i}.feed_forward.w2"),
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
)


def _read_rotary_dim(hf: dict) -> dict:
    head_dim = hf["n_embd"] // hf["n_head"]
    return dict(rope_fraction=(hf.get("rotary_dim") or head_dim) / head_dim)


# GPT-J: attention and MLP in parallel from one norm; the first rotary_dim dimensions of each head rotate
# in interleaved pairs; biases on the MLP and the head only.
GPTJ = Family(
    "gptj", "GPTJForCausalLM",
    (*GPT2_CONFIG, Key("tie_word_embeddings", "tie_embeddings", default=False),
     Derived(_read_rotary_dim, lambda cfg: {"rotary_dim": cfg.rope_dim}), Fixed("rope_interleaved", True),
     Fixed("parallel_residual", True), Fixed("mlp_bias", True), Fixed("output_bias", True)),
    modules({
        "transformer.wte": "tok_embeddings",
        "transformer.h.{i}.ln_1": "layers.{i}.attention_norm",
        "transformer.h.{i}.attn.q_proj": "layers.{i}.attention.wq",
        "transformer.h.{i}.attn.k_proj": "layers.{i}.attention.wk",
        "transformer.h.{i}.attn.v_proj": "layers.{i}.attention.wv",
        "transformer.h.{i}.attn.out_proj": "layers.{i}.attention.wo",
        "transformer.h.{i}.mlp.fc_in": "layers.{i}.feed_forward.w1",
        "transformer.h.{i}.mlp.fc_out": "layers.{i}.feed_forward.w2",
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
)


def megatron_deepspeed_layer(layer: str, attention: str, qkv_layout: str) -> dict:
    """The layer's module names GPT-NeoX, BLOOM and Falcon keep from Megatron-DeepSpeed."""
    return {
        f"{layer}.input_layernorm": "layers.{i}.attention_norm",
        f"{layer}.{attention}.query_key_value": Fused(QKV, qkv_layout),
        f"{layer}.{attention}.dense": "layers.{i}.attention.wo",
        f"{layer}.post_attention_layernorm": "layers.{i}.ffn_norm",
        f"{layer}.mlp.dense_h_to_4h": "layers.{i}.feed_forward.w1",
        f"{layer}.mlp.dense_4h_to_h": "layers.{i}.feed_forward.w2",
    }


# GPT-NeoX (Pythia): parallel attention and MLP with a norm each (use_parallel_residual false: sequential
# pre-norm), partial rotate-half RoPE (rotary_pct, 0.25 by default), q/k/v fused per head.
NEOX_ROPE = partial_rope(0.25)


def _read_neox_rope(hf: dict) -> dict:
    """transformers 4 named the fraction rotary_pct and the base rotary_emb_base."""
    old = {"partial_rotary_factor": hf.get("rotary_pct"), "rope_theta": hf.get("rotary_emb_base")}
    return NEOX_ROPE.read({**{k: v for k, v in old.items() if v is not None}, **hf})


GPT_NEOX = Family(
    "gpt_neox", "GPTNeoXForCausalLM",
    (*MHA_SHAPE, activation("hidden_act", PLAIN_ACTIVATIONS, default="gelu"),
     Key("layer_norm_eps", "norm_eps", default=1e-5), LAYERNORM, Derived(_read_neox_rope, NEOX_ROPE.write),
     Derived(lambda hf: dict(parallel_residual=hf.get("use_parallel_residual", True),
                             parallel_shared_norm=not hf.get("use_parallel_residual", True)),
             lambda cfg: {"use_parallel_residual": cfg.parallel_residual}),
     Key("attention_bias", "qkv_bias", default=True), Key("attention_bias", "out_bias", default=True),
     Fixed("mlp_bias", True)),
    modules({
        "gpt_neox.embed_in": "tok_embeddings",
        **megatron_deepspeed_layer("gpt_neox.layers.{i}", "attention", "heads"),
        "gpt_neox.final_layer_norm": "norm",
        "embed_out": "output",
    }),
)

# BLOOM: ALiBi, a norm on the embeddings, the MLP 4 * hidden with BLOOM's tanh GELU, every bias, q/k/v
# fused per head. ALiBi has no position table: the trained length is kept under seq_length, which
# transformers ignores.
BLOOM = Family(
    "bloom", "BloomForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size", also=("n_embed",)), Key("n_layer", "num_layers"),
     Key("n_head", "num_heads"), Key("seq_length", "max_seq_len", default=2048),
     Derived(lambda hf: dict(ffn_hidden_size=4 * get_family_value(hf, "hidden_size", "n_embed")), lambda cfg: {}),
     Key("layer_norm_epsilon", "norm_eps", default=1e-5), Key("tie_word_embeddings", "tie_embeddings", default=True),
     LAYERNORM, Fixed("mlp", "gelu_tanh"), Fixed("position", "alibi"), Fixed("embedding_norm", True), *ALL_BIASES,
     refused("apply_residual_connection_post_layernorm", "a residual taken after the norm is not in the menu")),
    modules({
        "transformer.word_embeddings": "tok_embeddings",
        "transformer.word_embeddings_layernorm": "embedding_norm",
        **megatron_deepspeed_layer("transformer.h.{i}", "self_attention", "heads"),
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
)


def _read_falcon_decoder(hf: dict) -> dict:
    """Falcon's two decoders: the new one is parallel with a norm per sublayer (or one, when
    num_ln_in_parallel_attn is 1) and grouped key/value heads; the old one is parallel with one norm
    (parallel_attn) or sequential, with one key/value head (multi_query) or one per query head."""
    heads = hf["num_attention_heads"]
    if hf.get("new_decoder_architecture"):
        return dict(parallel_residual=True, parallel_shared_norm=hf.get("num_ln_in_parallel_attn") == 1,
                    num_kv_heads=hf.get("num_kv_heads") or heads)
    return dict(parallel_residual=hf.get("parallel_attn") is not False, parallel_shared_norm=True,
                num_kv_heads=heads if hf.get("multi_query") is False else 1)


def _write_falcon_decoder(cfg) -> dict:
    """The old decoder where it fits (Falcon-7B's layout), else the new one; what neither fits reads back
    differently and is refused."""
    grouped = cfg.num_kv_heads not in (1, cfg.num_heads)
    if cfg.parallel_residual and (grouped or not cfg.parallel_shared_norm):
        return dict(new_decoder_architecture=True, parallel_attn=True, num_kv_heads=cfg.num_kv_heads,
                    num_ln_in_parallel_attn=1 if cfg.parallel_shared_norm else 2)
    return dict(new_decoder_architecture=False, parallel_attn=cfg.parallel_residual,
                multi_query=cfg.num_kv_heads == 1, num_kv_heads=cfg.num_kv_heads)


# Falcon: q/k/v fused in key/value groups [q of the group; k; v] in both decoders: multi-query (one group:
# all q, then k, v) and one head per group (per head q, k, v) are that layout's two ends. The new
# decoder's separate norms are ln_attn and ln_mlp.
FALCON = Family(
    "falcon", "FalconForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size", also=("n_embed",)),
     Key("num_hidden_layers", "num_layers"), Key("num_attention_heads", "num_heads"),
     Derived(_read_falcon_decoder, _write_falcon_decoder), inner_size("ffn_hidden_size", "hidden_size", "n_embed"),
     Key("max_position_embeddings", "max_seq_len", default=2048), activation("activation", PLAIN_ACTIVATIONS, default="gelu"),
     Key("layer_norm_epsilon", "norm_eps", default=1e-5), LAYERNORM, *WHOLE_ROPE,
     Key("tie_word_embeddings", "tie_embeddings", default=True),
     Key("bias", "qkv_bias", default=False), Key("bias", "out_bias", default=False), Key("bias", "mlp_bias", default=False),
     refused("alibi", "Falcon's ALiBi (bf16 slopes added before the 1/sqrt(head_dim) scale) is not the menu's")),
    modules({
        "transformer.word_embeddings": "tok_embeddings",
        **megatron_deepspeed_layer("transformer.h.{i}", "self_attention", "groups"),
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
    variants=(When({"parallel_residual": True, "parallel_shared_norm": False},
                   modules({"transformer.h.{i}.ln_attn": "layers.{i}.attention_norm",
                            "transformer.h.{i}.ln_mlp": "layers.{i}.ffn_norm"})),),
)

# GPT-BigCode (StarCoder 1, SantaCoder): GPT-2 with nn.Linear layers and multi-query attention. c_attn is
# [q; k; v] in turn with one key/value head (multi_query), or per head [q_h; k_h; v_h] without it.
GPT_BIGCODE = Family(
    "gpt_bigcode", "GPTBigCodeForCausalLM",
    (*without(GPT2_CONFIG, "mlp"),
     activation("activation_function", {"gelu_pytorch_tanh": "gelu_tanh", **PLAIN_ACTIVATIONS}, default="gelu_pytorch_tanh"),
     Key("tie_word_embeddings", "tie_embeddings", default=True), Fixed("position", "learned"), *ALL_BIASES,
     Key("scale_attn_weights", "attention_scale", default=True, read=lambda v: None if v else 1.0,
         write=lambda scale: scale is None),
     Derived(lambda hf: dict(num_kv_heads=1 if hf.get("multi_query", True) else hf["n_head"]),
             lambda cfg: {"multi_query": cfg.num_kv_heads == 1}),
     refused("add_cross_attention", "cross-attention to an encoder is not in the menu")),
    modules({
        "transformer.wte": "tok_embeddings",
        "transformer.wpe": "pos_embeddings",
        "transformer.h.{i}.ln_1": "layers.{i}.attention_norm",
        "transformer.h.{i}.attn.c_attn": Fused(QKV, "heads"),
        "transformer.h.{i}.attn.c_proj": "layers.{i}.attention.wo",
        "transformer.h.{i}.ln_2": "layers.{i}.ffn_norm",
        "transformer.h.{i}.mlp.c_fc": "layers.{i}.feed_forward.w1",
        "transformer.h.{i}.mlp.c_proj": "layers.{i}.feed_forward.w2",
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
    variants=(When({"num_kv_heads": 1}, modules({"transformer.h.{i}.attn.c_attn": Fused(QKV)})),),
)



def _read_neo_layers(hf: dict) -> dict:
    """attention_types: [[pattern, repeats], ...] expanded as GPTNeoConfig does; local layers are windowed."""
    kinds = [kind for pattern, repeats in hf.get("attention_types") or [[["global", "local"], 12]]
             for _ in range(repeats) for kind in pattern]
    if len(kinds) != hf["num_layers"]:
        raise UsageError(f"config.json attention_types expand to {len(kinds)} layers, num_layers is {hf['num_layers']}")
    types = ["sliding_attention" if kind == "local" else "full_attention" for kind in kinds]
    return LAYERS.read({"sliding_window": hf.get("window_size", 256), "layer_types": types})


def _write_neo_layers(cfg) -> dict:
    kinds = ["local" if cfg.layer(i).window else "global" for i in range(cfg.num_layers)]
    return {"window_size": cfg.sliding_window or 256, "attention_types": [[kinds, 1]]}


# GPT-Neo: learned positions, global and local (windowed) layers, unscaled scores (no 1/sqrt(d)), no q/k/v
# biases.
GPT_NEO = Family(
    "gpt_neo", "GPTNeoForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size"), Key("num_layers", "num_layers"),
     Key("num_heads", "num_heads"), Key("max_position_embeddings", "max_seq_len", default=2048),
     inner_size("intermediate_size", "hidden_size"), activation("activation_function", PLAIN_ACTIVATIONS, default="gelu_new"),
     Key("layer_norm_epsilon", "norm_eps", default=1e-5), LAYERNORM, Key("tie_word_embeddings", "tie_embeddings", default=True),
     Fixed("position", "learned"), Fixed("attention_scale", 1.0), Fixed("qkv_bias", False), Fixed("out_bias", True),
     Fixed("mlp_bias", True), Derived(_read_neo_layers, _write_neo_layers)),
    modules({
        "transformer.wte": "tok_embeddings",
        "transformer.wpe": "pos_embeddings",
        "transformer.h.{i}.ln_1": "layers.{i}.attention_norm",
        "transformer.h.{i}.attn.attention.q_proj": "layers.{i}.attention.wq",
        "transformer.h.{i}.attn.attention.k_proj": "layers.{i}.attention.wk",
        "transformer.h.{i}.attn.attention.v_proj": "layers.{i}.attention.wv",
        "transformer.h.{i}.attn.attention.out_proj": "layers.{i}.attention.wo",
        "transformer.h.{i}.ln_2": "layers.{i}.ffn_norm",
        "transformer.h.{i}.mlp.c_fc": "layers.{i}.feed_forward.w1",
        "transformer.h.{i}.mlp.c_proj": "layers.{i}.feed_forward.w2",
        "transformer.ln_f": "norm",
        "lm_head": "output",
    }),
)



# GPT (OpenAI's first): GPT-2's Conv1D layers with the norm after each residual add (post-norm, no final norm),
# learned positions, an MLP 4 x wide; its "gelu" is the tanh approximation.
OPENAI_GPT = Family(
    "openai-gpt", "OpenAIGPTLMHeadModel",
    (Key("vocab_size", "vocab_size"), Key("n_embd", "hidden_size"), Key("n_layer", "num_layers"),
     Key("n_head", "num_heads"), Key("n_positions", "max_seq_len"),
     Derived(lambda hf: dict(ffn_hidden_size=4 * hf["n_embd"]), lambda cfg: {}),
     activation("afn", {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}, default="gelu"),
     Key("layer_norm_epsilon", "norm_eps", default=1e-5), LAYERNORM, Fixed("norm_placement", "post"),
     Key("tie_word_embeddings", "tie_embeddings", default=True), Fixed("position", "learned"), *ALL_BIASES),
    modules({
        "transformer.tokens_embed": "tok_embeddings",
        "transformer.positions_embed": "pos_embeddings",
        "transformer.h.{i}.attn.c_attn": Fused(QKV, transpose=True),
        "transformer.h.{i}.attn.c_proj": Transposed("layers.{i}.attention.wo"),
        "transformer.h.{i}.ln_1": "layers.{i}.attention_norm",
        "transformer.h.{i}.mlp.c_fc": Transposed("layers.{i}.feed_forward.w1"),
        "transformer.h.{i}.mlp.c_proj": Transposed("layers.{i}.feed_forward.w2"),
        "transformer.h.{i}.ln_2": "layers.{i}.ffn_norm",
        "lm_head": "output",
    }),
)


def _read_mpt_attention(hf: dict) -> dict:
    """attn_config as transformers' MPT runs it: ALiBi (its slopes, alibi_bias_max 8, are the standard ones),
    an optional softmax_scale and q/k/v clipping; what it does not run is refused."""
    attn = hf.get("attn_config") or {}
    if attn.get("alibi") is False or attn.get("alibi_bias_max", 8) != 8:
        raise UsageError("config.json attn_config: only ALiBi with alibi_bias_max 8 is supported (transformers' MPT)")
    for key in ("qk_ln", "prefix_lm", "attn_uses_sequence_id"):
        if attn.get(key):
            raise UsageError(f"config.json attn_config.{key}=true is not supported: transformers' MPT does not run it")
    if hf.get("logit_scale") is not None:
        raise UsageError("config.json logit_scale is not supported: transformers' MPT does not apply it")
    return dict(attention_scale=attn.get("softmax_scale"), qkv_clip=attn.get("clip_qkv"))


def _write_mpt_attention(cfg) -> dict:
    return {"attn_config": {"alibi": True, "alibi_bias_max": 8, "softmax_scale": cfg.attention_scale, "clip_qkv": cfg.qkv_clip}}


# MPT: ALiBi, LayerNorms without biases, no linear biases, q/k/v fused [q; k; v], a GELU MLP 4 x wide (transformers
# builds it so whatever expansion_ratio says), tied embeddings.
MPT = Family(
    "mpt", "MptForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("d_model", "hidden_size"), Key("n_layers", "num_layers"),
     Key("n_heads", "num_heads"), Key("max_seq_len", "max_seq_len", default=2048),
     Derived(lambda hf: dict(ffn_hidden_size=4 * hf["d_model"]), lambda cfg: {"expansion_ratio": 4}),
     Key("layer_norm_epsilon", "norm_eps", default=1e-5), LAYERNORM, Fixed("norm_bias", False), Fixed("mlp", "gelu"),
     Fixed("position", "alibi"), Key("tie_word_embeddings", "tie_embeddings", default=True),
     Derived(_read_mpt_attention, _write_mpt_attention)),
    modules({
        "transformer.wte": "tok_embeddings",
        "transformer.blocks.{i}.norm_1": "layers.{i}.attention_norm",
        "transformer.blocks.{i}.attn.Wqkv": Fused(QKV),
        "transformer.blocks.{i}.attn.out_proj": "layers.{i}.attention.wo",
        "transformer.blocks.{i}.norm_2": "layers.{i}.ffn_norm",
        "transformer.blocks.{i}.ffn.up_proj": "layers.{i}.feed_forward.w1",
        "transformer.blocks.{i}.ffn.down_proj": "layers.{i}.feed_forward.w2",
        "transformer.norm_f": "norm",
        "lm_head": "output",
    }),
)



def fairseq_layer(layer: str) -> dict:
    """The layer's module names OPT, BioGPT and XGLM keep from fairseq's transformer decoder."""
    return {
        **{f"{layer}.self_attn.{p}_proj": f"layers.{{i}}.attention.w{p}" for p in "qkv"},
        f"{layer}.self_attn.out_proj": "layers.{i}.attention.wo",
        f"{layer}.self_attn_layer_norm": "layers.{i}.attention_norm",
        f"{layer}.fc1": "layers.{i}.feed_forward.w1",
        f"{layer}.fc2": "layers.{i}.feed_forward.w2",
        f"{layer}.final_layer_norm": "layers.{i}.ffn_norm",
    }


# fairseq's learned positions: row p + 2 for position p (two rows kept for its padding scheme); a tied head.
FAIRSEQ_POSITIONS = (Fixed("position", "learned"), Fixed("position_offset", 2))
FAIRSEQ_SHAPE = (*without(MHA_SHAPE, "ffn_hidden_size", "max_seq_len", "tie_embeddings"),
                 Key("tie_word_embeddings", "tie_embeddings", default=True))


def scale_embedding(hidden_key: str) -> Derived:
    """fairseq's scale_embedding: the token embeddings times sqrt(hidden size) (true by default), else 1; another
    multiplier reads back otherwise and is refused."""
    return Derived(lambda hf: dict(embedding_multiplier=math.sqrt(hf[hidden_key]) if hf.get("scale_embedding", True) else 1.0),
                   lambda cfg: {"scale_embedding": cfg.embedding_multiplier != 1.0})


def _read_opt_projection(hf: dict) -> dict:
    """OPT-350m embeds in word_embed_proj_dim and projects in and out of the hidden size (project_in, project_out)."""
    if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
        raise UsageError(f"config.json word_embed_proj_dim={hf['word_embed_proj_dim']} is not supported: embeddings "
                         f"narrower than hidden_size ({hf['hidden_size']}), projected in and out, are not in the menu")
    return {}


# OPT: fairseq's decoder with ReLU, every bias (enable_bias), LayerNorm before each sublayer and at the end
# (do_layer_norm_before) or after each residual add (the 350m), learned positions offset by 2, a tied head.
OPT = Family(
    "opt", "OPTForCausalLM",
    (*FAIRSEQ_SHAPE, Key("ffn_dim", "ffn_hidden_size"), Key("max_position_embeddings", "max_seq_len", default=2048),
     activation("activation_function", PLAIN_ACTIVATIONS, default="relu"), LAYERNORM, Fixed("norm_eps", 1e-5),
     Key("layer_norm_elementwise_affine", "norm_affine", default=True),
     Key("do_layer_norm_before", "norm_placement", default=True, read=lambda v: "pre" if v else "post",
         write=lambda placement: placement == "pre"),
     *(Key("enable_bias", ours, default=True) for ours in ("qkv_bias", "out_bias", "mlp_bias")), *FAIRSEQ_POSITIONS,
     Derived(_read_opt_projection, lambda cfg: {"word_embed_proj_dim": cfg.hidden_size}),
     refused("_remove_final_layer_norm", "pre-norm layers without a final norm are not in the menu")),
    modules({
        "model.decoder.embed_tokens": "tok_embeddings",
        "model.decoder.embed_positions": "pos_embeddings",
        **fairseq_layer("model.decoder.layers.{i}"),
        "model.decoder.final_layer_norm": "norm",
        "lm_head": "output",
    }),
)

# BioGPT: fairseq's pre-norm decoder with GELU, embeddings scaled by sqrt(hidden) (scale_embedding), learned
# positions offset by 2. Its LayerNorms are built with torch's default epsilon, whatever layer_norm_eps says.
BIOGPT = Family(
    "biogpt", "BioGptForCausalLM",
    (*FAIRSEQ_SHAPE, Key("intermediate_size", "ffn_hidden_size"),
     Key("max_position_embeddings", "max_seq_len", default=1024),
     activation("hidden_act", PLAIN_ACTIVATIONS, default="gelu"), LAYERNORM, Fixed("norm_eps", 1e-5),
     scale_embedding("hidden_size"), *ALL_BIASES, *FAIRSEQ_POSITIONS),
    modules({
        "biogpt.embed_tokens": "tok_embeddings",
        "biogpt.embed_positions": "pos_embeddings",
        **fairseq_layer("biogpt.layers.{i}"),
        "biogpt.layer_norm": "norm",
        "output_projection": "output",
    }),
)


# XGLM: fairseq's pre-norm decoder with GELU, every bias, embeddings scaled by sqrt(d_model), tensor2tensor's sinusoids
# read 2 rows on; LayerNorms at torch's default epsilon.
XGLM = Family(
    "xglm", "XGLMForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("d_model", "hidden_size"), Key("num_layers", "num_layers"),
     Key("attention_heads", "num_heads"), Key("ffn_dim", "ffn_hidden_size"),
     Key("max_position_embeddings", "max_seq_len", default=2048), Key("tie_word_embeddings", "tie_embeddings", default=True),
     activation("activation_function", PLAIN_ACTIVATIONS, default="gelu"), LAYERNORM, Fixed("norm_eps", 1e-5),
     scale_embedding("d_model"), *ALL_BIASES, Fixed("position", "sinusoidal"), Fixed("position_offset", 2),
     Fixed("sinusoid", "tensor2tensor"), refused("add_cross_attention", "cross-attention to an encoder is not in the menu")),
    modules({
        "model.embed_tokens": "tok_embeddings",
        **fairseq_layer("model.layers.{i}"),
        "model.layer_norm": "norm",
        "lm_head": "output",
    }),
)

CODEGEN_SHARDS = 4  # CodeGen was trained on 4 model-parallel shards; transformers fixes mp_num = 4 whatever the size


def _codegen_qkv(parts: list[torch.Tensor]) -> torch.Tensor:
    """wq, wk, wv [hidden, in] each -> qkv_proj [3 hidden, in]: per shard m its rows of q, then v, then k."""
    q, k, v = (p.view(CODEGEN_SHARDS, -1, p.shape[-1]) for p in parts)  # [4, hidden / 4, in]
    return torch.cat((q, v, k), dim=1).reshape(-1, parts[0].shape[-1])


def _codegen_split(fused: torch.Tensor) -> list[torch.Tensor]:
    q, v, k = fused.view(CODEGEN_SHARDS, 3, -1, fused.shape[-1]).unbind(1)  # [4, hidden / 4, in] each
    return [t.reshape(-1, fused.shape[-1]) for t in (q, k, v)]


# CodeGen: GPT-J (its config, parallel block, interleaved partial RoPE, MLP and head biases) with q/k/v in one
# qkv_proj laid out by model-parallel shard: [q_m; v_m; k_m] for each of the 4 shards m.
CODEGEN = Family(
    "codegen", "CodeGenForCausalLM", GPTJ.config,
    {**{k: v for k, v in GPTJ.tensors.items() if not any(f".{p}_proj." in k for p in "qkv")},
     "transformer.h.{i}.attn.qkv_proj.weight": Mapped(tuple(f"{w}.weight" for w in QKV), _codegen_qkv, _codegen_split)},
)

FAMILIES = (GPT2, GPTJ, GPT_NEOX, BLOOM, FALCON, GPT_BIGCODE, GPT_NEO, OPENAI_GPT, MPT, OPT, BIOGPT, XGLM, CODEGEN)
