"""Normalisation layers: RMSNorm (default) and LayerNorm, both applied before each sublayer (pre-norm)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply, exactly as Hugging Face's
    LlamaRMSNorm, so converted checkpoints reproduce their logits bit for bit in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """'rmsnorm' or 'layernorm' (with bias); both have reset_parameters() for init_weights."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=True)
    raise ValueError(f"unknown norm {kind!r}")
