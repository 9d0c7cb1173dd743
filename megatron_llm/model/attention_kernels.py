"""Attention scores: each mask and score rule written once, and the one place that picks a kernel.

A rule is written in FlexAttention's vocabulary (mask_mod(b, h, q, kv) -> keep, score_mod(score, b, h,
q, kv) -> score) and evaluated either by FlexAttention itself or, densely, on broadcast index tensors:
the dense form is what CPU kernels use, the test oracle, and what a probe of the attention reads.

Kernel choice (`attend`), from cheapest to most general:
  - plain causal: SDPA with is_causal (FlashAttention on GPU);
  - masked or modified (window, ALiBi, soft-cap) on CUDA: FlexAttention, compiled once;
  - elsewhere, additive rules only (window, ALiBi): SDPA with the dense mask or bias;
  - elsewhere with a soft-cap (not additive): eager math (torch 2.13 has no FlexAttention backward on CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScoreRules:
    """What modifies one layer's attention scores besides the causal mask."""

    window: Optional[int] = None  # a query sees itself and the window - 1 keys before it
    softcap: Optional[float] = None  # cap * tanh(score / cap), before masking
    alibi: bool = False  # + slope[h] * (kv - q); the slopes are the attention module's buffer

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and not self.alibi


def mask_rule(window: Optional[int]) -> Callable:
    """mask_mod: causal, and within the window when there is one."""

    def causal(b, h, q, kv):
        return kv <= q

    def sliding(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    return causal if window is None else sliding


def score_rule(rules: ScoreRules, slopes: Optional[torch.Tensor]) -> Optional[Callable]:
    """score_mod for the soft-cap and ALiBi (applied in that order, as Gemma2 caps raw scores), or None."""
    if rules.softcap is None and not rules.alibi:
        return None
    cap = rules.softcap

    def modify(score, b, h, q, kv):
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if rules.alibi:
            score = score + slopes[h] * (kv - q)
        return score

    return modify


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes [num_heads] (Press et al.): a geometric sequence from 2^(-8/n) for a power
    of two n; other counts take the next power's odd terms for the remaining heads, as BLOOM does."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def dense_bias(rules: ScoreRules, slopes: Optional[torch.Tensor], s_q: int, s_kv: int, device) -> torch.Tensor:
    """The additive rules materialised: [heads or 1, s_q, s_kv] fp32, 0 or ALiBi where kept, -inf where masked."""
    q = torch.arange(s_kv - s_q, s_kv, device=device)[:, None]  # queries are the last s_q positions
    kv = torch.arange(s_kv, device=device)[None, :]
    keep = mask_rule(rules.window)(None, None, q, kv)  # [s_q, s_kv]
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, -math.inf)
    if rules.alibi:
        heads = torch.arange(len(slopes), device=device)[:, None, None]
        bias = score_rule(ScoreRules(alibi=True), slopes)(bias, None, heads, q, kv)  # [heads, s_q, s_kv]
    return bias[None] if bias.ndim == 2 else bias


def attention_probs(q: torch.Tensor, k: torch.Tensor, rules: ScoreRules, scale: float, slopes=None) -> torch.Tensor:
    """Softmax(scores) [b, heads, s_q, s_kv] in fp32 by eager math: the oracle and the soft-cap kernel.
    q [b, heads, s_q, d], k [b, kv_heads, s_kv, d]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: each kv head serves a group
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, heads, s_q, s_kv]
    s_q, s_kv = scores.shape[-2:]
    if rules.softcap is not None:
        scores = torch.tanh(scores / rules.softcap) * rules.softcap
    bias = dense_bias(ScoreRules(window=rules.window, alibi=rules.alibi), slopes, s_q, s_kv, q.device)
    return torch.softmax(scores + bias, dim=-1, dtype=torch.float32)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rules: ScoreRules, scale: float,
    slopes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention output [b, heads, s, d] from q [b, heads, s, d] and k, v [b, kv_heads, s, d]."""
    gqa = q.shape[1] != k.shape[1]
    if rules.plain:
        # enable_gqa lets SDPA broadcast kv heads itself: no repeated K/V copy, and on CPU it measured
        # as fast as repeat_interleave or expand (within noise). FlashAttention takes it on GPU.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q.is_cuda:
        return flex_attention(q, k, v, rules, scale, slopes)
    if rules.softcap is None:
        bias = dense_bias(rules, slopes, q.shape[2], k.shape[2], q.device).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)
    probs = attention_probs(q, k, rules, scale, slopes).to(v.dtype)
    return torch.matmul(probs, v.repeat_interleave(q.shape[1] // v.shape[1], dim=1))


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _block_mask(window: Optional[int], s_q: int, s_kv: int, device: str):
    """Block masks depend only on the rule and the lengths: built once per shape, not per layer or step."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_rule(window), None, None, s_q, s_kv, device=device)


def flex_attention(q, k, v, rules: ScoreRules, scale: float, slopes=None, compiled: bool = True) -> torch.Tensor:
    """FlexAttention with the same rules; `compiled=False` runs its eager reference (CPU forward, tests)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    block_mask = _block_mask(rules.window, q.shape[2], k.shape[2], str(q.device))
    kernel = _compiled_flex() if compiled else eager_flex
    return kernel(
        q, k, v, score_mod=score_rule(rules, slopes), block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )

