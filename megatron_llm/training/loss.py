"""The training loss of one micro-batch, normalised by the token count of the whole optimizer step.

Under tensor parallelism the logits are a DTensor sharded on the vocabulary and the caller runs this
inside `loss_parallel()`: cross-entropy and the z-loss's log-partition reduce across the tensor-parallel
ranks (a max and a sum of exponentials) without gathering the logits. The per-token results are
replicated over those ranks, so they come back as plain local tensors.
"""

import torch
from torch.distributed.tensor import DTensor

from megatron_llm.model import token_cross_entropy


def micro_batch_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, z_loss: float, step_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss to backpropagate, per-token cross-entropy [b, s] with masked tokens zeroed).

    Dividing every micro-batch's token sum by the step's total token count (fixed before the first
    micro-batch) makes accumulated gradients equal to one big batch's token mean, however the tokens
    fall across micro-batches.
    """
    token_ce = masked_cross_entropy(logits, labels, loss_mask)
    loss = token_ce.sum()
    if z_loss:
        # z-loss (PaLM): keeps log Z near 0 so the softmax stays well conditioned in low precision.
        log_z = _local(log_partition(logits.float()))  # [b, s]
        loss = loss + z_loss * (log_z.square() * loss_mask).sum()
    return loss / step_tokens, token_ce.detach()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, s] (fp32, this rank's full value under tp), zero where the loss mask is."""
    return _local(token_cross_entropy(logits, labels)) * loss_mask


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary [b, s, vocab] -> [b, s], written as max then sum of exponentials:
    on vocabulary-sharded logits each is a cross-rank reduction of [b, s] values, where torch.logsumexp
    would all-gather the logits. Padded vocabulary columns hold -inf and add exp(-inf) = 0."""
    peak = logits.amax(dim=-1, keepdim=True).detach()  # [b, s, 1]; any constant gives the same value
    return (logits - peak).exp().sum(dim=-1).log() + peak.squeeze(-1)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x  # replicated over tp: the local value is the full one
