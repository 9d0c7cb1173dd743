"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464), the linear-attention mixer of Qwen3-Next and
Qwen3.5, in the attention slot of the layers whose LayerSpec says `linear`.

Per value head the layer keeps a state S [d_k, d_v] and, for each token t in order, decays it and writes the
part of v_t that it does not yet predict from k_t (the delta rule):

    S <- exp(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t

q, k, v come from projections through a short causal depthwise convolution and SiLU; q and k are L2-normalised
per head (q also scaled by d_k^-1/2); beta_t = sigmoid(b_proj x_t) and g_t = -exp(a_log) softplus(a_proj x_t + dt_bias)
per value head. Each query/key head serves value_heads / key_heads consecutive value heads. The output of a head is
RMS-normed (a plain weight: the gated norm), multiplied by silu(z_proj x_t), and the heads go through out_proj.

Two equal forms: `chunked_delta_rule` for a forward of many tokens (training, a prompt), which turns the updates
inside a chunk into matmuls (the WY/UT form of the paper, one triangular solve per chunk) and walks the chunks in
order; `recurrent_delta_rule`, the token-by-token recurrence above, for decoding one token at a time. The state
is fp32 in both. A cache (model/kv_cache.py) carries the state and the convolution's last inputs between forwards.

Parameter names are the layer's own (q_proj ... out_proj): a checkpoint table maps a linear layer's and a full
layer's tensors by name, so they differ from the attention's wq ... wo. The tensor-parallel plan splits the
projections by heads as it splits the attention's; the per-head parameters (a_log, dt_bias) and the convolution's
taps (conv_q, conv_k, conv_v: one row per channel, channels grouped by head) are modules that return their weight,
which the plan shards with the heads as it does gpt-oss's sinks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.attention import AttentionContext
from megatron_llm.model.norms import RMSNorm
from megatron_llm.model_config import LayerSpec, ModelConfig

L2_EPS = 1e-6  # of the per-head L2 norm of q and k (FLA's and transformers' kernels)


class Rows(nn.Module):
    """A weight whose first dimension runs over heads or channels grouped by head, returned by forward: a module of
    its own so that the tensor-parallel plan shards it with the heads (tensor_parallel.ShardedWithHeads)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))

    def forward(self) -> torch.Tensor:
        return self.weight


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, kv_dim = cfg.hidden_size, cfg.linear_num_key_heads * cfg.linear_key_head_dim
        v_heads, v_dim = cfg.linear_num_value_heads, cfg.linear_num_value_heads * cfg.linear_value_head_dim
        self.k_head_dim, self.v_head_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel = cfg.linear_conv_kernel
        self.group = cfg.linear_num_value_heads // cfg.linear_num_key_heads  # value heads per query/key head
        self.chunk_size = cfg.linear_chunk_size
        self.q_proj, self.k_proj = nn.Linear(h, kv_dim, bias=False), nn.Linear(h, kv_dim, bias=False)
        self.v_proj, self.z_proj = nn.Linear(h, v_dim, bias=False), nn.Linear(h, v_dim, bias=False)
        self.b_proj, self.a_proj = nn.Linear(h, v_heads, bias=False), nn.Linear(h, v_heads, bias=False)
        self.conv_q, self.conv_k = Rows(kv_dim, self.kernel), Rows(kv_dim, self.kernel)
        self.conv_v = Rows(v_dim, self.kernel)
        self.a_log, self.dt_bias = Rows(v_heads), Rows(v_heads)
        self.norm = RMSNorm(cfg.linear_value_head_dim, cfg.norm_eps)  # the gated norm: a plain weight in every family
        self.out_proj = nn.Linear(v_dim, h, bias=False)
        self.rope = None  # no positions: the recurrence is ordered

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """The convolution as nn.Conv1d initialises a depthwise one (uniform in +-1/sqrt(taps)), the decay as
        init_decay; the projections are the Transformer's (init_weights), the norm's weight 1."""
        bound = self.kernel ** -0.5
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            conv.weight.uniform_(-bound, bound, generator=generator)
        init_decay(self.a_log.weight, self.dt_bias.weight, generator)

    def forward(self, x: torch.Tensor, *, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        x, (history, recurrent) = sequence_state(self, x, ctx, "a linear-attention (Gated DeltaNet) layer")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [b, s, kv_dim] x2, [b, s, v_dim]; local heads (tp)
        widths = (q.shape[-1], k.shape[-1], v.shape[-1])
        taps = torch.cat((self.conv_q(), self.conv_k(), self.conv_v()))  # [channels, kernel]
        mixed, history = causal_conv(torch.cat((q, k, v), dim=-1), taps, history)
        q, k, v = F.silu(mixed).split(widths, dim=-1)
        q = q.reshape(b, s, -1, self.k_head_dim)  # [b, s, k_heads, d_k]
        k = k.reshape(b, s, -1, self.k_head_dim)
        v = v.reshape(b, s, -1, self.v_head_dim)  # [b, s, v_heads, d_v]
        beta = torch.sigmoid(self.b_proj(x).float())  # [b, s, v_heads]
        g = -self.a_log().float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias().float())  # log decay, <= 0
        if s == 1 and recurrent is not None:
            out, recurrent = recurrent_delta_rule(q, k, v, g, beta, recurrent)
        else:
            out, recurrent = chunked_delta_rule(q, k, v, g, beta, self.chunk_size, recurrent)
        if ctx.cache is not None:
            ctx.cache.keep(self, history, recurrent)
        z = self.z_proj(x).view(b, s, -1, self.v_head_dim)
        out = self.norm(out.to(x.dtype)) * F.silu(z.float()).to(x.dtype)  # [b, s, v_heads, d_v]
        return self.out_proj(out.reshape(b, s, -1))


@torch.no_grad()
def init_decay(a_log: torch.Tensor, dt_bias: torch.Tensor, generator: torch.Generator) -> None:
    """Per-head decay rates exp(a_log) uniform in [1, 16] and time steps softplus(dt_bias) log-uniform in [1e-3, 0.1]
    (Mamba-2's and FLA's ranges), in place."""
    a_log.uniform_(1.0, 16.0, generator=generator).log_()
    dt = dt_bias.uniform_(math.log(1e-3), math.log(0.1), generator=generator).exp_()
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)


def sequence_state(layer: nn.Module, x: torch.Tensor, ctx: AttentionContext, what: str):
    """What a layer with a recurrent state (`what`, for the refusal) reads of its context: x [b, s, h] with left
    padding zeroed (zero inputs keep a zero state, as if the row began later) and (convolution history, state) from
    the cache, or (None, None). Packed documents and rows of different lengths (continuous batching) would need a
    state per document or row: refused by name."""
    keys, s = ctx.keys, x.shape[1]
    if keys.documents is not None or keys.query_end is not None:
        raise ValueError(f"{what} carries one state per sequence: packed documents (data.document_mask, sft packing) "
                         "and continuous batching are not supported; set data.document_mask false / data.packing "
                         "false, or decode with generate")
    if keys.valid is not None:
        x = x * keys.valid[:, -s:, None].to(x.dtype)
    state = ctx.cache.recurrent(layer) if ctx.cache is not None else None
    return x, state if state is not None else (None, None)


def causal_conv(x: torch.Tensor, taps: torch.Tensor,
                history: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, s, c] through the depthwise causal convolution with `taps` [c, kernel] (tap kernel - 1 on the current
    token), after `history` [b, c, kernel - 1], the inputs before x (zeros at a sequence's start); returns the output
    [b, s, c] and the new history."""
    kernel = taps.shape[1]
    xt = x.transpose(1, 2)  # [b, c, s]
    history = xt.new_zeros(x.shape[0], x.shape[2], kernel - 1) if history is None else history.to(xt.dtype)
    full = torch.cat((history, xt), dim=-1)  # [b, c, kernel - 1 + s]
    out = F.conv1d(full, taps.unsqueeze(1).to(xt.dtype), groups=taps.shape[0])  # [b, c, s]
    return out.transpose(1, 2), full[..., full.shape[-1] - (kernel - 1):]


def _prepare(q, k, v, g, beta, group: int):
    """Per value head, fp32, [b, heads, s, ...]: q and k L2-normalised and repeated for their value heads, q scaled."""
    q, k = (t.float().repeat_interleave(group, dim=2) if group > 1 else t.float() for t in (q, k))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2_EPS) * q.shape[-1] ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2_EPS)
    return (q.transpose(1, 2), k.transpose(1, 2), v.float().transpose(1, 2), g.transpose(1, 2), beta.transpose(1, 2))


