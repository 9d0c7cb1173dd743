"""Rotary position embeddings in Hugging Face's rotate-half (non-interleaved) layout.

Rotate-half pairs dimension j with j + head_dim/2 (Hugging Face and Megatron) where Meta's original
code pairs 2j with 2j+1. Using the Hugging Face layout means q/k weights copy across with no row
permutation. The tables hold only head_dim/2 columns: the two halves share each frequency.
"""

import math
from typing import Optional

import torch


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 scaling when `scaling` is given.

    Follows transformers' `_compute_llama3_parameters` operation for operation, so the fp32 values match
    exactly: wavelengths shorter than original_len/high_freq_factor are kept, longer than
    original_len/low_freq_factor are divided by `factor`, and those between are interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: Optional[dict], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_seq_len, head_dim/2] in fp32."""
    inv_freq = rope_frequencies(head_dim, theta, scaling).to(device)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)  # [s, d/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [b, s, heads, head_dim] by position. The tables are sliced here, to the length x has,
    so a sequence-parallel caller can pass the whole table. Computed in fp32 and cast back: a bf16
    rotation loses precision at large angles for no speed worth having."""
    s = x.shape[1]
    cos, sin = cos[:s, None, :], sin[:s, None, :]  # [s, 1, d/2], broadcast over heads
    if torch.compiler.is_compiling():  # the compiler fuses the plain ops into one kernel each way
        x1, x2 = x.float().chunk(2, dim=-1)  # each [b, s, heads, d/2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return _RotateFunction.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1 cos - x2 sin, x2 cos + x1 sin), each half written in place into one fp32 output: the same
    roundings as the plain expression, without its temporaries and concatenation."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each [b, s, heads, d/2]
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).sub_(x2 * sin)
    torch.mul(x2, cos, out=out2).add_(x1 * sin)
    return out


class _RotateFunction(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation (by -angle) of the output gradient: one more
    _rotate in backward, where autograd would replay the four products, a negation and the split.
    Outputs and gradients are bit-identical to autograd through the plain expression."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin).to(grad.dtype), None, None
