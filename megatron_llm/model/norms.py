"""Normalisation layers: RMSNorm (default) and LayerNorm, each with the menu's options (bias, no weight,
a unit-offset weight). Where a norm sits in the block is the block's business (model/transformer.py)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply, exactly as Hugging Face's
    LlamaRMSNorm, so converted checkpoints reproduce their logits bit for bit in fp32."""

    def __init__(self, dim: int, eps: float, affine: bool = True, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 0.0 if self.unit_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gemma stores w and scales by 1 + w: the offset lives here, so checkpoints keep their own numbers.
        weight = self.weight  # read once: each read of a parameter is a module __getattr__
        if weight is not None and self.unit_offset:
            weight = 1.0 + weight
        # is_compiling first: the compiler cannot trace is_inference_mode_enabled (a graph break at every norm)
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            return _inference_norm(x, weight, self.eps)
        if weight is None:
            return normalize(x, self.eps)[0]
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            # The compiler fuses the plain ops into one kernel each way; without autograd (inference) the
            # Function's own overhead is all it would add.
            return weight * normalize(x, self.eps)[0]
        return _RMSNormFunction.apply(x, weight, self.eps)


def _inference_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The forward below through torch's rms_norm, one call instead of eight Python-level ops (a decoding step
    runs two per block at a token each, where per-op overhead is the cost). Measured bit-equal to it: in fp32
    with the weight; in any dtype without it (in bf16 rms_norm would multiply the weight before rounding, so
    the weight is applied after). Inference mode only: a tensor-parallel norm (DTensor) in training's
    evaluation keeps the plain ops."""
    if weight is not None and x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = F.rms_norm(x, (x.shape[-1],), None, eps)
    return normed if weight is None else weight * normed


def normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
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
        normed, rstd = normalize(x, eps)
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


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with an optional unit-offset weight (Nemotron's LayerNorm1P: scale by 1 + w)."""

    def __init__(self, dim: int, eps: float, affine: bool, bias: bool, unit_offset: bool):
        self.unit_offset = unit_offset  # before nn.LayerNorm's __init__, which calls reset_parameters
        super().__init__(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.unit_offset:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = 1.0 + self.weight if self.unit_offset else self.weight
        return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)


def build_norm(cfg, dim: Optional[int] = None, eps: Optional[float] = None) -> nn.Module:
    """The config's norm over `dim` (default: hidden_size) with epsilon `eps` (default: norm_eps); each has
    reset_parameters() for init_weights."""
    dim, eps = dim or cfg.hidden_size, eps or cfg.norm_eps
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps, cfg.norm_affine, cfg.norm_unit_offset)
    return LayerNorm(dim, eps, cfg.norm_affine, cfg.norm_bias, cfg.norm_unit_offset)
