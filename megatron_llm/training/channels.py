"""Per-channel loss: the token-loss sum and token count of each data source, for every step.

Where the loss is computed (the last pipeline stage), each micro-batch adds its per-token
cross-entropy into per-channel sums on the device. After the step, the sums of every data-parallel
rank are gathered with `all_gather_object` and added up, so the result is exact for the global batch:
the token-weighted mean over the channels equals the step's overall loss. Tensor-parallel ranks hold
identical sums (the vocabulary-parallel loss is already reduced), so gathering over dp alone counts
each token once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_llm.config import tag_safe  # noqa: F401  (re-exported: the rule config.py checks names with)

# channel id -> (loss sum, token count) over a global batch
ChannelTotals = dict[int, tuple[float, float]]


class ChannelSums:
    """Device-side sums for one step on one rank: [loss sum, token count] per channel."""

    def __init__(self, num_channels: int, device: torch.device):
        self.sums = torch.zeros(num_channels, 2, dtype=torch.float64, device=device)  # exact token counts

    def add(self, token_ce: torch.Tensor, loss_mask: torch.Tensor, channel: torch.Tensor) -> None:
        """token_ce, loss_mask: [b, s] (masked tokens already 0 in token_ce); channel: [b], or [b, s] when
        the tokens of a sequence belong to different channels (packed conversations)."""
        if channel.dim() == 2:
            per_token = torch.stack([token_ce.flatten(), loss_mask.flatten()], dim=1)  # [b * s, 2]
            self.sums.index_add_(0, channel.flatten().to(self.sums.device), per_token.to(self.sums.dtype))
            return
        per_sample = torch.stack([token_ce.sum(1), loss_mask.sum(1)], dim=1)  # [b, 2]
        self.sums.index_add_(0, channel.to(self.sums.device), per_sample.to(self.sums.dtype))

    def gather(self, group: Optional[dist.ProcessGroup]) -> ChannelTotals:
        """Sums over the data-parallel group. Every rank of the group must call it every step, with or
        without tokens for any channel, or the collective hangs. One host sync, then Python objects:
        only channels with tokens travel."""
        local = {c: (loss, tokens) for c, (loss, tokens) in enumerate(self.sums.tolist()) if tokens > 0}
        if group is None or dist.get_world_size(group) == 1:
            return local
        gathered: list[Optional[ChannelTotals]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        totals: dict[int, list[float]] = {}
        for rank_totals in gathered:
            for c, (loss, tokens) in rank_totals.items():
                acc = totals.setdefault(c, [0.0, 0.0])
                acc[0] += loss
                acc[1] += tokens
        return {c: (loss, tokens) for c, (loss, tokens) in sorted(totals.items())}


def merge(into: dict[int, list[float]], totals: ChannelTotals) -> None:
    """Adds one step's totals into a running interval sum."""
    for c, (loss, tokens) in totals.items():
        acc = into.setdefault(c, [0.0, 0.0])
        acc[0] += loss
        acc[1] += tokens
