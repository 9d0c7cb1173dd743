"""Causal grouped-query self-attention with RoPE and optional QK-norm."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.config import ModelConfig
from megatron_llm.model.norms import RMSNorm
from megatron_llm.model.rope import apply_rope


class Attention(nn.Module):
    """Grouped-query attention: num_kv_heads divides num_heads; MHA and MQA are the two ends.

    Head counts are read from the projected tensors, never stored: a tensor-parallel plan that shards
    wq/wk/wv by output rows and wo by input columns leaves each rank a smaller but complete attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * d, cfg.num_kv_heads * d
        self.wq = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.linear_bias)
        # Qwen3: a per-head RMSNorm on queries and keys, before RoPE, bounds the attention logits.
        self.q_norm = RMSNorm(d, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)  # [b, s, heads, d]; local heads under TP
        k = self.wk(x).view(b, s, -1, self.head_dim)  # [b, s, kv_heads, d]
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        # enable_gqa lets SDPA broadcast kv heads itself: no repeated K/V copy, and on CPU it measured
        # as fast as repeat_interleave or expand (within noise). FlashAttention takes it on GPU.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        out = out.transpose(1, 2).reshape(b, s, -1)  # [b, s, heads * d]
        return self.wo(out)
