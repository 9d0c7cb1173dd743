"""The multi-token prediction loss (DeepSeek-V3, model/mtp.py), from the logits each training forward leaves
on the model's MTP module: the model computes no loss; the step adds this one.

Depth k's target at position t is label t + k (token t + k + 1), counted where the loss mask at t + k is
set: megatron-core rolls the labels and the loss mask left k times, zero-filling, and with packed documents
rolls within each document, so a target in another document is masked; here `documents` [b, s] masks
those. The added loss is mtp_loss_coeff / D times the depths' summed masked cross-entropy over the step's
loss tokens, the normalisation of the main loss (a token mean over the step: megatron-core's
calculate_per_token_loss). Logged per depth as the token mean over the depth's own targets, the value
megatron-core's MTPLossLoggingHelper reports.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_llm.model.mtp import shift_left
from megatron_llm.training.loss import masked_cross_entropy


def mtp_targets(labels: torch.Tensor, loss_mask: torch.Tensor, k: int,
                documents: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth k's (labels, loss mask) [b, s]: both shifted left k places, zero-filled; a target in another
    document than its position's is masked."""
    mask = shift_left(loss_mask, k)
    if documents is not None:
        mask = mask * (shift_left(documents, k) == documents)
    return shift_left(labels, k), mask


class MTPLoss:
    """Per step: takes each micro-batch's MTP logits from the model and sums the depths' losses for logging. Under a
    pipeline every stage holds one (all join the sum over stages) and only the last stage's module computes."""

    def __init__(self, module: Optional[nn.Module], depths: int, coeff: float, device: torch.device):
        self.module, self.coeff = module, coeff
        self.zeros = torch.zeros(2, depths, device=device)  # [masked CE sum, targets] per depth
        # Per micro-batch, the last call's: a pipeline schedule's shape inference calls the loss once more first,
        # on placeholder logits of the first micro-batch (parallel/pipeline.py, ScheduleLoss).
        self.sums: dict[int, torch.Tensor] = {}

    def __call__(self, mb: dict, step_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """The loss to add to the micro-batch's (None when the forward left no logits: evaluation)."""
        logits = self.module.take()
        if not logits:
            return None
        sums, total = self.zeros.clone(), 0.0
        for k, depth_logits in enumerate(logits, start=1):
            labels, mask = mtp_targets(mb["labels"], mb["loss_mask"], k, mb.get("documents"))
            ce = masked_cross_entropy(depth_logits, labels, mask).sum()
            sums[:, k - 1] = torch.stack([ce.detach(), mask.sum().float()])
            total = total + ce
        self.sums[id(mb)] = sums
        return self.coeff / len(logits) * total / step_tokens

    def scalars(self, reduce) -> dict[str, float]:
        """Per-depth token means over the step, summed over ranks by `reduce` (a sum over dp and stages, which every
        rank joins)."""
        sums = reduce(sum(self.sums.values(), self.zeros.clone())).cpu()
        return {f"mtp_loss/depth{k + 1}": (sums[0, k] / sums[1, k].clamp(min=1)).item() for k in range(sums.shape[1])}


def mtp_loss(model: nn.Module) -> Optional[MTPLoss]:
    """A fresh per-step MTPLoss for a model with multi-token prediction (on every pipeline stage; the depths live on
    the last), else None."""
    cfg = model.cfg
    if not cfg.mtp_layers:
        return None
    return MTPLoss(getattr(model, "mtp", None), cfg.mtp_layers, cfg.mtp_loss_coeff, next(model.parameters()).device)
