"""AdamW with decoupled weight decay and Megatron's no-decay rules."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_llm.config import OptimizerConfig


def _decays(name: str, param: nn.Parameter, cfg: OptimizerConfig) -> bool:
    # Norm gains and biases are 1-D; decaying them pulls scales towards 0 and hurts, as in Megatron.
    if param.ndim < 2:
        return cfg.decay_norms_and_biases
    if "tok_embeddings." in name:  # also under a wrapper prefix such as DDP's "module."
        return cfg.decay_embeddings
    return True


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    # (decays, is a DTensor) -> params. A foreach/fused update runs per group and cannot mix DTensor
    # parameters (tensor parallelism) with plain ones (norms without sequence parallelism).
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    # A tied head is yielded once, under tok_embeddings; on a pipeline's last stage it is a copy of the
    # embedding (PipelineModel.tied_copy) and follows the embedding's rule.
    tied_copy = getattr(model, "tied_copy", None)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param is tied_copy:
            name = "tok_embeddings.weight"
        groups.setdefault((_decays(name, param, cfg), isinstance(param, DTensor)), []).append(param)
    # fused: one kernel per parameter for the whole update. On CUDA it is the fastest AdamW; on CPU
    # (torch 2.13) it measured 3.5-8x faster than foreach for a 100M model, ~5-10% of its step.
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0} for (decays, _), ps in sorted(groups.items())],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True,
    )
