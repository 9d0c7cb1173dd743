"""Single-device LLaMA-family model in plain PyTorch. Parallelism is applied from outside, in parallel/."""

from megatron_llm.model.attention import Attention
from megatron_llm.model.mlp import FeedForward
from megatron_llm.model.norms import RMSNorm, build_norm
from megatron_llm.model.rope import apply_rope, rope_frequencies, rope_tables
from megatron_llm.model.transformer import (
    Transformer,
    TransformerBlock,
    build_model,
    flops_per_token,
    token_cross_entropy,
)

__all__ = [
    "Attention", "FeedForward", "RMSNorm", "Transformer", "TransformerBlock", "apply_rope", "build_model",
    "build_norm", "flops_per_token", "rope_frequencies", "rope_tables", "token_cross_entropy",
]
