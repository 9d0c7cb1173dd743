"""The training loss of one micro-batch, normalised by the token count of the whole optimizer step."""

import torch

from megatron_llm.model import token_cross_entropy


def micro_batch_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, z_loss: float, step_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss to backpropagate, per-token cross-entropy [b, s] with masked tokens zeroed).

    Dividing every micro-batch's token sum by the step's total token count (fixed before the first
    micro-batch) makes accumulated gradients equal to one big batch's token mean, however the tokens
    fall across micro-batches.
    """
    token_ce = token_cross_entropy(logits, labels) * loss_mask  # [b, s], fp32
    loss = token_ce.sum()
    if z_loss:
        # z-loss (PaLM): keeps log Z near 0 so the softmax stays well conditioned in low precision.
        log_z = torch.logsumexp(logits.float(), dim=-1)  # [b, s]
        loss = loss + z_loss * (log_z.square() * loss_mask).sum()
    return loss / step_tokens, token_ce.detach()
