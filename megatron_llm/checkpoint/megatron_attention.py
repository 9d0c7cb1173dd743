"""Attention beyond plain RoPE in Megatron-LM's args, both directions: YaRN on grouped-query attention and sliding
windows (multi-head latent attention's YaRN is megatron_mla.py's).

- YaRN: position_embedding_type "yarn" and the yarn_* attributes megatron-core's GPTModel reads from its config with
  getattr (yarn_rotary_scaling_factor, yarn_original_max_position_embeddings, yarn_beta_fast, yarn_beta_slow,
  yarn_mscale, yarn_mscale_all_dim, yarn_correction_range_round_to_int: transformers' factor,
  original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim and truncate). They are no
  TransformerConfig fields and Megatron-LM's arguments.py has no flags for them (its post-training --enable-gpt-oss
  sets gpt-oss's on the config; Megatron-Bridge sets them per model); we write them in `args` under those names.
  megatron-core's YarnRotaryEmbedding is transformers' YaRN operation for operation (the correction range, rounded
  to integers or not, the ramp, the mix of interpolated and extrapolated frequencies), over the whole kv_channels;
  its cos and sin are multiplied by the concentration factor mscale(f, yarn_mscale) / mscale(f, yarn_mscale_all_dim),
  or mscale(f, 1) when either is None, as transformers' attention factor.
- Sliding windows: window_size (left, right) sees keys left positions back and right ahead (get_sliding_window_causal_mask:
  left + 1 keys with the query, right 0 causal; ours counts the query in model.sliding_window), on the layers
  is_layer_window_attention picks: every layer (window_attn_skip_freq None), all but each N-th of the 1-indexed layer
  numbers (an int N), or where a list holds 1.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model.rope import yarn_mscale

TRANSFORMERS_YARN = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}  # transformers' defaults of these keys
YARN_ARGS = ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
             "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int")


# What Megatron-LM's post-training model_builder sets on the config for --enable-gpt-oss, over what the args say
# (megatron/post_training/model_builder.py): the model such a checkpoint trained, its original_max_position_embeddings
# 131072 rather than gpt-oss's published 4096.
ENABLE_GPT_OSS = dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=32.0,
                      yarn_original_max_position_embeddings=131072, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
                      yarn_mscale=1.0, yarn_mscale_all_dim=0.0, yarn_correction_range_round_to_int=False)


def as_built(args: argparse.Namespace) -> argparse.Namespace:
    """args as Megatron-LM built its model from them: --enable-gpt-oss's YaRN over what they say."""
    return argparse.Namespace(**{**vars(args), **ENABLE_GPT_OSS}) if getattr(args, "enable_gpt_oss", False) else args


def concentration(factor: float, m: Optional[float], m_all: Optional[float]) -> float:
    """megatron-core's _yarn_get_concentration_factor: what multiplies its YaRN cos and sin."""
    if m is None or m_all is None:
        return yarn_mscale(factor, 1.0)
    return yarn_mscale(factor, m) / yarn_mscale(factor, m_all)


def yarn_args(cfg: ModelConfig) -> dict:
    """position_embedding_type and, for YaRN, the yarn_* attributes; UsageError naming what megatron-core's YaRN
    would compute otherwise (the frequencies themselves are compared by megatron_args' read back)."""
    scaling = cfg.rope_scaling
    if scaling is None or scaling["rope_type"] != "yarn":
        return dict(position_embedding_type="rope")

    def refuse(why: str) -> UsageError:
        return UsageError(f"Megatron-LM cannot express model.rope_scaling={scaling!r} with {why}; convert to native "
                          "or hf instead")

    if cfg.rope_interleaved:
        raise refuse("model.rope_interleaved: megatron-core's YarnRotaryEmbedding rotates halves only")
    if cfg.rope_fraction != 1.0:
        raise refuse(f"model.rope_fraction={cfg.rope_fraction}: megatron-core's YaRN takes its frequencies over the "
                     "whole kv_channels and rotates every dim")
    factor, m, m_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    m, m_all = (float(m), float(m_all)) if m and m_all else (None, None)  # transformers' rule: both, or its default
    ours = scaling.get("attention_factor")
    if ours is not None and ours != concentration(factor, m, m_all):
        raise refuse(f"attention_factor {ours}: megatron-core multiplies cos and sin by {concentration(factor, m, m_all)} "
                     "(its concentration factor, from factor, mscale and mscale_all_dim)")
    return dict(
        position_embedding_type="yarn", yarn_rotary_scaling_factor=factor,
        yarn_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        yarn_beta_fast=float(scaling.get("beta_fast") or 32), yarn_beta_slow=float(scaling.get("beta_slow") or 1),
        yarn_mscale=m, yarn_mscale_all_dim=m_all,
        yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)),
    )


