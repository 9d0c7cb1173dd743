"""The process group and the device mesh: who this rank is and which groups it belongs to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_llm.config import ParallelConfig
from megatron_llm.errors import UsageError


@dataclass
class ParallelDims:
    """Mesh dims, outermost first: pp, dp, tp (Megatron's order: tp ranks adjacent, on one node).

    dp is inferred: world_size / (tp * pp).
    """

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    mesh: Optional[DeviceMesh] = None

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh["dp"].get_group() if self.dp > 1 else None

    logger_rank: int = 0  # see logging_rank
    ep: int = 1  # expert parallelism: a split of dp (see expert_mesh)
    # With ep > 1, a second view of the same ranks, (pp, edp, ep, tp) with dp = edp x ep: "ep" holds one copy
    # of the experts split E / ep per rank, "edp" the ranks holding the same experts.
    expert_mesh: Optional[DeviceMesh] = None

    @property
    def is_logger(self) -> bool:
        return self.rank == self.logger_rank

    def experts_mesh(self) -> Optional[DeviceMesh]:
        """The mesh dims that split the routed experts: "ep" (E / ep each) and "tp" (a slice of each expert's
        inner width); None when neither does."""
        names = tuple(name for name, size in (("ep", self.ep), ("tp", self.tp)) if size > 1)
        if not names:
            return None
        return (self.expert_mesh if self.ep > 1 else self.mesh)[names]


def logging_rank(parallel: ParallelConfig, world_size: int) -> int:
    """The one rank that prints and writes TensorBoard: coordinates (pp, dp=0, tp=0) with pp the rank
    holding the last pipeline stage, because the per-channel sums exist only there. That is the last
    pp rank, except for ZBV, whose V of stages ends back on pp rank 0."""
    last = 0 if parallel.schedule == "zbv" else parallel.pp - 1
    return last * world_size // parallel.pp


def check_layout(parallel: ParallelConfig, world_size: int) -> int:
    """Returns dp; raises UsageError on a layout this world cannot hold. Pure: safe to call on every rank.
    The checks that need no world size (heads, layers, micro-batches, sequence) ran in Config.validate."""
    if world_size % (parallel.tp * parallel.pp):
        raise UsageError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {parallel.tp} x {parallel.pp}"
        )
    dp = world_size // (parallel.tp * parallel.pp)
    if dp % parallel.ep:
        raise UsageError(
            f"parallel.ep ({parallel.ep}) splits the data-parallel ranks: it must divide dp = world size / (tp x pp) = {dp}"
        )
    return dp


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("training.device is cuda but no CUDA device is visible; use training.device cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(parallel: ParallelConfig, device: torch.device, timeout_s: float = 600.0) -> ParallelDims:
    """Joins (or creates, for a plain `python train.py`) the process group and builds the mesh.

    The layout is checked from the environment before the group exists, so a bad layout stops every
    rank with the same message instead of leaving some waiting in a collective. A collective that waits
    longer than `timeout_s` (parallel.timeout_s: a peer died or hangs) raises instead of blocking forever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    dp = check_layout(parallel, world_size)
    if not dist.is_initialized():
        # gloo carries CPU tensors and Python objects (all_gather_object) even when NCCL carries CUDA ones.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:  # one process without a launcher: an in-memory store needs no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (parallel.pp, dp, parallel.tp), mesh_dim_names=("pp", "dp", "tp"))
    expert_mesh = None
    if parallel.ep > 1:  # the same rank order, dp split into (edp, ep)
        shape = (parallel.pp, dp // parallel.ep, parallel.ep, parallel.tp)
        expert_mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "edp", "ep", "tp"))
    return ParallelDims(
        world_size, rank, parallel.tp, parallel.pp, dp, mesh, logger_rank=logging_rank(parallel, world_size),
        ep=parallel.ep, expert_mesh=expert_mesh,
    )


def all_reduce_sum(value: torch.Tensor, dims: ParallelDims, over_stages: bool = False) -> torch.Tensor:
    """Sum over the data-parallel group (a no-op at dp=1); with `over_stages` also over the pipeline
    stages, for a value only the last stage computes (the others contribute zeros)."""
    if dims.dp > 1:
        dist.all_reduce(value, group=dims.mesh["dp"].get_group())
    if over_stages and dims.pp > 1:
        dist.all_reduce(value, group=dims.mesh["pp"].get_group())
    return value
