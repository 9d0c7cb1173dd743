"""Deterministic, resumable batches in Megatron's order (MegatronPretrainingSampler).

The global batch of step k is samples [k*G, (k+1)*G) of the train dataset, G = micro * accum * dp.
Micro-batch m of data-parallel rank r is samples k*G + m*(micro*dp) + r*micro + [0, micro): the dp
ranks together see one contiguous slice per accumulation step, so the global batch does not depend on
how it is split. The position is a pure function of the consumed samples (k*G), which the checkpoint
stores, so resuming is exact.

The dataset is sized by megatron-core to the requested number of samples (steps * G), so indices
never run past its end in a correctly configured run; if they do (more steps than it was built for),
they wrap around to the start rather than fail.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """megatron-core samples -> tokens, labels: Long[b, s]; loss_mask: Float[b, s]; channel: Long[b], or
    Long[b, s] when a sample's tokens carry their own (packed conversations); positions and documents:
    Long[b, s] when the samples have them (document masks); last: Long[b] for preference pairs."""
    batch = {
        "tokens": torch.stack([s["tokens"] for s in samples]),  # [b, s]
        "labels": torch.stack([s["labels"] for s in samples]),  # [b, s]: tokens shifted left by one
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),  # [b, s]
        "channel": torch.as_tensor(np.stack([s["dataset_id"] for s in samples]), dtype=torch.long),  # [b] or [b, s]
    }
    for key in ("positions", "documents", "last"):  # last: [b], a preference row's last real token
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])  # [b, s]
    return batch


def micro_batch_indices(first: int, micro_batch_size: int, dp_rank: int, dp_size: int, length: int) -> list[int]:
    """Rank dp_rank's share of the micro*dp samples starting at `first`, wrapped at `length`."""
    start = first + dp_rank * micro_batch_size
    return [(start + i) % length for i in range(micro_batch_size)]


class _StepSampler:
    """Batch sampler for DataLoader workers: the index lists of every micro-batch from start_sample on."""

    def __init__(self, batches: "TrainBatches", start_sample: int):
        self.batches, self.start_sample = batches, start_sample

    def __iter__(self) -> Iterator[list[int]]:
        first = self.start_sample
        while True:
            for m in range(self.batches.grad_accum_steps):
                yield self.batches.indices(first, m)
            first += self.batches.global_batch_size


class TrainBatches:
    """`next_step()` returns the grad_accum_steps micro-batch dicts of this rank for the global batch
    starting at sample `self.next_sample`. The position is a sample count (what a checkpoint records
    as consumed_samples), so a run may resume with another global batch size.

    With num_workers > 0 a DataLoader prefetches them in worker processes, in the same order.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_size: int,
        start_sample: int = 0,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.next_sample = start_sample
        self._length = len(dataset)
        self._prefetched: Optional[Iterator[dict]] = None
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=_StepSampler(self, start_sample), num_workers=num_workers, collate_fn=collate
            )
            self._prefetched = iter(loader)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    def indices(self, batch_start: int, micro: int) -> list[int]:
        first = batch_start + micro * self.micro_batch_size * self.dp_size
        return micro_batch_indices(first, self.micro_batch_size, self.dp_rank, self.dp_size, self._length)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._prefetched is not None:
            batches = [next(self._prefetched) for _ in range(self.grad_accum_steps)]
        else:
            batches = [
                collate([self.dataset[i] for i in self.indices(self.next_sample, m)]) for m in range(self.grad_accum_steps)
            ]
        self.next_sample += self.global_batch_size
        return batches


def eval_batches(
    dataset: torch.utils.data.Dataset, micro_batch_size: int, n: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """n micro-batches for this rank: always the same samples, the first n*micro*dp of the dataset."""
    for j in range(n):
        indices = micro_batch_indices(j * micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size, len(dataset))
        yield collate([dataset[i] for i in indices])
