"""One copy of the weights for all of a node's CPU workers (Infer): loaded once into shared memory, mapped by each.

Why a shared-memory file and not workers forked from a process holding the loaded model: a process that has
run torch ops may have started an OpenMP pool, and a child forked from it hangs in its first multi-threaded
op (GNU OpenMP is not fork-safe); a loader held to one thread would avoid that, but its workers would be its
children, not Infer's, so Infer could no longer watch them, name the one that died or stop them. Instead the
workers stay what they were (forked from the fork server, which never runs a torch op) and only the weights
move: Infer creates an anonymous memory file (memfd), the process that checks the prompts loads the
checkpoint straight into it (mapped shared: each tensor is written once, in place, on all the cores; peak
about one copy plus the group in flight), and each worker maps the same file privately and builds its model
around views of it. The file's pages are in memory once, whoever maps them: the kernel counts each worker's
PSS as its share of them. A worker only reads them; a write (none happens) would copy that page for that
worker alone, never reach another. The file has no name: multiprocessing hands each process its descriptor
with the arguments, and the kernel frees the memory when the last worker exits, so a crash leaves nothing
behind (no /dev/shm file to clean up).

Shared: every state-dict entry (parameters and kept buffers), at an offset both sides compute from the meta
model, so nothing but the descriptor is passed. Not shared, per worker: the buffers derived from the config
(RoPE tables, ALiBi slopes: small), the KV cache and activations. GPU workers load their own copy onto their
device, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from megatron_llm.checkpoint.convert import detect_format, fill_model, open_reader
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model import Transformer, meta_model

ALIGN = 64  # bytes: every tensor starts on a cache line, as the allocator would place it


def load_shared(model_path: str, dtype: torch.dtype, weights: int) -> None:
    """Loads the checkpoint into the memory file `weights` (a descriptor; sized here), every tensor written in
    place."""
    reader = open_reader(detect_format(model_path), Path(model_path))
    model = _meta_model(reader.config, dtype)
    os.ftruncate(weights, _layout(model)[1])
    fill_model(reader, _placed(model, weights, shared=True), model_path)


def map_shared(model_path: str, cfg: ModelConfig, dtype: torch.dtype, weights: int) -> Transformer:
    """The model whose weights load_shared wrote to the file `weights`, its tensors views of a private mapping."""
    model = _meta_model(cfg, dtype)
    if os.fstat(weights).st_size != _layout(model)[1]:
        raise UsageError(f"the shared weights of {model_path} do not match its config (a checkpoint changed "
                         "while loading?); run the same command again")
    return _placed(model, weights, shared=False).eval()


def mapped_file(tensor: torch.Tensor) -> str:
    """The file mapped where `tensor`'s data lies, as /proc/self/maps names it with its inode ('' for anonymous
    memory): the same memfd inode in every worker when the weights are shared."""
    address, maps = tensor.data_ptr(), Path("/proc/self/maps")
    for line in (maps.read_text() if maps.exists() else "").splitlines():
        span, _, _, _, inode, *path = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return f"{path[0]} (inode {inode})" if path and inode != "0" else ""
    return ""


def _meta_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    model = meta_model(cfg, dtype)  # what build_model allocates, not yet allocated
    model.tie_weights()  # a tied head is the embedding's entry: one place in the file
    return model


def _layout(model: Transformer) -> tuple[dict[int, int], int]:
    """(byte offset in the file of each state-dict tensor, by id; the file's size). Tied names share one."""
    offsets, size = {}, 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in offsets:
            offsets[id(tensor)] = size
            size += -(-tensor.nbytes // ALIGN) * ALIGN
    return offsets, size


def _placed(model: Transformer, weights: int, shared: bool) -> Transformer:
    """`model` (on meta) with its state-dict tensors views of `weights` mapped shared (writes reach the file) or
    privately (a worker's: reads see the file), and its derived buffers allocated and computed."""
    offsets, size = _layout(model)
    data = torch.from_file(f"/proc/self/fd/{weights}", shared=shared, size=size, dtype=torch.uint8)
    placed: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in placed:
            start = offsets[id(tensor)]
            view = data[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            placed[id(tensor)] = nn.Parameter(view, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else view
        module, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        table[leaf] = placed[id(tensor)]
    for module in model.modules():  # what the state dict leaves out: buffers derived from the config
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    model.init_buffers()
    return model
