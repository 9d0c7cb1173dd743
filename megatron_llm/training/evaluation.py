"""Validation loss per channel and overall: what training logs at each evaluation and tools/evaluate.py prints.

Each channel is evaluated on its own validation split (the same samples every time); the overall loss
is the token-weighted mean of the channels' over those very tokens, so it always lies among them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megatron_llm.data.loader import eval_batches
from megatron_llm.parallel import ParallelDims
from megatron_llm.training.step import evaluate

ChannelSums = dict[str, tuple[float, float]]  # channel name -> (cross-entropy sum, tokens)


def channel_sums(
    model: nn.Module, datasets: dict[str, torch.utils.data.Dataset], micro_batch_size: int, batches: int,
    dims: ParallelDims, autocast: Optional[torch.dtype],
) -> ChannelSums:
    """`batches` micro-batches of every channel's dataset, over every data-parallel rank. A collective."""
    return {
        name: evaluate(model, eval_batches(dataset, micro_batch_size, batches, dims.dp_rank, dims.dp), dims, autocast)
        for name, dataset in datasets.items()
    }


def mean_loss(sums: ChannelSums) -> float:
    """Token-weighted mean cross-entropy over the channels."""
    return sum(loss for loss, _ in sums.values()) / sum(tokens for _, tokens in sums.values())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
