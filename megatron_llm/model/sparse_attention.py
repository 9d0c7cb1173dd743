"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5), chosen by model.dsa_index_topk on latent attention.

A lightning indexer ranks the keys for each query and the latent attention sees only each query's top
dsa_index_topk of them (all of them while there are fewer). The indexer's queries come from the query latent
(wq_a then q_a_norm, shared with the attention), its one key per position from the hidden state through wk and
a LayerNorm; each is [rope | pass]: the first mla_rope_head_dim dims rotated by the attention's table. A key's
score for a query is sum_h w_h * relu(q_h . k) * head_dim^-0.5 with per-head weights w = head_weights(x) / sqrt(heads).

The selection is a top-k, which has no gradient: the language-model loss never reaches the indexer (transformers
runs it under no_grad). megatron-core trains it by a KL loss to the main attention (training/indexer_loss.py,
model.dsa_indexer_loss_coeff); for that, in training, the attention leaves the indexer's scores (whose graph reaches
only the indexer: its inputs are detached, as megatron-core's) and its own detached queries and keys on the
indexer as `loss_inputs`. Training needs the loss or the indexer frozen (model.dsa_indexer_frozen).
Under tensor parallelism the indexer is a replicated plain module (not in the plan) whose inputs are whole (the
gathered sequence, wq_a's latent): every rank selects the same keys for its own heads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.attention_kernels import ScoreRules, dense_bias, sdpa
from megatron_llm.model.rope import apply_rope
from megatron_llm.model_config import ModelConfig


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: Optional[str]):
        super().__init__()
        self.heads, self.head_dim, self.topk = cfg.dsa_index_heads, cfg.dsa_index_head_dim, cfg.dsa_index_topk
        self.rope, self.interleaved = rope, cfg.dsa_index_rope_interleaved
        self.wq_b = nn.Linear(cfg.mla_q_lora_rank, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # transformers' and DeepSeek's fixed epsilon
        self.head_weights = nn.Linear(cfg.hidden_size, self.heads, bias=False)
        # Explicitly fixed when asked (fine-tuning the rest), so an optimizer never holds parameters nothing updates.
        self.requires_grad_(not cfg.dsa_indexer_frozen)
        self.loss_coeff = cfg.dsa_indexer_loss_coeff
        self.loss_inputs: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = None

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, ctx: AttentionContext, rules: ScoreRules,
                s_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boolean [b, 1, s, s_kv]: True at the keys each query attends to (causal, windowed, padded as `rules`
        and ctx.keys say, and among the indexer's top-k); the index scores [b, s, s_kv] fp32, -inf where masked).
        x [b, s, hidden], q_latent [b, s, q_lora_rank]: detached, so the indexer's loss trains the indexer alone."""
        b, s, _ = x.shape
        x, q_latent = x.detach(), q_latent.detach()
        q = self.wq_b(q_latent).view(b, s, self.heads, self.head_dim)  # [b, s, heads, d]
        k = self.k_norm(self.wk(x)).unsqueeze(2)  # [b, s, 1, d]: one key per position for every head
        if self.rope is not None:  # the attention's table: the leading mla_rope_head_dim dims rotate
            cos, sin = ctx.rope_at(self.rope, s)
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        if ctx.cache is not None:  # the cache's buffers take [b, heads, s, d]; keys twice, as there are no values
            k, _ = ctx.cache.update(self, k.transpose(1, 2), k.transpose(1, 2))
            k = k.transpose(1, 2)  # [b, s_kv, 1, d]
        # fp32 as transformers scores: the top-k is a hard choice, so the scores' rounding decides keys
        # [b, s, heads, d] @ [b, 1, d, s_kv] -> [b, s, heads, s_kv], in transformers' order of operations
        scores = torch.matmul(q.float(), k.squeeze(2).float().transpose(-1, -2).unsqueeze(1)) * self.head_dim**-0.5
        weights = self.head_weights(x).float() * self.heads**-0.5  # [b, s, heads]
        index = torch.matmul(weights.unsqueeze(-2), torch.relu(scores)).squeeze(-2)  # [b, s, 1, s_kv] -> [b, s, s_kv]
        index = index + dense_bias(rules, None, s, s_kv, x.device, ctx.keys)[:, 0]  # -inf where masked
        chosen = index.topk(min(self.topk, s_kv), dim=-1).indices  # [b, s, topk]
        selected = torch.zeros(index.shape, dtype=torch.bool, device=x.device).scatter(-1, chosen, True)
        # a query with fewer keys than topk also picked masked ones
        return (selected & (index > float("-inf"))).unsqueeze(1), index


def sparse_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention output [b, heads, s, v_dim] over the keys `keep` [b, 1, s, s_kv] allows: SDPA with the dense mask,
    on every device (the selection is data-dependent: no block structure for FlexAttention to skip)."""
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    return sdpa(q, k, v, attn_mask=bias, scale=scale)