def recurrent_delta_rule(q, k, v, g, beta, state: Optional[torch.Tensor] = None):
    """The recurrence token by token: q, k [b, s, k_heads, d_k], v [b, s, v_heads, d_v], g and beta [b, s, v_heads]
    (fp32), state [b, v_heads, d_k, d_v] or None (zeros) -> (out [b, s, v_heads, d_v] fp32, the final state)."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta, v.shape[2] // k.shape[2])
    b, heads, s, dk = k.shape
    S = v.new_zeros(b, heads, dk, v.shape[-1]) if state is None else state.float()
    outs = []
    for t in range(s):
        S = S * g[:, :, t, None, None].exp()
        predicted = (S * k[:, :, t, :, None]).sum(-2)  # S^T k_t [b, heads, d_v]
        S = S + k[:, :, t, :, None] * ((v[:, :, t] - predicted) * beta[:, :, t, None])[:, :, None, :]
        outs.append((S * q[:, :, t, :, None]).sum(-2))  # S^T q_t
    return torch.stack(outs, dim=1), S  # [b, s, heads, d_v]


def chunked_delta_rule(q, k, v, g, beta, chunk: int, state: Optional[torch.Tensor] = None):
    """The same recurrence by chunks of `chunk` tokens (arguments and results as recurrent_delta_rule's).

    Inside a chunk, with G_t the cumulative log decay from its start and S_0 the state before it, the corrections
    u_t = beta_t (v_t - S_t'^T k_t) satisfy (I + A) U = beta V - beta exp(G) K S_0, A_tj = beta_t exp(G_t - G_j) k_t.k_j
    for j < t (A strictly lower-triangular): one unit-triangular solve gives T beta V and T beta exp(G) K. Then
    o_t = exp(G_t) q_t S_0 + sum_{j <= t} exp(G_t - G_j) (q_t.k_j) u_j and the chunk's last state is
    exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T. The sequence is padded to whole chunks with k = v = g = beta = 0,
    which changes no output and no state."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta, v.shape[2] // k.shape[2])
    b, heads, s, dk = k.shape
    pad = -s % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (s + pad) // chunk
    q, k, v = (t.reshape(b, heads, n, chunk, -1) for t in (q, k, v))  # [b, heads, chunks, C, d]
    g, beta = g.reshape(b, heads, n, chunk), beta.reshape(b, heads, n, chunk)
    G = g.cumsum(-1)  # [b, heads, chunks, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_j) where j <= t, 0 above the diagonal (masked before exp: G_t - G_j > 0 there could overflow)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [.., C (t), C (j)]
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2) * decay).tril(-1)  # strictly lower
    # unitriangular: the solver takes the diagonal as ones, so A stands for I + A
    W = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)  # T beta V
    Kc = torch.linalg.solve_triangular(A, kb * G[..., None].exp(), upper=False, unitriangular=True)  # T beta e^G K
    scores = q @ k.transpose(-1, -2) * decay  # (q_t.k_j) exp(G_t - G_j), j <= t
    q_read = q * G[..., None].exp()  # reads S_0 decayed to t
    k_write = k * (G[..., -1:] - G).exp()[..., None]  # writes decayed to the chunk's end
    S = v.new_zeros(b, heads, dk, v.shape[-1]) if state is None else state.float()
    outs = []
    for i in range(n):
        u = W[:, :, i] - Kc[:, :, i] @ S  # [b, heads, C, d_v]
        outs.append(q_read[:, :, i] @ S + scores[:, :, i] @ u)
        S = S * G[:, :, i, -1, None, None].exp() + k_write[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(b, heads, n * chunk, -1)[:, :, :s]
    return out.transpose(1, 2), S  # [b, s, heads, d_v]
