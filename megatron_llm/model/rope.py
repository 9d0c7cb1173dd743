"""Rotary position embeddings: rotate-half (default) or interleaved pairs, whole or partial heads, with
the frequency scalings the open families use (linear, llama3, yarn, longrope, proportional).

Rotate-half pairs dimension j with j + d/2 (Hugging Face's Llama layout and Megatron), so q/k weights
copy across with no row permutation; interleaved pairs 2j with 2j+1 (GPT-J, GLM, Cohere, Meta's
original code). The tables hold d/2 columns: the two members of a pair share each frequency.
"""

import math
from typing import Optional

import torch


def rope_frequencies(dim: int, theta: float, scaling: Optional[dict], max_seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], attention factor) for the `dim` rotated dimensions of a head.

    `scaling` is model.rope_scaling ({rope_type, ...}, transformers' names); each kind follows
    transformers' `_compute_<kind>_parameters` operation for operation, so fp32 values match exactly.
    The attention factor (YaRN, LongRoPE) multiplies cos and sin, scaling q.k by its square.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling)
    if kind == "proportional":  # the first fraction of the pairs turn at the whole head's frequencies, the rest not
        turning = int(scaling["partial_rotary_factor"] * dim // 2)
        inv_freq = torch.cat((inv_freq[:turning], torch.zeros(dim // 2 - turning)))
        return inv_freq / scaling.get("factor", 1.0), 1.0
    return _longrope(exponents, theta, scaling, max_seq_len)


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Wavelengths shorter than original_len/high_freq_factor are kept, longer than
    original_len/low_freq_factor are divided by `factor`, and those between are interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude scale (transformers' get_mscale, megatron-core's _yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the frequencies that rotate fewer than beta_slow times over the original
    context, keep those that rotate more than beta_fast times, ramp linearly between."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all else yarn_mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high += 0.001 if low == high else 0  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(exponents: torch.Tensor, theta: float, scaling: dict, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-dimension rescaling factors, the long set when the model's context
    (max_seq_len) exceeds the original one. transformers switches per forward by the sequence length;
    a trained context is one length, so we fix it by the configured one."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_seq_len / old_len
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    ext = torch.tensor(scaling["long_factor" if max_seq_len > old_len else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * theta**exponents), float(attention_factor)


def rope_tables(
    dim: int, max_seq_len: int, theta: float, scaling: Optional[dict], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_seq_len, dim/2] in fp32, times the scaling's attention factor."""
    inv_freq, attention_factor = rope_frequencies(dim, theta, scaling, max_seq_len)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq.to(device))  # [s, d/2]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotates the leading 2 * cos.shape[-1] dimensions of x [b, s, heads, head_dim] by position; the rest
    pass through (partial rotary). cos/sin are [s, d/2] or [b, s, d/2], already at x's positions.
    Computed in fp32 and cast back: a bf16 rotation loses precision at large angles for no speed worth having."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rot_dim = 2 * cos.shape[-1]
    if rot_dim < x.shape[-1]:
        rotated = apply_rope(x[..., :rot_dim], cos.squeeze(-2), sin.squeeze(-2), interleaved)
        return torch.cat((rotated, x[..., rot_dim:]), dim=-1)
    if interleaved:  # pairs (2j, 2j+1) share frequency j
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [b, s, heads, d/2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
    if torch.compiler.is_compiling():  # the compiler fuses the plain ops into one kernel each way
        x1, x2 = x.float().chunk(2, dim=-1)  # each [b, s, heads, d/2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if not torch.is_grad_enabled():  # inference: the same rotation without the Function's overhead
        return _rotate(x, cos, sin).to(x.dtype)
    return _RotateFunction.apply(x, cos, sin)


def rolled_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos | cos, -sin | sin), each [..., 1, 2 * cos.shape[-1]] (broadcast over heads), from tables at x's
    positions: rotate-half becomes x * cos2 + roll(x, d/2) * sin2 (apply_rolled). A forward builds them once
    for all its layers."""
    return torch.cat((cos, cos), -1).unsqueeze(-2), torch.cat((-sin, sin), -1).unsqueeze(-2)


def apply_rolled(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """apply_rope's rotate-half with rolled_tables, without autograd: four ops where the split form takes
    about fourteen, which is what a decoding step pays per layer for q and k of one token. The same bits:
    x1 * cos + x2 * (-sin) rounds as x1 * cos - x2 * sin does."""
    rot_dim = cos2.shape[-1]
    if rot_dim < x.shape[-1]:  # partial rotary: the rest passes through
        return torch.cat((apply_rolled(x[..., :rot_dim], cos2, sin2), x[..., rot_dim:]), dim=-1)
    x32 = x.float()
    out = x32 * cos2
    return out.add_(x32.roll(rot_dim // 2, -1).mul_(sin2)).to(x.dtype)


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
