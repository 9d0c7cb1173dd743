"""One optimizer step over a list of micro-batches, and evaluation: the hot path, free of bookkeeping."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from megatron_llm.parallel import ParallelDims, PipelineModel, all_reduce_sum, clip_grads_, grad_norm
from megatron_llm.parallel.pipeline import Records, document_inputs
from megatron_llm.training.channels import ChannelSums, ChannelTotals
from megatron_llm.training.indexer_loss import indexer_loss
from megatron_llm.training.loss import micro_batch_loss
from megatron_llm.training.moe_loss import router_collector
from megatron_llm.training.mtp_loss import mtp_loss
from megatron_llm.training.reward import PairwiseObjective


@dataclass
class StepResult:
    loss: float  # token-mean cross-entropy over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: float
    skipped: bool  # NaN/Inf loss or gradient norm: no update was made
    channels: ChannelTotals  # channel -> (loss sum, tokens) over the global batch
    rates: dict[str, ChannelTotals] = field(default_factory=dict)  # reward "accuracy", "margin": channel -> (sum, pairs)
    moe: dict[str, float] = field(default_factory=dict)  # router losses and expert loads (training/moe_loss.py)


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
    objective: Optional[PairwiseObjective] = None,
) -> StepResult:
    """Forward and backward over the micro-batches, then one clipped AdamW update (or a skip). The loss is
    token cross-entropy, or a reward model's pairwise `objective` (then "tokens" are pairs)."""
    device = next(model.parameters()).device
    # The global token count is known before any forward; fixing it first keeps gradients a true
    # token mean however the tokens fall across micro-batches and ranks.
    local_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches).to(device)
    global_tokens = all_reduce_sum(local_tokens.clone(), dims)
    # DDP and FSDP average gradients over dp, so each rank divides by its share of the tokens.
    per_rank_tokens = global_tokens / dims.dp
    ce_sum = torch.zeros((), device=device)
    channel_sums = ChannelSums(num_channels, device) if num_channels else None  # 0: no per-channel accounting
    model.train()
    routers = router_collector(model)  # None without MoE layers
    if routers is not None:
        routers.start_step(dims, len(micro_batches))
    mtp = mtp_loss(model)  # None without multi-token prediction
    indexer = indexer_loss(model)  # None without DeepSeek Sparse Attention's indexer loss
    if indexer is not None:
        indexer.start_step(len(micro_batches))

    def loss_fn(logits, mb):
        if objective is not None:
            loss, token_ce = objective(logits, mb, per_rank_tokens)
        else:
            loss, token_ce = micro_batch_loss(logits, mb["labels"], mb["loss_mask"], z_loss, per_rank_tokens)
        # Model-scope router losses (training/moe_loss.py): under a pipeline the last stage sees only its own
        # layers' routers (the config refuses that scope with pp > 1); layer-scope ones are attached per layer.
        router_loss = routers.take_loss() if routers is not None and not isinstance(model, PipelineModel) else None
        if router_loss is not None:  # a mean over the micro-batches (and, by the gradient average, over dp)
            loss = loss + router_loss / len(micro_batches)
        extra = mtp(mb, per_rank_tokens) if mtp is not None else None
        return (loss if extra is None else loss + extra), token_ce

    for mb, token_ce in _run(model, micro_batches, dims, autocast, loss_fn, train=True):  # last stage only under pp
        ce_sum += token_ce.sum()
        if channel_sums is not None:
            channel_sums.add(token_ce, mb["loss_mask"], mb["channel"])
    norm = grad_norm(model, dims)  # the same on every rank: so is the decision to skip
    # One host sync for both numbers; the loss exists on the last stage only, zeros elsewhere.
    loss_value, norm_value = torch.stack([all_reduce_sum(ce_sum, dims, over_stages=True) / global_tokens, norm]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        clip_grads_(model, optimizer, grad_clip, norm_value)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    channels = channel_sums.gather(dims.dp_group) if channel_sums is not None else {}
    rates = objective.gather(dims.dp_group) if objective is not None else {}
    moe = routers.finish_step(model, dims, len(micro_batches), updated=finite) if routers is not None else {}
    if mtp is not None:  # logged beside the router losses
        moe.update(mtp.scalars(lambda sums: all_reduce_sum(sums, dims, over_stages=True)))
    if indexer is not None:
        moe.update(indexer.scalars(lambda sums: all_reduce_sum(sums, dims, over_stages=True)))
    return StepResult(loss_value, int(global_tokens.item()), norm_value, skipped=not finite, channels=channels, moe=moe, rates=rates)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict], dims: ParallelDims, autocast: Optional[torch.dtype],
    objective: Optional[PairwiseObjective] = None,
) -> tuple[float, float]:
    """(cross-entropy sum, tokens) over the batches of every data-parallel rank: sums, so that results on
    several datasets combine into an exact token-weighted mean. With a reward model's `objective`: its
    loss sum and pairs (accuracy and margin accumulate in the objective)."""
    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(2, device=device)  # [loss sum, tokens]

    def loss_fn(logits, mb):
        if objective is not None:
            return objective(logits, mb, 1)
        return micro_batch_loss(logits, mb["labels"], mb["loss_mask"], 0.0, 1)

    for mb, token_ce in _run(model, list(batches), dims, autocast, loss_fn, train=False):
        sums += torch.stack([token_ce.sum(), mb["loss_mask"].sum()])
    model.train()
    loss_sum, tokens = all_reduce_sum(sums, dims, over_stages=True).tolist()
    return loss_sum, tokens


def _run(model: nn.Module, micro_batches: list[dict], dims: ParallelDims, autocast, loss_fn, train: bool) -> Records:
    """Forward (and backward when `train`) of every micro-batch; returns (micro-batch, per-token
    cross-entropy) for each, in order. Under a pipeline the schedule runs them, and only the last stage
    returns any. Vocabulary-parallel logits need `loss_parallel` around both the loss and its backward."""
    device = next(model.parameters()).device
    micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
    vocab_parallel = loss_parallel() if dims.tp > 1 else contextlib.nullcontext()
    with _autocast(device, autocast), vocab_parallel:
        if isinstance(model, PipelineModel):
            return model.run(micro_batches, loss_fn, train)
        records = []
        for mb in micro_batches:
            loss, token_ce = loss_fn(model(mb["tokens"], **document_inputs(mb)), mb)  # logits [b, s, vocab]
            if train:
                loss.backward()
            records.append((mb, token_ce))
        return records
