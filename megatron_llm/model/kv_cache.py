"""A key/value cache for incremental decoding, owned by the caller (inference/), never stored on modules:
the model receives it through the attention context, so training code never sees one. Linear-attention layers
(model/linear_attention.py) keep their recurrent state in it instead of keys and values."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVCache:
    """Keys and values of every attention layer for one batch, in buffers [b, kv_heads, max_len, d] allocated
    at a layer's first write. All layers of a forward write at the same offset, `length`; the model's
    forward advances it by the tokens it added. (inference/batching.py has one whose rows differ in length.)"""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recurrent(self, layer: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A linear-attention layer's (convolution history, recurrent state) after the tokens so far, or None."""
        return self.states.get(id(layer))

    def keep(self, layer: nn.Module, history: torch.Tensor, state: torch.Tensor) -> None:
        """Replaces `layer`'s state: history [b, channels, kernel - 1], state [b, heads, d_k, d_v] (fp32)."""
        self.states[id(layer)] = (history, state)

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this forward's k, v [b, kv_heads, s, d] for `layer`; returns all of its keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; this forward needs {end}")
        key = id(layer)
        if key not in self.buffers:
            shape = (k.shape[0], k.shape[1], self.max_len)  # values may be narrower than keys (MLA's v_head_dim)
            self.buffers[key] = (k.new_empty(*shape, k.shape[3]), v.new_empty(*shape, v.shape[3]))
        k_all, v_all = self.buffers[key]
        k_all.narrow(2, self.length, k.shape[2]).copy_(k)  # narrow: one op, where [:, :, a:b] takes three slices
        v_all.narrow(2, self.length, v.shape[2]).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, tokens: int) -> None:
        """Called by the model's forward once every layer has written its `tokens` new positions."""
        self.length += tokens
