"""Multi-head latent attention in Megatron-LM's args, both directions: model.attention mla and its fields <->
multi_latent_attention, q_lora_rank, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim, rope_type,
rotary_scaling_factor, mscale, mscale_all_dim (Megatron-LM's _add_mla_args; megatron-core's MLATransformerConfig).
The tensor names are megatron.py's LATENT_TO_NATIVE.

What megatron-core 0.16's MLASelfAttention computes, and so what these args can say:
- RoPE on the qk_pos_emb_head_dim dims only, always as interleaved pairs (2j, 2j+1): its _apply_rotary_pos_emb_bshd
  gathers the even then the odd dims and rotates halves, which rotates the same pairs by the same angles as our
  model.rope_interleaved (it leaves them permuted, alike in q and k, so the scores are ours). Its TransformerConfig
  refuses rotary_interleaved with MLA; rotary_percent < 1 would rotate part of the dims, which ours never does.
- rope_type rope (plain), or yarn (Megatron-LM's default for MLA when --rope-type is not given): transformers' YaRN
  operation for operation (YarnRotaryEmbedding: the same correction range rounded to integers, ramp and mixing;
  cos and sin times mscale(f, mscale) / mscale(f, mscale_all_dim)), with original_max_position_embeddings, beta_fast
  and beta_slow fixed at MLATransformerConfig's defaults (MEGATRON_YARN); the softmax scale is
  mscale(f, mscale_all_dim)^2 / sqrt(q_head_dim), as transformers' DeepSeek scales it (our model.attention_scale).
- the latent norms are qk_layernorm's q_layernorm and kv_layernorm, with the block norms' epsilon; no projection but
  linear_proj has a bias (add_bias_linear).
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model.rope import yarn_mscale

# MLATransformerConfig's YaRN settings that no Megatron-LM flag sets.
MEGATRON_YARN = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
# Megatron-LM's defaults of the _add_mla_args flags (a checkpoint's args may lack any of them).
MLA_FLAG_DEFAULTS = dict(q_lora_rank=None, kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                         rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)


def mla_args(cfg: ModelConfig) -> dict:
    """The args that say latent attention, over those _args writes for grouped-query attention; a model without
    it gets multi_latent_attention False. UsageError for RoPE scaling megatron-core's MLA lacks."""
    if cfg.attention != "mla":
        return dict(multi_latent_attention=False)
    if cfg.dsa_index_topk is not None:  # megatron-core 0.16.1: experimental_attention_variant dsa, TE-built only
        raise UsageError("Megatron-LM cannot express model.dsa_index_topk (DeepSeek Sparse Attention): megatron-core "
                         "0.16.1 builds its DSA only from Transformer Engine specs (experimental_attention_variant), "
                         "not the local MLA spec; convert to native or hf instead")
    if not cfg.rope_interleaved:
        raise UsageError("Megatron-LM cannot express model.rope_interleaved=False with latent attention: megatron-core's "
                         "MLA rotates the RoPE dims in interleaved pairs (2j, 2j+1); convert to native or hf instead")
    if cfg.mla_norm_eps not in (None, cfg.norm_eps):
        raise UsageError(f"Megatron-LM cannot express model.mla_norm_eps={cfg.mla_norm_eps} beside model.norm_eps="
                         f"{cfg.norm_eps}: megatron-core's latent norms take the block norms' epsilon; convert to native "
                         "or hf instead")
    scaling = cfg.rope_scaling or {"rope_type": None}
    yarn = scaling["rope_type"] == "yarn"
    fixed = {"original_max_position_embeddings": float(scaling.get("original_max_position_embeddings", 0)),
             "beta_fast": float(scaling.get("beta_fast") or 32), "beta_slow": float(scaling.get("beta_slow") or 1)}
    if cfg.rope_scaling is not None and (not yarn or fixed != MEGATRON_YARN or "attention_factor" in scaling
                                         or scaling.get("truncate", True) is not True):
        raise UsageError(f"Megatron-LM cannot express model.rope_scaling={cfg.rope_scaling!r} with latent attention: its "
                         f"RoPE scaling there is YaRN with {MEGATRON_YARN} fixed (no attention_factor, truncate); "
                         "convert to native or hf instead")
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if not (m and m_all):  # transformers then scales cos and sin by yarn_mscale(factor, 1): megatron-core's at (1, 0)
        m, m_all = 1.0, 0.0
    return dict(
        multi_latent_attention=True, q_lora_rank=cfg.mla_q_lora_rank, kv_lora_rank=cfg.mla_kv_lora_rank,
        qk_head_dim=cfg.head_dim - cfg.mla_rope_head_dim, qk_pos_emb_head_dim=cfg.mla_rope_head_dim,
        v_head_dim=cfg.mla_v_head_dim, rope_type="yarn" if yarn else "rope",
        rotary_scaling_factor=float(scaling["factor"]) if yarn else 1.0, mscale=float(m), mscale_all_dim=float(m_all),
        # megatron-core's own conventions for MLA (module docstring); GPTModel builds no RoPE of its own for it
        qk_layernorm=True, rotary_interleaved=False, rotary_percent=1.0, use_rope_scaling=False,
        group_query_attention=False, num_query_groups=cfg.num_heads, add_qkv_bias=False,
    )


