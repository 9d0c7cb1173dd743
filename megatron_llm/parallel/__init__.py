"""Parallelism applied to a plain model from outside, in one fixed order (see `parallelize`)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import fully_shard

from megatron_llm.config import Config, ModelConfig, ParallelConfig
from megatron_llm.model import Transformer
from megatron_llm.parallel.dims import ParallelDims, all_reduce_sum, init_distributed, pick_device
from megatron_llm.parallel.expert_parallel import expert_modules, split_experts
from megatron_llm.parallel.gradients import clip_grads_, grad_norm
from megatron_llm.parallel.pipeline import (
    PipelineModel,
    build_schedule,
    split_stage,
    stage_layers,
    stages_of_rank,
    tie_group,
)
from megatron_llm.parallel.tensor_parallel import apply_tp

__all__ = [
    "ParallelDims", "PipelineModel", "all_reduce_sum", "clip_grads_", "grad_norm", "init_distributed",
    "parallelize", "parallelize_from_config", "pick_device",
]


def parallelize(
    cfg: ModelConfig, dims: ParallelDims, parallel: ParallelConfig, *, device: torch.device, seed: int,
    compile: bool, micro_batches: int, recompute: bool = False,
) -> nn.Module:
    """This rank's part of the model, holding the numbers one process would initialise, parallelised in
    one fixed order:

      1. pipeline split, on the meta device: each stage is a cheap copy with the other modules deleted;
      2. allocate and initialise each stage: the init draws per parameter name, so a stage gets the very
         values of the whole model, and no rank ever allocates more than its stages;
      3. tensor and sequence parallelism (the plan in tensor_parallel.py) shards those values, and expert
         parallelism (expert_parallel.py) keeps each rank's experts, or their tp slices;
      4. activation checkpointing (`recompute`) and compilation of the blocks, in place, so parameter
         names do not change;
      5. data parallelism last, sharding (FSDP2) or replicating (DDP) what the earlier steps produced.

    Returns the model itself at pp = 1, else a PipelineModel over this rank's stages and the schedule.
    """
    with torch.device("meta"):
        whole = Transformer(cfg)
    stage_ids, parts = [0], [whole]
    if dims.pp > 1:
        stage_ids = stages_of_rank(dims.mesh["pp"].get_local_rank(), parallel)
        layers = stage_layers(cfg.num_layers, parallel)
        parts = [split_stage(whole, layers[i], first=i == 0, last=i == parallel.num_stages - 1) for i in stage_ids]
    for part in parts:
        part.to_empty(device=device)
        part.tie_weights()
        part.init_weights(seed)
        if dims.tp > 1:
            apply_tp(part, dims.mesh["tp"], parallel.sp)
        if (experts_mesh := dims.experts_mesh()) is not None:
            split_experts(part, experts_mesh)
        for block in part.blocks():  # the decoder's and the MTP depths'
            if recompute:
                recompute_in_backward(block)
            if compile:
                block.compile()
        if dims.dp > 1:
            apply_data_parallel(part, dims, parallel.data_parallel)
    if dims.pp == 1:
        return parts[0]
    pp_group = dims.mesh["pp"].get_group()
    stages, schedule, loss = build_schedule(parts, stage_ids, parallel, pp_group, device, micro_batches)
    group = tie_group(dims.mesh, parallel.schedule) if cfg.tie_embeddings or cfg.mtp_layers else None
    return PipelineModel(parts, stages, schedule, loss, group)


def parallelize_from_config(cfg: Config, dims: ParallelDims, device: torch.device) -> nn.Module:
    """`parallelize` with the model, layout, seed, compilation, micro-batches and recomputation of a run's
    config: the model train.py trains, and the one the tools measure."""
    t = cfg.training
    return parallelize(
        cfg.model, dims, cfg.parallel, device=device, seed=t.seed, compile=t.compile, micro_batches=t.grad_accum_steps,
        recompute=t.activation_checkpointing == "full",
    )


def recompute_in_backward(block: nn.Module) -> None:
    """Full activation checkpointing: the block saves only its input for the backward and runs its
    forward again there (non-reentrant torch.utils.checkpoint, which composes with DTensor, FSDP2, the
    pipeline schedules and torch.compile). Set on the instance rather than wrapping the module, so that
    parameter names (and checkpoints) stay the same; the model has no dropout: the recomputation is exact.
    A plain function, not functools.partial, which torch.compile would silently leave uncompiled."""
    forward = block.forward

    def forward_recomputed_in_backward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = forward_recomputed_in_backward


def apply_data_parallel(model: nn.Module, dims: ParallelDims, kind: str) -> None:
    """FSDP2, or DDP as PyTorch's FSDP2-based `replicate` (nn.parallel.DistributedDataParallel cannot hold
    the DTensor parameters of tensor parallelism), both in place so parameter names do not change. One
    unit per block lets each block's communication overlap the next block's compute.

    Split experts (ep > 1) are data-parallel over the edp ranks that hold the same ones, in a unit of their
    own; with edp = 1 nothing else holds them and the blocks' units leave them alone."""
    dp_mesh = dims.mesh["dp"]
    # Under a pipeline every micro-batch's backward would all-gather again: keep blocks unsharded
    # between forward and backward there (torchtitan does the same).
    wrap = functools.partial(fully_shard, reshard_after_forward=dims.pp == 1) if kind == "fsdp" else replicate
    split = expert_modules(model) if dims.ep > 1 else []
    if split and dims.dp > dims.ep:
        for experts in split:
            wrap(experts, mesh=dims.expert_mesh["edp"])
    ignored = {p for experts in split for p in experts.parameters()} if dims.dp == dims.ep else None
    for block in model.blocks():  # the MTP depths' blocks too: each gathers its own weights, not the root's all
        wrap(block, mesh=dp_mesh, ignored_params=ignored)
    wrap(model, mesh=dp_mesh, ignored_params=ignored)  # embedding, final norm, head (and the MTP depths' projections)
