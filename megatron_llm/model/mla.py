"""Multi-head latent attention (DeepSeek-V2/V3), chosen in the attention slot by model.attention "mla".

Queries come from a low-rank compression (wq_a to q_lora_rank, a norm, wq_b; or one wq); keys and values
from one shared latent of kv_lora_rank (wkv_a, a norm, wkv_b), plus one decoupled RoPE key of
mla_rope_head_dim shared by all heads. Each query and key head is [nope | rope]: head_dim - rope dims
without positions and the rope dims rotated; values have mla_v_head_dim. The scores and the kernel are
the ones grouped-query attention uses (attention_kernels.attend).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.attention_kernels import ScoreRules, attend
from megatron_llm.model.norms import build_norm
from megatron_llm.model.rope import apply_rope
from megatron_llm.model.sparse_attention import Indexer, sparse_attend
from megatron_llm.model_config import LayerSpec, ModelConfig


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, heads, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.rope_dim, self.v_dim, latent = cfg.mla_rope_head_dim, cfg.mla_v_head_dim, cfg.mla_kv_lora_rank
        self.head_dim, self.latent = d, latent
        rank, eps = cfg.mla_q_lora_rank, cfg.mla_norm_eps  # transformers' latent norms keep their own epsilon
        self.wq = nn.Linear(h, heads * d, bias=False) if rank is None else None
        self.wq_a = nn.Linear(h, rank, bias=cfg.qkv_bias) if rank is not None else None
        self.q_a_norm = build_norm(cfg, rank, eps) if rank is not None else None
        self.wq_b = nn.Linear(rank, heads * d, bias=False) if rank is not None else None
        self.wkv_a = nn.Linear(h, latent + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = build_norm(cfg, latent, eps)
        self.wkv_b = nn.Linear(latent, heads * (d - self.rope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(heads * self.v_dim, h, bias=cfg.out_bias)
        self.rope, self.rope_interleaved = spec.rope, cfg.rope_interleaved
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else d**-0.5
        self.rules = ScoreRules(window=spec.window, softcap=cfg.attn_softcap, alibi=False)
        # DeepSeek Sparse Attention: each query sees only its top-k keys by the indexer (model/sparse_attention.py)
        self.indexer = Indexer(cfg, spec.rope) if cfg.dsa_index_topk is not None else None

    def forward(self, x: torch.Tensor, *, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        q_latent = self.q_a_norm(self.wq_a(x)) if self.wq is None else None  # [b, s, q_lora_rank]
        q = self.wq(x) if self.wq is not None else self.wq_b(q_latent)
        q = q.view(b, s, -1, self.head_dim)  # [b, s, heads, nope + rope]
        kv, k_rope = self.wkv_a(x).split([self.latent, self.rope_dim], dim=-1)  # [b, s, latent], [b, s, rope]
        kv = self.wkv_b(self.kv_a_norm(kv)).view(b, s, q.shape[2], -1)  # [b, s, heads, nope + v]
        k_nope, v = kv.split([self.head_dim - self.rope_dim, self.v_dim], dim=-1)
        q_nope, q_rope = q.split([self.head_dim - self.rope_dim, self.rope_dim], dim=-1)
        k_rope = k_rope.unsqueeze(2)  # [b, s, 1, rope]: one positional key for every head
        if self.rope is not None:
            cos, sin = ctx.rope_at(self.rope, s)
            q_rope = apply_rope(q_rope, cos, sin, self.rope_interleaved)
            k_rope = apply_rope(k_rope, cos, sin, self.rope_interleaved)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [b, heads, s, d]
        k = torch.cat((k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [b, heads, s, v_dim]
        if ctx.cache is not None:
            k, v = ctx.cache.update(self, k, v)
        if self.indexer is not None:
            keep, index = self.indexer(x, q_latent, ctx, self.rules, k.shape[2])  # [b, 1, s, s_kv], [b, s, s_kv]
            if self.indexer.loss_coeff and self.training and torch.is_grad_enabled():  # training/indexer_loss.py
                self.indexer.loss_inputs = (index, q.detach(), k.detach(), self.scale)
            out = sparse_attend(q, k, v, keep, self.scale)
        else:
            out = attend(q, k, v, self.rules, self.scale, None, ctx.keys)  # [b, heads, s, v_dim]
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))
