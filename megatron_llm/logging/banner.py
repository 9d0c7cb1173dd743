"""The start-up banner: what this run is, before its first step, printed by the logging rank."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_llm.config import Config
from megatron_llm.model import count_params


def local_parameters(model: nn.Module) -> int:
    """Parameters this rank holds: its pipeline stages, its tensor-parallel and FSDP shards."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def parameters_per_rank(model: nn.Module) -> list[int]:
    """local_parameters of every rank, by global rank. A collective: every rank calls it."""
    counts: list[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local_parameters(model))
    return counts


def parameters_line(cfg: Config, spread: str) -> str:
    """The model's parameters from the model itself, built on the meta device (a tied head counts once); a
    mixture of experts' also as the ones a token passes through, what its FLOPs and MFU count."""
    active = f", {_count(count_params(cfg.model, active=True))} active per token" if cfg.model.moe_experts else ""
    return f"  parameters   {_count(count_params(cfg.model))} total{active}, {spread} per rank"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def banner(cfg: Config, dp: int, per_rank: list[int], run_dir: Optional[Path], resumed: Optional[str],
           device: torch.device) -> str:
    t, p = cfg.training, cfg.parallel
    sequences = t.micro_batch_size * t.grad_accum_steps * dp
    low, high = min(per_rank), max(per_rank)
    spread = _count(low) if low == high else f"{_count(low)} to {_count(high)}"
    saves = f"every {cfg.checkpoint.interval} steps and at the end" if cfg.checkpoint.interval else "at the end"
    evaluation = f"every {t.eval_interval} steps and at the end, {t.eval_iters} batches per channel" if t.eval_interval else "off"
    lines = [
        f"run {cfg.logging.run_name}",
        parameters_line(cfg, spread),
        f"  layout       {len(per_rank)} rank{'s' if len(per_rank) > 1 else ''}: tp={p.tp} pp={p.pp} dp={dp}"
        f"{f' ep={p.ep}' if p.ep > 1 else ''} ({p.data_parallel}, sp {'on' if p.sp else 'off'}, "
        f"schedule {p.schedule}) on {device.type}",
        f"  global batch {sequences} sequences x {cfg.data.seq_len} tokens = {sequences * cfg.data.seq_len:,} tokens "
        f"({t.micro_batch_size} per micro-batch x {t.grad_accum_steps} micro-batches x dp {dp})",
        f"  steps        {t.steps}; evaluation {evaluation}",
        f"  checkpoints  {cfg.checkpoint.dir} ({saves})",
        f"  tensorboard  {run_dir or 'off'}" + (f"; wandb project {cfg.logging.wandb_project}" if cfg.logging.wandb_project else ""),
        f"  resumed from {resumed or '- (a fresh start)'}",
    ]
    return "\n".join(lines)
