"""One optimizer step over a list of micro-batches, and evaluation: the hot path, free of bookkeeping."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from megatron_llm.parallel import ParallelDims, all_reduce_sum
from megatron_llm.training.channels import ChannelSums, ChannelTotals
from megatron_llm.training.loss import micro_batch_loss


@dataclass
class StepResult:
    loss: float  # token-mean cross-entropy over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: float
    skipped: bool  # NaN/Inf loss or gradient norm: no update was made
    channels: ChannelTotals  # channel -> (loss sum, tokens) over the global batch


def autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast over fp32 parameters and fp32 AdamW state on CUDA; plain fp32 on CPU."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    dims: ParallelDims,
    *,
    z_loss: float,
    grad_clip: float,
    autocast: Optional[torch.dtype],
    num_channels: int = 1,
) -> StepResult:
    """Forward and backward over the micro-batches, then one clipped AdamW update (or a skip)."""
    device = next(model.parameters()).device
    # The global token count is known before any forward; fixing it first keeps gradients a true
    # token mean however the tokens fall across micro-batches and ranks.
    local_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches).to(device)
    global_tokens = all_reduce_sum(local_tokens.clone(), dims)
    # DDP and FSDP average gradients over dp, so each rank divides by its share of the tokens.
    per_rank_tokens = global_tokens / dims.dp
    ce_sum = torch.zeros((), device=device)
    channel_sums = ChannelSums(num_channels, device)
    model.train()
    for mb in micro_batches:
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with _autocast(device, autocast):
            logits = model(mb["tokens"])  # [b, s, vocab]
        loss, token_ce = micro_batch_loss(logits, mb["labels"], mb["loss_mask"], z_loss, per_rank_tokens)
        loss.backward()
        ce_sum += token_ce.sum()
        channel_sums.add(token_ce, mb["loss_mask"], mb["channel"])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    # One host sync for both numbers.
    loss_value, norm_value = torch.stack([all_reduce_sum(ce_sum, dims) / global_tokens, grad_norm]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    channels = channel_sums.gather(dims.dp_group)
    return StepResult(loss_value, int(global_tokens.item()), norm_value, skipped=not finite, channels=channels)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], dims: ParallelDims, autocast: Optional[torch.dtype]) -> float:
    """Token-mean cross-entropy over the batches of every data-parallel rank."""
    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(2, device=device)  # [loss sum, tokens]
    for mb in batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        with _autocast(device, autocast):
            logits = model(mb["tokens"])
        _, token_ce = micro_batch_loss(logits, mb["labels"], mb["loss_mask"], 0.0, 1)
        sums += torch.stack([token_ce.sum(), mb["loss_mask"].sum()])
    model.train()
    loss_sum, tokens = all_reduce_sum(sums, dims).tolist()
    return loss_sum / tokens
