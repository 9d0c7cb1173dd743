"""DeepSeek-V3's multi-token prediction (MTP), as megatron-core's MultiTokenPredictionBlock computes it.

Depth k (1..D) sees, at position t, the previous depth's hidden states h_{k-1}[t] (depth 1: the main model's
final-normed hidden states) and the embedding of token t + k, and predicts token t + k + 1 through the
model's shared output head:

    h_k = norm_k(block_k(eh_proj_k(cat(enorm_k(embed(tokens shifted by k)), hnorm_k(h_{k-1})))))

block_k is one more decoder block of the model's own kind (the last decoder layer's spec, as megatron-core
builds its MTP layer from the decoder's layer spec). The inputs are shifted as megatron-core's roll_tensor
does: left by k, the vacated last k positions filled with token 0 and position 0 (their targets are
masked out, and causal attention keeps them from reaching any earlier position).

No loss here (DESIGN: no loss inside forward): a training forward leaves each depth's logits on the module
(`logits`), and training/mtp_loss.py turns them into the loss the step adds, as the MoE router statistics
are taken by training/moe_loss.py. Evaluation and inference (eval mode) skip the module.
"""

from typing import Callable, Optional

import torch
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.norms import build_norm
from megatron_llm.model_config import ModelConfig


def shift_left(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [b, s] moved k places left along the sequence, the last k filled with 0 (megatron-core's roll_tensor,
    k times)."""
    return torch.cat([x[:, k:], x.new_zeros(x.shape[0], min(k, x.shape[1]))], dim=1)


class MTPLayer(nn.Module):
    """One prediction depth; slot names follow megatron-core's MultiTokenPredictionLayer (block = its
    transformer_layer, norm = its final_layernorm)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = build_norm(cfg)  # on the shifted tokens' embeddings
        self.hnorm = build_norm(cfg)  # on the previous depth's hidden states
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = build_norm(cfg)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h)], dim=-1))  # [b, s, 2 hidden] -> [b, s, hidden]
        return self.norm(self.block(x, ctx))


class MultiTokenPrediction(nn.Module):
    """D depths in a ModuleDict keyed "0".."D-1"; `logits` holds the last training forward's [b, s, vocab] per
    depth until the loss takes them (training/mtp_loss.py)."""

    def __init__(self, cfg: ModelConfig, block: Callable[[], nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({str(k): MTPLayer(cfg, block()) for k in range(cfg.mtp_layers)})
        self.logits: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, positions: Optional[torch.Tensor], ctx: AttentionContext,
                embed: Callable, head: Callable) -> None:
        """h [b, s, hidden]: the main model's final-normed hidden states; tokens [b, s]; positions [b, s] or None
        (0..s-1); embed(tokens, positions) and head(h) are the model's shared embedding and output head."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        self.logits = []
        for k, layer in enumerate(self.layers.values(), start=1):
            h = layer(h, embed(shift_left(tokens, k), shift_left(positions, k)), ctx)
            self.logits.append(head(h))  # [b, s, vocab]: predicts token t + k + 1

    def take(self) -> list[torch.Tensor]:
        """The logits of the last training forward, once (the module keeps no reference after)."""
        logits, self.logits = self.logits, []
        return logits
