"""One single-device decoder for every family, in plain PyTorch; its choices come from ModelConfig
(megatron_llm/model_config.py). Parallelism is applied from outside, in parallel/."""

from megatron_llm.model.attention import Attention, AttentionContext
from megatron_llm.model.mlp import FeedForward
from megatron_llm.model.norms import LayerNorm, RMSNorm, build_norm
from megatron_llm.model.rope import apply_rope, rope_frequencies, rope_tables
from megatron_llm.model.transformer import (
    Transformer,
    TransformerBlock,
    build_model,
    count_params,
    flops_per_token,
    meta_model,
    token_cross_entropy,
)

__all__ = [
    "Attention", "AttentionContext", "FeedForward", "LayerNorm", "RMSNorm", "Transformer", "TransformerBlock",
    "apply_rope", "build_model", "build_norm", "count_params", "flops_per_token", "meta_model", "rope_frequencies",
    "rope_tables", "token_cross_entropy",
]
