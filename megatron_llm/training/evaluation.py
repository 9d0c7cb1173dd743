"""Validation per channel and overall: what training logs at each evaluation and tools/evaluate.py prints.

Each channel is evaluated on its own validation split (the same samples every time); the overall loss
is the token-weighted mean of the channels' over those very tokens, so it always lies among them. A
reward model's validation is its pairwise loss per pair instead, with accuracy and margin over the same
pairs, overall (pair-weighted) and per channel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megatron_llm.data.loader import eval_batches
from megatron_llm.parallel import ParallelDims
from megatron_llm.training.channels import tag_safe
from megatron_llm.training.reward import PairwiseObjective
from megatron_llm.training.step import evaluate

ChannelSums = dict[str, tuple[float, float]]  # channel name -> (loss sum, tokens; pairs for a reward model)
PairRates = dict[str, ChannelSums]  # "accuracy", "margin" -> channel name -> (sum, pairs)


def channel_sums(
    model: nn.Module, datasets: dict[str, torch.utils.data.Dataset], micro_batch_size: int, batches: int,
    dims: ParallelDims, autocast: Optional[torch.dtype], reward: Optional[tuple[float, float]] = None,
) -> tuple[ChannelSums, PairRates]:
    """`batches` micro-batches of every channel's dataset, over every data-parallel rank: per channel its
    (cross-entropy sum, tokens); for a reward model (`reward`: its margin and centering) its (pairwise loss
    sum, pairs) and the pairs' accuracy and margin sums, which only the last pipeline stage sees. A collective."""
    sums, rates = {}, {}
    for name, dataset in datasets.items():
        # A channel's validation rows carry channel 0: each dataset is evaluated alone.
        objective = PairwiseObjective(*reward, 1, next(model.parameters()).device) if reward is not None else None
        sums[name] = evaluate(model, eval_batches(dataset, micro_batch_size, batches, dims.dp_rank, dims.dp), dims,
                              autocast, objective)
        for key, totals in (objective.gather(dims.dp_group) if objective is not None else {}).items():
            if totals:
                rates.setdefault(key, {})[name] = totals[0]
    return sums, rates


def rate_scalars(rates: PairRates, prefix: str, per_channel: bool) -> dict[str, float]:
    """{prefix}accuracy and {prefix}margin, pair-weighted over the channels, and /<channel> when asked."""
    out = {}
    for key, by_channel in rates.items():
        out[f"{prefix}{key}"] = mean_loss(by_channel)  # the same weighted mean
        if per_channel:
            out.update({f"{prefix}{key}/{tag_safe(name)}": v / n for name, (v, n) in by_channel.items()})
    return out


def mean_loss(sums: ChannelSums) -> float:
    """Token-weighted mean cross-entropy over the channels (pair-weighted for a reward model's values)."""
    return sum(loss for loss, _ in sums.values()) / sum(tokens for _, tokens in sums.values())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
