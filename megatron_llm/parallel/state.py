"""Model and optimizer state in a form that does not depend on the layout, for DCP checkpoints.

`get_state_dict` already names every tensor by its full-model name with its global shape (DTensor
shards carry their offsets), and the optimizer state is flattened to one key per parameter and field
("state.layers.3.attention.wq.weight.exp_avg"), so the stages of a pipeline never write the same key
(torchtitan's checkpoint docstring explains the collision of unflattened param_groups). Two layout
details are undone here:
  - vocabulary padding (tensor parallelism): saved tensors keep only the real vocabulary rows;
  - a tied head on the last pipeline stage is a copy of the embedding: its optimizer state is saved
    and loaded under the embedding's name, as one process (one shared parameter) has it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
EMBEDDING, HEAD, HEAD_BIAS = "tok_embeddings.weight", "output.weight", "output.bias"


def layout_free_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """(model state, optimizer state) to save, or to use as the template DCP loads into. Without an
    optimizer the second is {}."""
    model_sd, optim_sd = _state(model, optimizer)
    for sd in (model_sd, optim_sd):
        for key, value in sd.items():
            vocab = _vocab_rows(key, value, model.cfg)
            if vocab is not None and value.shape[0] > vocab:
                full = value.full_tensor() if isinstance(value, DTensor) else value
                sd[key] = full[:vocab].clone()  # [vocab, ...], the same on every rank
    if getattr(model, "tied_copy", None) is not None:
        optim_sd = _rename_head_state(optim_sd, has_embedding=hasattr(model, "tok_embeddings"))
    return model_sd, optim_sd


def load_layout_free_state(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd: dict, optim_sd: dict
) -> None:
    """Inverse of layout_free_state: `model_sd`/`optim_sd` are its output filled in by dcp.load."""
    current_model, current_optim = _state(model, optimizer)
    if getattr(model, "tied_copy", None) is not None:
        optim_sd = _restore_head_state(optim_sd, current_optim)
    for loaded, current in ((model_sd, current_model), (optim_sd, current_optim)):
        for key, value in current.items():
            if _vocab_rows(key, value, model.cfg) is not None and loaded[key].shape != value.shape:
                loaded[key] = _repad(loaded[key], value)
    if optimizer is None:
        set_model_state_dict(model, model_sd)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, dict]:
    if optimizer is None:
        return get_model_state_dict(model), {}
    return get_state_dict(model, optimizer, options=OPTIONS)


def _vocab_rows(key: str, value, cfg) -> Optional[int]:
    """The unpadded rows of a vocabulary-sized tensor (the embedding's, or the head's: fewer where it is pruned); None
    for any other."""
    if not (isinstance(value, torch.Tensor) and value.ndim >= 1):
        return None
    if EMBEDDING in key:
        return cfg.vocab_size
    return cfg.head_vocab_size if HEAD in key or HEAD_BIAS in key else None


def _repad(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[vocab, ...] -> `like`'s padded shape and placements; the pad rows are zero, as in training."""
    padded = torch.cat([rows, rows.new_zeros(like.shape[0] - rows.shape[0], *rows.shape[1:])]).to(like.device)
    if not isinstance(like, DTensor):
        return padded
    # Every rank holds the full padded tensor: each keeps its own shard, no communication.
    full = distribute_tensor(padded, like.device_mesh, [Replicate()] * like.device_mesh.ndim, src_data_rank=None)
    return full.redistribute(like.device_mesh, like.placements)


def _rename_head_state(optim_sd: dict, has_embedding: bool) -> dict:
    """Optimizer keys of the tied head copy: under the embedding's name, or dropped when this rank also
    holds the embedding (ZBV), whose state is the same."""
    out = {}
    for key, value in optim_sd.items():
        if HEAD in key:
            if has_embedding:
                continue
            key = key.replace(HEAD, EMBEDDING)
        out[key] = value
    return out


def _restore_head_state(loaded: dict, current: dict) -> dict:
    """Fills the head copy's optimizer keys from the embedding's loaded ones."""
    out = dict(loaded)
    for key in current:
        if HEAD in key:
            source = key.replace(HEAD, EMBEDDING)
            value = loaded[source]
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value  # two parameters, two states
            if source not in current:
                del out[source]
    return out
