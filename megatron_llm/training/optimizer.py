"""AdamW with decoupled weight decay and Megatron's no-decay rules."""

import torch
from torch import nn

from megatron_llm.config import OptimizerConfig


def _decays(name: str, param: nn.Parameter, cfg: OptimizerConfig) -> bool:
    # Norm gains and biases are 1-D; decaying them pulls scales towards 0 and hurts, as in Megatron.
    if param.ndim < 2:
        return cfg.decay_norms_and_biases
    if "tok_embeddings." in name:  # also under a wrapper prefix such as DDP's "module."
        return cfg.decay_embeddings
    return True


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a tied head is yielded once, under tok_embeddings
        if not param.requires_grad:
            continue
        (decay if _decays(name, param, cfg) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    # fused is the fastest AdamW on CUDA; foreach is on CPU.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=on_cuda, foreach=not on_cuda
    )
