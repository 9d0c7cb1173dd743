"""Spreading one model's layers over several devices in order (the embedding on the first, the head on the
last), so that a model too large for one device runs across several; outputs do not change."""

from __future__ import annotations

import torch
from torch import nn


def spread_over(model: nn.Module, devices: list[torch.device]) -> list:
    """Moves `model`'s parts and installs hooks that carry the hidden states (and the attention context)
    across device boundaries; returns the hook handles (remove them to undo the hooks)."""
    if not devices:
        raise ValueError("set_device needs at least one device")
    model.to(devices[0])  # the embeddings and the tables the attention context is built from
    layers = list(model.layers.values())
    per_device = -(-len(layers) // len(devices))  # ceil: the last device may hold fewer
    handles = []
    for index, block in enumerate(layers):
        device = devices[min(index // per_device, len(devices) - 1)]
        block.to(device)
        handles.append(block.register_forward_pre_hook(_carry_to(device)))
    for name in ("norm", "output"):
        module = getattr(model, name)
        if module is not None:
            module.to(devices[-1])
            handles.append(module.register_forward_pre_hook(_carry_to(devices[-1])))
    return handles


def _carry_to(device: torch.device):
    def hook(module, args):
        return tuple(a.to(device) if hasattr(a, "to") else a for a in args)  # hidden states, AttentionContext

    return hook
