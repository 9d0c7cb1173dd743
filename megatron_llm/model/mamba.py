"""Mamba-2 (Dao & Gu 2024, arXiv 2405.21060: state space duality, SSD), the token mixer of Bamba, Granite 4.0 and
Nemotron-H in the attention slot of the layers whose LayerSpec says `mamba`.

From x_t the layer projects a gate z_t, the SSM input x_t (heads x head_dim channels), B_t and C_t (one [N] vector per
group of heads) and a time step per head; x, B and C pass through a short causal depthwise convolution and SiLU. Per
head, with dt_t = clamp(softplus(dt_t + dt_bias)) and A = -exp(A_log), a state S [N, head_dim] evolves

    S <- exp(dt_t A) S + B_t (dt_t x_t)^T;   y_t = S^T C_t + D x_t

and the heads' outputs go through the gated RMS norm, rms(y * silu(z)) per group of channels, then out_proj.

Two equal forms: `chunked_scan` (the SSD form) for a forward of many tokens turns each chunk into masked matmuls and
walks the chunks' states in order; `recurrent_scan`, the recurrence above, decodes one token at a time. The state is
fp32 in both. A cache (model/kv_cache.py) carries the state and the convolution's last inputs between forwards.

The fused in_proj of the checkpoints is kept as five projections (z, x, b, c, dt) and the convolution as three
(conv_x, conv_b, conv_c), so that the tensor-parallel plan splits them by heads (x, z, dt) and by groups (B, C) as it
splits attention's q/k/v; the per-head parameters and the gated norm's weight are modules returning their weight
(linear_attention.Rows), sharded with the heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.linear_attention import Rows, causal_conv, init_decay, sequence_state
from megatron_llm.model_config import LayerSpec, ModelConfig


class ConvTaps(nn.Module):
    """A depthwise convolution's taps [channels, kernel] and optional bias [channels], returned by forward as one
    tensor [channels, kernel (+1)], the bias last: one module the tensor-parallel plan shards by channel rows."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def forward(self) -> torch.Tensor:
        return self.weight if self.bias is None else torch.cat((self.weight, self.bias[:, None]), dim=1)


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, heads, state = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_state_size
        inner, bc = heads * cfg.mamba_head_dim, cfg.mamba_groups * state
        self.head_dim, self.state_size, self.kernel = cfg.mamba_head_dim, state, cfg.mamba_conv_kernel
        self.group_width = inner // cfg.mamba_groups  # channels per group of the gated norm
        self.chunk_size, self.eps = cfg.mamba_chunk_size, cfg.norm_eps
        self.dt_limits = (cfg.mamba_dt_floor, cfg.mamba_dt_ceiling if cfg.mamba_dt_ceiling is not None else math.inf)
        bias = cfg.mamba_proj_bias
        self.z_proj, self.x_proj = nn.Linear(h, inner, bias=bias), nn.Linear(h, inner, bias=bias)
        self.b_proj, self.c_proj = nn.Linear(h, bc, bias=bias), nn.Linear(h, bc, bias=bias)
        self.dt_proj = nn.Linear(h, heads, bias=bias)
        self.conv_x = ConvTaps(inner, self.kernel, cfg.mamba_conv_bias)
        self.conv_b = ConvTaps(bc, self.kernel, cfg.mamba_conv_bias)
        self.conv_c = ConvTaps(bc, self.kernel, cfg.mamba_conv_bias)
        self.a_log, self.d, self.dt_bias = Rows(heads), Rows(heads), Rows(heads)
        self.gate_norm = Rows(inner)  # the gated RMS norm's weight
        self.out_proj = nn.Linear(inner, h, bias=bias)
        self.rope = None  # no positions: the recurrence is ordered

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Mamba-2's init: the convolution as nn.Conv1d's depthwise one (uniform in +-1/sqrt(taps), bias 0), A_log
        and dt_bias as init_decay, D and the gated norm's weight 1; the projections are the Transformer's (init_weights)."""
        bound = self.kernel ** -0.5
        for conv in (self.conv_x, self.conv_b, self.conv_c):
            conv.weight.uniform_(-bound, bound, generator=generator)
            if conv.bias is not None:
                conv.bias.zero_()
        init_decay(self.a_log.weight, self.dt_bias.weight, generator)
        self.d.weight.fill_(1.0)
        self.gate_norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, *, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        x, (history, ssm_state) = sequence_state(self, x, ctx, "a Mamba-2 layer")
        xs, B, C = self.x_proj(x), self.b_proj(x), self.c_proj(x)  # [b, s, heads/tp * p], [b, s, groups/tp * N] x2
        widths = (xs.shape[-1], B.shape[-1], C.shape[-1])
        taps = torch.cat((self.conv_x(), self.conv_b(), self.conv_c()))  # [channels, kernel (+ bias)]
        mixed, history = causal_conv(torch.cat((xs, B, C), dim=-1), taps[:, :self.kernel], history)
        if taps.shape[1] > self.kernel:
            mixed = mixed + taps[:, self.kernel].to(mixed.dtype)
        mixed = F.silu(mixed)
        if ctx.keys.valid is not None:  # left padding: the convolution's bias would write into the state
            mixed = mixed * ctx.keys.valid[:, -s:, None].to(mixed.dtype)
        xs, B, C = mixed.split(widths, dim=-1)
        xs = xs.reshape(b, s, -1, self.head_dim)  # [b, s, heads, p]
        B, C = (t.reshape(b, s, -1, self.state_size) for t in (B, C))  # [b, s, groups, N]
        dt = F.softplus(self.dt_proj(x).float() + self.dt_bias().float()).clamp(*self.dt_limits)  # [b, s, heads]
        A = -self.a_log().float().exp()  # [heads]
        if s == 1 and ssm_state is not None:
            y, ssm_state = recurrent_scan(xs, dt, A, B, C, ssm_state)
        else:
            y, ssm_state = chunked_scan(xs, dt, A, B, C, self.chunk_size, ssm_state)
        if ctx.cache is not None:
            ctx.cache.keep(self, history, ssm_state)
        y = y + xs.float() * self.d().float()[:, None]  # the D skip
        gated = y.reshape(b, s, -1) * F.silu(self.z_proj(x).float())  # [b, s, heads * p], fp32
        groups = gated.view(b, s, -1, self.group_width)  # the norm's statistics per group of heads
        normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(b, s, -1)
        return self.out_proj(self.gate_norm() * normed.to(x.dtype))


def _per_head(B: torch.Tensor, C: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B, C [b, s, groups, N] -> [b, heads, s, N] fp32, each group's vectors serving its heads / groups heads."""
    repeat = heads // B.shape[2]
    return tuple(t.float().repeat_interleave(repeat, dim=2).transpose(1, 2) for t in (B, C))


