"""Spreading one model's layers over several devices in order (the embedding on the first, the head on the
last), so that a model too large for one device runs across several; outputs do not change."""

from __future__ import annotations

import torch
from torch import nn

from megatron_llm.errors import UsageError


def usable_device(name: str) -> torch.device:
    """`name` as a device of this machine, or a UsageError naming it: before a model is moved there, where torch
    would fail deep in the load (a typo: a RuntimeError; cuda without a GPU: an AssertionError)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device name like cpu, cuda or cuda:1") from None
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise UsageError(f"device {name} is not on this machine ({torch.cuda.device_count()} CUDA devices visible): "
                         "choose another, or cpu")
    return device


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
