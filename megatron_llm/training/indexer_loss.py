"""DeepSeek Sparse Attention's indexer loss (megatron-core 0.16.1's compute_dsa_indexer_loss, dense form), from what
each latent attention layer leaves on its indexer in a training forward (model/sparse_attention.py): the model
computes no loss; this module attaches it.

Per layer: the target is the main attention's softmax over the keys the mask allows, computed again from its
detached queries and keys in fp32, summed over heads and renormalised; the indexer's distribution is the softmax
of its scores under the same mask; the loss is coeff x KL(target || indexer) summed over keys, mean over the
micro-batch's queries. It reaches the indexer's gradients through an identity on the layer's output whose
backward adds the loss's (megatron-core's DSAIndexerLossAutoScaler), scaled by 1 / micro-batches as the
cross-entropy is, so no loss crosses a pipeline stage; the main model gets none of it (the indexer's inputs and
the target are detached). The loss's graph is kept to the backward, so activation checkpointing is refused with
it (config.ParallelConfig.validate): a recomputed block would not rebuild it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from megatron_llm.model.mla import LatentAttention

EPS = 1e-10  # megatron-core's, inside both logarithms


def indexer_kl(index: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(target || softmax(index)) summed over keys, mean over [b, s]. index [b, s, s_kv] (-inf where masked),
    q [b, heads, s, d], k [b, heads, s_kv, d] the attention's, detached."""
    masked = torch.where(index > float("-inf"), 0.0, float("-inf")).unsqueeze(1)  # [b, 1, s, s_kv]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + masked  # [b, heads, s, s_kv]
    target = torch.softmax(scores, dim=-1).sum(1)  # [b, s, s_kv]
    target = target / target.sum(-1, keepdim=True)
    p = torch.softmax(index, dim=-1)
    return (target * (torch.log(target + EPS) - torch.log(p + EPS))).sum(-1).mean()


class AttachLoss(torch.autograd.Function):
    """output -> output; the backward also sends `scale` into `loss` (megatron-core's DSAIndexerLossAutoScaler)."""

    @staticmethod
    def forward(ctx, output, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.scale), None


class IndexerLoss:
    """Forward hooks on a model's sparse latent attention layers (installed once per model): each training
    forward's loss attached to the layer's output, and the step's sum for the log."""

    def __init__(self, model: nn.Module, coeff: float):
        self.coeff, self.micro_batches = coeff, 1
        self.sums = torch.zeros(2, device=next(model.parameters()).device)  # [losses, layers x micro-batches]
        for module in model.modules():
            if isinstance(module, LatentAttention) and module.indexer is not None:
                module.register_forward_hook(self._hook)

    def start_step(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.sums.zero_()

    def _hook(self, module: LatentAttention, args, output: torch.Tensor) -> Optional[torch.Tensor]:
        inputs, module.indexer.loss_inputs = module.indexer.loss_inputs, None
        if inputs is None:  # evaluation or generation
            return None
        loss = self.coeff * indexer_kl(*inputs)
        self.sums += torch.stack([loss.detach(), torch.ones_like(loss)])
        return AttachLoss.apply(output, loss, 1.0 / self.micro_batches)

    def scalars(self, reduce) -> dict[str, float]:
        """The step's mean per layer and micro-batch, `reduce` summing over ranks and stages."""
        sums = reduce(self.sums.clone()).cpu()
        return {"dsa_indexer_loss": (sums[0] / sums[1]).item()} if sums[1] > 0 else {}


_LOSSES: "weakref.WeakKeyDictionary[nn.Module, IndexerLoss]" = weakref.WeakKeyDictionary()


def indexer_loss(model: nn.Module) -> Optional[IndexerLoss]:
    """The hooks of `model` (installed at the first call), or None when its config has no indexer loss."""
    cfg = model.cfg
    if cfg.dsa_index_topk is None or not cfg.dsa_indexer_loss_coeff:
        return None
    if model not in _LOSSES:
        _LOSSES[model] = IndexerLoss(model, cfg.dsa_indexer_loss_coeff)
    return _LOSSES[model]
