"""Continuous batching: a fixed number of slots decode together, and when a sequence finishes, the next
prompt takes its slot at once instead of waiting for the whole batch (static batching).

Each slot's sequence starts at column 0 of its cache row, so rows have different lengths: the prompts that
take free slots are prefilled together (left-padded, their own KVCache) and each is copied into its row;
decoding steps run all slots at
once, each row writing its new key at its own column and attending to its own columns (KeyMask.valid and
query_end). Greedy results equal generate()'s for each prompt alone.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from megatron_llm.inference.generate import Sampling, next_tokens
from megatron_llm.model.attention_kernels import KeyMask
from megatron_llm.model.kv_cache import KVCache


class SlotCache:
    """A KV cache whose rows (slots) hold sequences of different lengths, each from column 0."""

    def __init__(self, slots: int, max_len: int):
        self.max_len = max_len
        self.lengths = torch.zeros(slots, dtype=torch.long)  # positions filled, per row
        self.active = torch.zeros(slots, dtype=torch.bool)
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def insert(self, slot: int, prefilled: KVCache, row: int, start: int) -> None:
        """Row `slot` takes row `row` of a batch prefilled together, whose prompt began at column `start`
        (left padding before it)."""
        n = prefilled.length - start
        for key, (k, v) in prefilled.buffers.items():
            if key not in self.buffers:
                shape = (len(self.lengths), k.shape[1], self.max_len, k.shape[3])
                self.buffers[key] = (k.new_zeros(shape), v.new_zeros(shape))
            k_all, v_all = self.buffers[key]
            k_all[slot, :, :n], v_all[slot, :, :n] = k[row, :, start:], v[row, :, start:]
        self.lengths[slot], self.active[slot] = n, True

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step's k, v [slots, kv_heads, 1, d], each row at its own column."""
        k_all, v_all = self.buffers[id(layer)]
        rows = torch.arange(len(self.lengths), device=k.device)
        columns = self.lengths.to(k.device)
        k_all[rows, :, columns], v_all[rows, :, columns] = k[:, :, 0], v[:, :, 0]
        end = int(self.lengths.max()) + 1
        return k_all[:, :, :end], v_all[:, :, :end]

    def advance(self, tokens: int) -> None:
        self.lengths += tokens * self.active  # free rows keep writing at column 0, harmlessly

    def step_inputs(self, device) -> tuple[torch.Tensor, KeyMask]:
        """(positions [slots, 1], the key mask) of the next decoding step."""
        end = int(self.lengths.max()) + 1
        lengths = self.lengths.to(device)
        valid = torch.arange(end, device=device)[None, :] <= lengths[:, None]  # [slots, end]
        return lengths[:, None], KeyMask(valid=valid, query_end=lengths)


@torch.no_grad()
def continuous_batches(
    model: nn.Module, prompts: Iterable[tuple[object, list[int]]], sampling: Sampling, slots: int,
    stopped: Optional[Callable[[int, list[int]], bool]] = None,
) -> Iterator[tuple[object, list[int]]]:
    """(key, new tokens) for each (key, prompt ids), in the order they finish, `slots` sequences at a time."""
    device = next(model.parameters()).device
    pending = iter(prompts)
    cache = SlotCache(slots, model.cfg.max_seq_len)
    owner: list = [None] * slots  # the key of each slot's sequence, None when free
    produced: list[list[int]] = [[] for _ in range(slots)]
    last = torch.zeros(slots, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None

    def finish(slot: int) -> bool:
        tokens = produced[slot]
        return (tokens[-1] in sampling.stop_tokens or len(tokens) >= sampling.max_new_tokens
                or (stopped is not None and stopped(slot, tokens)))

    exhausted = False
    while True:
        free = [slot for slot in range(slots) if owner[slot] is None]
        while free and not exhausted:  # fill free slots, their prompts prefilled together
            items = [item for item in itertools.islice(pending, len(free))]
            exhausted = len(items) < len(free)
            if not items:
                break
            firsts = _prefill(model, [prompt for _, prompt in items], sampling, cache, free, generator, device)
            for slot, (key, _), first in zip(free, items, firsts):
                owner[slot], produced[slot], last[slot] = key, [first], first
                if finish(slot):  # a prompt may finish at its first token: its slot is free again
                    yield key, produced[slot]
                    owner[slot], cache.active[slot] = None, False
            free = [slot for slot in range(slots) if owner[slot] is None]
        if all(o is None for o in owner):
            return
        positions, keys = cache.step_inputs(device)
        logits = model(last[:, None], positions=positions, keys=keys, cache=cache)[:, -1].float()
        chosen = next_tokens(logits, sampling, generator)
        for slot in range(slots):
            if owner[slot] is None:
                continue
            produced[slot].append(int(chosen[slot]))
            last[slot] = chosen[slot]
            if finish(slot):
                yield owner[slot], produced[slot]
                owner[slot], cache.active[slot] = None, False


def _prefill(model, prompts: list[list[int]], sampling: Sampling, cache: SlotCache, slots: list[int], generator,
             device) -> list[int]:
    """Runs `prompts` together (left-padded, as generate does), moves each one's keys and values into its slot
    of `slots`; returns their first new tokens."""
    longest = max(map(len, prompts))
    if longest + sampling.max_new_tokens > cache.max_len:
        raise ValueError(f"a prompt of {longest} tokens plus {sampling.max_new_tokens} new ones exceeds the "
                         f"model's context of {cache.max_len}")
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, longest - len(prompt):] = True
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    keys = KeyMask(valid=valid) if not valid.all() else KeyMask()
    together = KVCache(longest)
    logits = model(tokens, positions=positions, keys=keys, cache=together)[:, -1].float()
    for row, (slot, prompt) in enumerate(zip(slots, prompts)):
        cache.insert(slot, together, row, longest - len(prompt))
    return next_tokens(logits, sampling, generator).tolist()
