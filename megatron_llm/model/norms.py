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
        if torch.compiler.is_compiling():  # the compiler fuses the plain ops into one kernel each way
            return self.weight * _normalize(x, self.eps)[0]
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x) cast back to x's dtype, 1 / rms(x) [..., 1] in fp32)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """The forward of the plain ops above with a hand-derived backward: with y = x * rstd,
    dx = rstd * (dy - y * mean(dy * y)). Autograd through the plain ops makes about twice the passes
    over [tokens, dim] (pow, mean and their products each get their own); on CPU, where these
    memory-bound passes are a visible part of a step, this halves the norm's cost. Gradients match
    autograd's to fp32 rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = _normalize(x, eps)
        ctx.save_for_backward(x, weight, normed, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, normed, rstd = ctx.saved_tensors
        grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        dy = (grad * weight).to(normed.dtype).float()  # autograd rounds it to normed's dtype too
        y = normed if normed.dtype == torch.float32 else x.float() * rstd  # unrounded under bf16
        grad_x = torch.addcmul(dy, y, (dy * y).mean(-1, keepdim=True), value=-1).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """'rmsnorm' or 'layernorm' (with bias); both have reset_parameters() for init_weights."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=True)
    raise ValueError(f"unknown norm {kind!r}")
