"""Autoregressive generation over token ids: a batch of prompts of different lengths (left-padded, positions
from the padding mask), a KV cache owned here, greedy or sampled decoding, per-row stopping.

The model is any megatron_llm Transformer; nothing here is used by training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from megatron_llm.errors import UsageError
from megatron_llm.model.attention_kernels import NO_MASK, KeyMask
from megatron_llm.model.kv_cache import KVCache


@dataclass
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the temperature-scaled
    distribution cut to the top_k tokens and to the smallest set whose probability reaches top_p
    (in that order, as transformers applies them)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_tokens: frozenset = field(default_factory=frozenset)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # nan too: it would reach torch.multinomial
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be positive or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] or None, got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[b, vocab] fp32 logits -> [b] token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the first token past top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens + max_new_tokens > context:
        raise UsageError(
            f"a prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens: shorten the prompt or ask for fewer tokens"
        )


@contextlib.contextmanager
def last_position_only(model: nn.Module) -> Iterator[None]:
    """Within it, the model's final norm and head see each row's last position only, the one the next token
    is chosen from: a prompt's forward would otherwise compute logits [b, s, vocab] to keep one column (at a
    128k vocabulary and 4096 prompt tokens, 2 GiB a row in fp32). The model is untouched: a pre-hook cuts
    the hidden states."""
    first = model.norm if model.norm is not None else model.output
    handle = first.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def left_padded(prompts: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [b, longest], valid [b, width], positions [b, longest]) of prompts left-padded to the longest, so
    every row's last prompt token is at the same index; valid is True from each row's first token on (columns
    past the prompts included), and each row's positions count from its own first token."""
    longest = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    valid = torch.ones(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, : longest - len(prompt)] = False
    return tokens, valid, (valid[:, :longest].cumsum(-1) - 1).clamp(min=0)


def finished(tokens: list[int], limit: int, sampling: Sampling, stopped: Optional[Callable[[int, list[int]], bool]],
             row: int) -> bool:
    """Whether a row whose new tokens are `tokens` is done: at a stop token, at its `limit` of new tokens, or
    when `stopped(row, tokens)` says so."""
    return tokens[-1] in sampling.stop_tokens or len(tokens) >= limit or (stopped is not None and stopped(row, tokens))


@torch.inference_mode()  # no autograd bookkeeping (version counters, view tracking) on each small op of a step
def stream_ids(
    model: nn.Module, prompts: list[list[int]], sampling: Sampling, stopped: Optional[Callable[[int, list[int]], bool]] = None,
    limits: Optional[list[int]] = None,
) -> Iterator[list[Optional[int]]]:
    """Yields, after each decoding step, the new token of every row (None for rows already finished).
    A row finishes at a stop token (which is yielded), after its `limits[row]` tokens (default: the sampling's
    max_new_tokens) or when `stopped(row, its tokens so far)` says so. Finished rows still ride along in the
    batch until every row is done: static batching."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    limits = [sampling.max_new_tokens] * len(prompts) if limits is None else limits
    device = next(model.parameters()).device
    longest, batch = max(map(len, prompts)), len(prompts)
    check_fits(longest, max(limits), model.cfg.max_seq_len)
    total = longest + max(limits)
    tokens, valid, positions = left_padded(prompts, total, device)
    padded = bool((~valid[:, :longest]).any())
    cache = KVCache(total)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    keys = KeyMask(valid=valid[:, :longest]) if padded else NO_MASK
    with last_position_only(model):
        logits = model(tokens, positions=positions, keys=keys, cache=cache).select(1, -1).float()  # [b, vocab]
    positions = positions[:, -1:]  # [b, 1], advanced by one each step
    done = [False] * batch
    produced: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(limits)):
        picked = next_tokens(logits, sampling, generator)  # [b]
        chosen = picked.tolist()
        step: list[Optional[int]] = []
        for row, token in enumerate(chosen):
            if done[row]:
                step.append(None)
                continue
            produced[row].append(token)
            step.append(token)
            done[row] = finished(produced[row], limits[row], sampling, stopped, row)
        yield step
        if all(done):
            return
        positions = positions + 1
        keys = KeyMask(valid=valid[:, : cache.length + 1]) if padded else NO_MASK
        logits = model(picked.unsqueeze(1), positions=positions, keys=keys, cache=cache).select(1, -1).float()


def generate_ids(model: nn.Module, prompts: list[list[int]], sampling: Sampling,
                 stopped: Optional[Callable[[int, list[int]], bool]] = None,
                 limits: Optional[list[int]] = None) -> list[list[int]]:
    """The new tokens of every prompt (a stop token included, as transformers returns it)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_ids(model, prompts, sampling, stopped, limits):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out