def recurrent_scan(x, dt, A, B, C, state: Optional[torch.Tensor] = None):
    """The recurrence token by token: x [b, s, heads, p], dt [b, s, heads] (clamped, fp32), A [heads] (< 0),
    B, C [b, s, groups, N], state [b, heads, N, p] or None (zeros) -> (y [b, s, heads, p] fp32 without the D skip,
    the final state)."""
    b, s, heads, p = x.shape
    B, C = _per_head(B, C, heads)
    xdt = (x.float() * dt[..., None]).transpose(1, 2)  # [b, heads, s, p]
    decay = (dt * A).exp().transpose(1, 2)  # [b, heads, s]
    S = xdt.new_zeros(b, heads, B.shape[-1], p) if state is None else state.float()
    outs = []
    for t in range(s):
        S = S * decay[:, :, t, None, None] + B[:, :, t, :, None] * xdt[:, :, t, None, :]
        outs.append((C[:, :, t, :, None] * S).sum(-2))  # S^T C_t [b, heads, p]
    return torch.stack(outs, dim=1), S


def chunked_scan(x, dt, A, B, C, chunk: int, state: Optional[torch.Tensor] = None):
    """The same recurrence by chunks of `chunk` tokens (arguments and results as recurrent_scan's).

    Inside a chunk, with G_t the cumulative log decay sum_{j <= t} dt_j A from its start and S_0 the state before it,
    y_t = exp(G_t) C_t.S_0 + sum_{j <= t} exp(G_t - G_j) (C_t.B_j) dt_j x_j (a masked attention-like product), and
    the chunk's last state is exp(G_C) S_0 + sum_j exp(G_C - G_j) B_j (dt_j x_j)^T. The sequence is padded to whole
    chunks with dt = x = 0, which changes no output and no state."""
    b, s, heads, p = x.shape
    B, C = _per_head(B, C, heads)  # [b, heads, s, N]
    xdt = (x.float() * dt[..., None]).transpose(1, 2)  # [b, heads, s, p]
    a = (dt * A).transpose(1, 2)  # [b, heads, s], log decay per token
    pad = -s % chunk
    B, C, xdt = (F.pad(t, (0, 0, 0, pad)) for t in (B, C, xdt))
    a = F.pad(a, (0, pad))
    n = (s + pad) // chunk
    B, C, xdt = (t.reshape(b, heads, n, chunk, -1) for t in (B, C, xdt))  # [b, heads, chunks, C, d]
    G = a.reshape(b, heads, n, chunk).cumsum(-1)  # [b, heads, chunks, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    # exp(G_t - G_j) where j <= t, 0 above the diagonal (masked before exp: G_t - G_j > 0 there could overflow)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    intra = (C @ B.transpose(-1, -2) * decay) @ xdt  # [b, heads, chunks, C, p]
    c_read = C * G[..., None].exp()  # reads S_0 decayed to t
    b_write = B * (G[..., -1:] - G).exp()[..., None]  # writes decayed to the chunk's end
    S = xdt.new_zeros(b, heads, B.shape[-1], p) if state is None else state.float()
    outs = []
    for i in range(n):
        outs.append(intra[:, :, i] + c_read[:, :, i] @ S)
        S = S * G[:, :, i, -1, None, None].exp() + b_write[:, :, i].transpose(-1, -2) @ xdt[:, :, i]
    y = torch.stack(outs, dim=2).reshape(b, heads, n * chunk, p)[:, :, :s]
    return y.transpose(1, 2), S  # [b, s, heads, p]
