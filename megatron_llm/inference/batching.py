"""Continuous batching: a fixed number of slots decode together, and when a sequence finishes, the next
prompt takes its slot at once instead of waiting for the whole batch (static batching).

Each slot's sequence starts at column 0 of its cache row, so rows have different lengths. The next requests
are prefilled together, `slots` at a time (left-padded, their own KVCache), and each is copied into a row
when one frees. Decoding steps run all slots at once, each row writing its new key at its own column and
attending to its own columns (KeyMask.valid and query_end). Every request has its own max_new_tokens, as a server's do.
Greedy results equal generate()'s for each prompt alone.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from megatron_llm.inference.generate import Sampling, check_fits, finished, last_position_only, left_padded, next_tokens
from megatron_llm.model.attention_kernels import KeyMask
from megatron_llm.model.kv_cache import KVCache

Request = tuple[object, list[int], int]  # (key, prompt token ids, max_new_tokens)


class SlotCache:
    """A KV cache whose rows (slots) hold sequences of different lengths, each from column 0. Buffers are
    allocated once, at the first prefill; a decoding step's positions and mask are built once per step
    (step_inputs), not per layer."""

    def __init__(self, slots: int, max_len: int, device):
        self.max_len = max_len
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # positions filled, per row
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.columns = torch.arange(max_len, device=device)
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._end = 0  # this step's key count: the longest row's length + 1

    def insert(self, slot: int, prefilled: KVCache, row: int, start: int) -> None:
        """Row `slot` takes row `row` of a batch prefilled together, whose prompt began at column `start`
        (left padding before it)."""
        n = prefilled.length - start
        for key, (k, v) in prefilled.buffers.items():
            if key not in self.buffers:  # values at their own width: latent attention's are narrower than its keys
                rows = len(self.lengths)
                self.buffers[key] = (k.new_zeros(rows, k.shape[1], self.max_len, k.shape[3]),
                                     v.new_zeros(rows, v.shape[1], self.max_len, v.shape[3]))
            k_all, v_all = self.buffers[key]
            k_all[slot, :, :n], v_all[slot, :, :n] = k[row, :, start:prefilled.length], v[row, :, start:prefilled.length]
        self.lengths[slot], self.active[slot] = n, True

    def release(self, slot: int) -> None:
        self.active[slot] = False

    def step_inputs(self, longest: int) -> tuple[torch.Tensor, KeyMask]:
        """(positions [slots, 1], the key mask) of the next decoding step; `longest` is the longest row's
        length (the caller tracks it on the host: no device sync per step)."""
        self._end = longest + 1
        valid = self.columns[None, : self._end] <= self.lengths[:, None]  # [slots, end]
        return self.lengths[:, None], KeyMask(valid=valid, query_end=self.lengths)

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step's k, v [slots, kv_heads, 1, d], each row at its own column."""
        k_all, v_all = self.buffers[id(layer)]
        column = self.lengths[:, None, None, None]  # each row's write column, expanded (a view) to k's and v's shapes
        k_all.scatter_(2, column.expand(k.shape), k)
        v_all.scatter_(2, column.expand(v.shape), v)
        return k_all[:, :, : self._end], v_all[:, :, : self._end]

    def advance(self, tokens: int) -> None:
        self.lengths += tokens * self.active  # free rows keep writing at column 0, harmlessly


@dataclass
class Prefilled:
    """A request whose prompt has been run (row `row` of a batch prefilled together, its prompt from column
    `start` of that batch's cache) and whose first token is chosen, waiting for a slot."""

    key: object
    tokens: list[int]  # new tokens so far: the first
    limit: int  # the request's max_new_tokens
    length: int  # prompt tokens
    cache: KVCache
    row: int
    start: int


@torch.inference_mode()  # as generate: no autograd bookkeeping on the small ops of a step
def continuous_batches(
    model: nn.Module, requests: Iterable[Request], sampling: Sampling, slots: int,
    stopped: Optional[Callable[[int, list[int]], bool]] = None,
) -> Iterator[tuple[object, list[int]]]:
    """(key, new tokens) for each request, in the order they finish, `slots` sequences at a time. A row
    finishes at a stop token, at its request's max_new_tokens, or when `stopped(slot, its tokens)` says so.
    Prompts are prefilled `slots` at a time, ahead of need: a slot that frees alone takes a waiting request
    instead of running a forward of its own (one prefill per slot freed was ~8% of the forwards)."""
    device = next(model.parameters()).device
    pending = iter(requests)
    cache = SlotCache(slots, model.cfg.max_seq_len, device)
    owner: list = [None] * slots  # the key of each slot's sequence, None when free
    produced: list[list[int]] = [[] for _ in range(slots)]
    limit = [0] * slots  # each slot's max_new_tokens
    length = [0] * slots  # each slot's cache length, on the host
    last = torch.zeros(slots, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    ready: collections.deque[Prefilled] = collections.deque()

    def take(slot: int) -> tuple[list[tuple[object, list[int]]], Optional[Prefilled]]:
        """(requests done at their first token, met on the way; the next request to start in `slot`, or None)."""
        done = []
        while True:
            if not ready:
                batch = list(itertools.islice(pending, slots))
                if not batch:
                    return done, None
                ready.extend(_prefill(model, batch, sampling, generator, device, cache.max_len))
            request = ready.popleft()
            if not finished(request.tokens, request.limit, sampling, stopped, slot):
                return done, request
            done.append((request.key, request.tokens))  # no slot needed

    while True:
        for slot in [s for s in range(slots) if owner[s] is None]:
            done, request = take(slot)
            yield from done
            if request is None:
                break
            cache.insert(slot, request.cache, request.row, request.start)
            owner[slot], produced[slot], limit[slot] = request.key, request.tokens, request.limit
            length[slot], last[slot] = request.length, request.tokens[0]
        if all(o is None for o in owner):
            return
        positions, keys = cache.step_inputs(max(n for n, o in zip(length, owner) if o is not None))
        logits = model(last[:, None], positions=positions, keys=keys, cache=cache)[:, -1].float()
        chosen = next_tokens(logits, sampling, generator)
        last.copy_(chosen)
        for slot, token in enumerate(chosen.tolist()):  # one transfer to the host per step
            if owner[slot] is None:
                continue
            produced[slot].append(token)
            length[slot] += 1
            if finished(produced[slot], limit[slot], sampling, stopped, slot):
                yield owner[slot], produced[slot]
                owner[slot] = None
                cache.release(slot)


def _prefill(model, requests: list[Request], sampling: Sampling, generator, device, context: int) -> list[Prefilled]:
    """Runs the requests' prompts together (left-padded, as generate does) into one KVCache; each comes back
    with its first new token."""
    prompts = [prompt for _, prompt, _ in requests]
    for prompt, (_, _, new_tokens) in zip(prompts, requests):
        check_fits(len(prompt), new_tokens, context)
    longest = max(map(len, prompts))
    tokens, valid, positions = left_padded(prompts, longest, device)
    keys = KeyMask(valid=valid) if not valid.all() else KeyMask()
    together = KVCache(longest)
    with last_position_only(model):
        logits = model(tokens, positions=positions, keys=keys, cache=together)[:, -1].float()
    firsts = next_tokens(logits, sampling, generator).tolist()
    return [Prefilled(key, [first], new_tokens, len(prompt), together, row, longest - len(prompt))
            for row, ((key, prompt, new_tokens), first) in enumerate(zip(requests, firsts))]