def latent_config(args: argparse.Namespace) -> dict:
    """The inverse of mla_args: ModelConfig's latent-attention fields ({} without MLA), or UsageError naming the arg
    whose computation ours lacks."""
    if not getattr(args, "multi_latent_attention", False):
        return {}

    def arg(name):
        value = getattr(args, name, None)
        return MLA_FLAG_DEFAULTS.get(name) if value is None else value

    def refuse(name: str, why: str) -> UsageError:
        return UsageError(f"Megatron checkpoint has multi_latent_attention with {name}={getattr(args, name, None)!r}: "
                          f"{why}; convert it with Megatron-LM's own tools")

    if not getattr(args, "qk_layernorm", False):
        raise refuse("qk_layernorm", "its latents are not normalised, ours always are")
    if getattr(args, "rotary_interleaved", False):
        raise refuse("rotary_interleaved", "megatron-core's TransformerConfig refuses it with MLA, which pairs the "
                     "RoPE dims interleaved already")
    if float(getattr(args, "rotary_percent", None) or 1.0) != 1.0:
        raise refuse("rotary_percent", "our latent attention rotates every qk_pos_emb_head_dim dim")
    rope_type = getattr(args, "rope_type", None) or "yarn"  # Megatron-LM leaves None to MLATransformerConfig: yarn
    if rope_type not in ("rope", "yarn"):
        raise refuse("rope_type", "megatron-core's MLA has rope or yarn")
    rope, nope = arg("qk_pos_emb_head_dim"), arg("qk_head_dim")
    scaling: Optional[dict] = None
    scale: Optional[float] = None
    if rope_type == "yarn":
        factor, m, m_all = float(arg("rotary_scaling_factor")), float(arg("mscale")), float(arg("mscale_all_dim"))
        scaling = {"rope_type": "yarn", "factor": factor, **MEGATRON_YARN}
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
        if m and m_all:  # transformers computes this same ratio from the two
            scaling.update(mscale=m, mscale_all_dim=m_all)
        elif attention_factor != yarn_mscale(factor, 1.0):
            scaling["attention_factor"] = attention_factor
        if yarn_mscale(factor, m_all) != 1.0:  # as the deepseek tables read transformers' softmax scale
            scale = (nope + rope) ** -0.5 * yarn_mscale(factor, m_all) ** 2
    return dict(
        attention="mla", head_dim=nope + rope, num_kv_heads=args.num_attention_heads, mla_q_lora_rank=arg("q_lora_rank"),
        mla_kv_lora_rank=arg("kv_lora_rank"), mla_rope_head_dim=rope, mla_v_head_dim=arg("v_head_dim"),
        rope_interleaved=True, rope_fraction=1.0, rope_scaling=scaling, attention_scale=scale, qk_norm=False,
        qkv_bias=False,
    )
