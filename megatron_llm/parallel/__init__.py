"""Parallelism applied to a plain model from outside, in one fixed order (see `parallelize`)."""

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from megatron_llm.config import ParallelConfig
from megatron_llm.parallel.dims import ParallelDims, all_reduce_sum, init_distributed, pick_device

__all__ = ["ParallelDims", "all_reduce_sum", "init_distributed", "parallelize", "pick_device"]


def parallelize(model: nn.Module, dims: ParallelDims, parallel: ParallelConfig, compile: bool) -> nn.Module:
    """Order matters: compile sees the unsharded blocks; data parallelism wraps last so it shards or
    replicates what the earlier steps produced."""
    if compile:
        for block in model.layers.values():
            block.compile()  # in place, so parameter names do not change
    if dims.dp == 1:
        return model
    if parallel.data_parallel == "fsdp":
        dp_mesh = dims.mesh["dp"]
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh)  # one all-gather per block: overlaps with the previous block's compute
        fully_shard(model, mesh=dp_mesh)  # embedding, final norm and head (tied or not) in the root group
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=dims.mesh["dp"].get_group()
    )
