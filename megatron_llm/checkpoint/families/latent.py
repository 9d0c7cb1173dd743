"""Dense families on DeepSeek's multi-head latent attention (model.attention mla): Youtu-LLM (DeepSeek-V3's
attention in Llama's block) and MiniCPM3 (DeepSeek-V2's attention with RoPE by halves, and muP-style scales on
the embedding, each residual branch and the logits). The latent attention's keys and tensor names are deepseek.py's;
the MoE families on it live there. Every config value a table cannot reproduce is refused by name on read."""

from __future__ import annotations

import math
from typing import Callable

from megatron_llm.checkpoint.families.common import without
from megatron_llm.checkpoint.families.deepseek import MLA_CONFIG, MLA_TENSORS, latent_norm_eps, q_lora_rank
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key


def _shortest(value: float, read: Callable[[float], float]) -> float:
    """The shortest decimal form of `value` that `read` maps to what `value` does: a key written as our field times
    a root reads back bit for bit (1.4 rather than 1.4000000000000001), or `value` itself."""
    for digits in range(1, 18):
        short = float(f"{value:.{digits}g}")
        if read(short) == read(value):
            return short
    return value


# Youtu-LLM: Llama's block and MLP around DeepSeek-V3's latent attention (RoPE dims in interleaved pairs), the
# head tied unless told otherwise.
YOUTU = Family(
    "youtu", "YoutuForCausalLM",
    (*without(MLA_CONFIG, "tie_embeddings"), Key("tie_word_embeddings", "tie_embeddings", default=True),
     q_lora_rank(1536), latent_norm_eps(1e-6)),
    MLA_TENSORS,
)


def _read_minicpm3_scales(hf: dict) -> dict:
    """MiniCPM3's muP scales as MiniCPM3Config fills them: scale_emb times the embeddings (12), each residual branch
    times scale_depth / sqrt(layers) (1.4; null: sqrt(layers), no scaling), the last hidden state divided by
    hidden_size / dim_model_base before the head (256; null: hidden_size), which is the logits times the inverse."""
    layers, hidden = hf["num_hidden_layers"], hf["hidden_size"]
    depth = hf.get("scale_depth", 1.4) if hf.get("scale_depth", 1.4) is not None else math.sqrt(layers)
    base = hf.get("dim_model_base", 256) if hf.get("dim_model_base", 256) is not None else hidden
    return dict(embedding_multiplier=float(hf.get("scale_emb", 12)), residual_multiplier=depth / math.sqrt(layers),
                logit_multiplier=base / hidden)


def _write_minicpm3_scales(cfg) -> dict:
    root, hidden = math.sqrt(cfg.num_layers), cfg.hidden_size  # every value is read back by Family.write_config
    return {"scale_emb": cfg.embedding_multiplier,
            "scale_depth": _shortest(cfg.residual_multiplier * root, lambda depth: depth / root),
            "dim_model_base": round(cfg.logit_multiplier * hidden)}  # an int (MiniCPM3Config): others read back off


def _read_v_head_dim(hf: dict) -> dict:
    """v_head_dim, hidden_size / heads where null or absent (MiniCPM3Config's fill)."""
    return dict(mla_v_head_dim=hf.get("v_head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


# MiniCPM3: Llama's block and MLP (biases optional) around DeepSeek-V2's latent attention with its RoPE dims rotated by
# halves, muP's three scales, the head tied unless told otherwise; its latent norms keep 1e-6 beside the block's 1e-5.
MINICPM3 = Family(
    "minicpm3", "MiniCPM3ForCausalLM",
    (*without(MLA_CONFIG, "tie_embeddings", "mla_v_head_dim", "rope_interleaved", "mlp_bias"),
     Key("tie_word_embeddings", "tie_embeddings", default=True), Key("mlp_bias", "mlp_bias", default=False),
     Fixed("rope_interleaved", False), q_lora_rank(768), Derived(_read_v_head_dim, lambda cfg: {"v_head_dim": cfg.mla_v_head_dim}),
     latent_norm_eps(1e-5), Derived(_read_minicpm3_scales, _write_minicpm3_scales)),
    MLA_TENSORS,
)

FAMILIES = (YOUTU, MINICPM3)