def yarn_scaling(args: argparse.Namespace) -> dict:
    """The inverse of yarn_args: model.rope_scaling for position_embedding_type yarn, or UsageError naming the
    missing attribute (megatron-core's GPTModel would fail on it the same way)."""
    missing = [name for name in YARN_ARGS if not hasattr(args, name)]
    if missing:
        raise UsageError(f"Megatron checkpoint has position_embedding_type='yarn' without {', '.join(missing)}, which "
                         "megatron-core's GPTModel reads for it; add them to its args")
    factor, m, m_all = float(args.yarn_rotary_scaling_factor), args.yarn_mscale, args.yarn_mscale_all_dim
    scaling = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": int(args.yarn_original_max_position_embeddings)}
    given = {"beta_fast": float(args.yarn_beta_fast), "beta_slow": float(args.yarn_beta_slow),
             "truncate": bool(args.yarn_correction_range_round_to_int)}
    scaling.update({k: v for k, v in given.items() if v != TRANSFORMERS_YARN[k]})  # transformers' defaults left out
    if m and m_all:  # transformers computes the same ratio from the two
        scaling.update(mscale=float(m), mscale_all_dim=float(m_all))
    elif concentration(factor, m, m_all) != yarn_mscale(factor, 1.0):
        scaling["attention_factor"] = concentration(factor, m, m_all)
    return scaling


def windows(cfg: ModelConfig) -> list[Optional[int]]:
    """Each layer's sliding window (None: full attention)."""
    return [cfg.layer(i).window for i in range(cfg.num_layers)]


def window_args(cfg: ModelConfig) -> dict:
    """window_size and window_attn_skip_freq for the model's sliding layers; UsageError for chunked or linear layers."""
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    if any(spec.chunk for spec in specs):
        raise UsageError(f"Megatron-LM cannot express model.layer_types={cfg.layer_types!r}: megatron-core has no "
                         "chunked attention; convert to native or hf instead")
    if any(spec.linear for spec in specs):
        raise UsageError(f"Megatron-LM cannot express model.layer_types={cfg.layer_types!r}: megatron-core's Gated DeltaNet "
                         "layers (experimental_attention_variant gated_delta_net) are built by a Transformer Engine spec "
                         "only, whose names we do not write; convert to native or hf instead")
    if any(spec.mixer == "mamba" for spec in specs):
        raise UsageError(f"Megatron-LM cannot express model.layer_types={cfg.layer_types!r} in GPTModel: megatron-core "
                         "builds Mamba-2 layers in MambaModel, a model class of its own (hybrid_override_pattern), "
                         "which we do not write; convert to native or hf instead")
    if any(spec.mixer == "short_conv" for spec in specs):
        raise UsageError(f"Megatron-LM cannot express model.layer_types={cfg.layer_types!r}: megatron-core has no "
                         "short-convolution layer (LFM2's); convert to native or hf instead")
    sliding = [int(spec.window is not None) for spec in specs]
    if not any(sliding):
        return dict(window_size=None, window_attn_skip_freq=None)
    every = next((n for n in range(2, cfg.num_layers + 1) if sliding == _every(n, cfg.num_layers)), None)
    return dict(window_size=(cfg.sliding_window - 1, 0),
                window_attn_skip_freq=None if all(sliding) else every or sliding)


def _every(n: int, layers: int) -> list[int]:
    """is_layer_window_attention's pattern for window_attn_skip_freq n: full on each n-th layer number (1-indexed)."""
    return [int((i + 1) % n != 0) for i in range(layers)]


def window_config(args: argparse.Namespace) -> dict:
    """The inverse of window_args: sliding_window and layer_types ({} without windows), or UsageError."""
    window = getattr(args, "window_size", None)
    if window is None or window[0] < 0:  # -1: Megatron's infinite window, full attention
        return {}
    if window[1] != 0:
        raise UsageError(f"Megatron checkpoint has window_size={tuple(window)!r}: its windows see {window[1]} keys "
                         "ahead, our causal sliding windows none")
    freq = getattr(args, "window_attn_skip_freq", None)
    sliding = (_every(freq, args.num_layers) if isinstance(freq, int) else
               [1] * args.num_layers if freq is None else [int(bool(x)) for x in freq])
    if len(sliding) != args.num_layers:
        raise UsageError(f"Megatron checkpoint has window_attn_skip_freq={freq!r}: {len(sliding)} entries for "
                         f"{args.num_layers} layers")
    return dict(sliding_window=window[0] + 1,
                layer_types=None if all(sliding) else ["sliding" if s else "full" for s in sliding])
