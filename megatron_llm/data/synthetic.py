"""Uniform random token batches, for benchmarks and memory measurements that need no corpus."""

from __future__ import annotations

import torch

from megatron_llm.config import Config


def random_batches(cfg: Config, device: torch.device, seed: int, channels: int = 1) -> list[dict]:
    """training.grad_accum_steps micro-batches of training.micro_batch_size x data.seq_len random tokens,
    every label counted, each sample in one of `channels` random channels."""
    t, seq = cfg.training, cfg.data.seq_len
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(t.grad_accum_steps):
        # ids the head predicts: a pruned head (model.output_vocab_size) has no row for the others' labels
        ids = torch.randint(0, cfg.model.head_vocab_size, (t.micro_batch_size, seq + 1), generator=gen)
        out.append({
            "tokens": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device),  # [b, s] each, next-token
            "loss_mask": torch.ones(t.micro_batch_size, seq, device=device),
            "channel": torch.randint(0, channels, (t.micro_batch_size,), generator=gen).to(device),
        })
    return out
