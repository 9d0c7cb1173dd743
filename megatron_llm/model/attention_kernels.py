"""Attention scores: each mask and score rule written once, and the one place that picks a kernel.

A rule is written in FlexAttention's vocabulary (mask_mod(b, h, q, kv) -> keep, score_mod(score, b, h,
q, kv) -> score) and evaluated either by FlexAttention itself or, densely, on broadcast index tensors:
the dense form is what CPU kernels use, the test oracle, and what a probe of the attention reads.

Kernel choice (`attend`), from cheapest to most general:
  - plain causal: SDPA with is_causal (FlashAttention on GPU);
  - masked or modified (window, ALiBi, soft-cap) on CUDA: FlexAttention, compiled once;
  - document masks alone elsewhere: each document on its own, without the mask (every rule is relative
    to the query, so a document alone sees what the mask lets it see), costing sum(L_i^2), not L^2;
    short documents grouped under the mask (`document_chunks`);
  - elsewhere, additive rules only (window, chunks, ALiBi): SDPA with the dense mask or bias;
  - elsewhere with a soft-cap (not additive): eager math (torch 2.13 has no FlexAttention backward on CPU);
  - with attention sinks, everywhere: eager math (`attend` says why).
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
    sinks: bool = False  # a learned logit per head as an extra softmax column, dropped after it (gpt-oss)
    chunk: Optional[int] = None  # a query sees only keys of its own chunk of this many positions (Llama 4)

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and not self.alibi and not self.sinks and self.chunk is None


@dataclass(frozen=True)
class KeyMask:
    """Per-sequence masking of one forward, shared by every layer (indices are key positions in the sequence
    or the cache; queries are the last s_q of them, or end at query_end).
    valid: [b, s_kv] False at padding (left-padded prompts of a batch, free cache columns);
    documents: [b, s_kv] document id of each key: no token attends across a document boundary (packing);
    query_end: [b] where each row's queries end, for a cache whose rows have different lengths
    (continuous batching)."""

    valid: Optional[torch.Tensor] = None
    documents: Optional[torch.Tensor] = None
    query_end: Optional[torch.Tensor] = None  # [b] key index of each row's last query, when rows end apart

    def __post_init__(self) -> None:
        # what the kernels derive from the mask (dense_bias's result per (window, s_q, s_kv), document_chunks's),
        # built by a forward's first layer and read by the others; not a field, so copies and comparisons ignore it
        object.__setattr__(self, "memo", {})

    @property
    def empty(self) -> bool:
        return self.valid is None and self.documents is None and self.query_end is None


NO_MASK = KeyMask()


def mask_rule(window: Optional[int], keys: KeyMask = NO_MASK, q_offset: int = 0, s_q: int = 1,
              chunk: Optional[int] = None) -> Callable:
    """mask_mod(b, h, q, kv) -> keep: causal, within the window when there is one, within the query's chunk
    (key indices [n * chunk, (n + 1) * chunk)) when there is one, on valid keys of the query's document. Query
    index q counts from the first query, which sits at key index q_offset (or at query_end[b] - s_q + 1 in row b)."""
    valid, documents, query_end = keys.valid, keys.documents, keys.query_end

    def keep(b, h, q, kv):
        q = q + q_offset if query_end is None else q + query_end[b] - (s_q - 1)
        out = kv <= q
        if window is not None:
            out = out & (q - kv < window)
        if chunk is not None:  # chunks of absolute key indices, as transformers' chunked mask (cache positions)
            out = out & (q // chunk == kv // chunk)
        if valid is not None:  # a padding query still sees itself: no row of all -inf, no NaN to spread
            out = out & (valid[b, kv] | (kv == q))
        if documents is not None:
            out = out & (documents[b, q] == documents[b, kv])
        return out

    return keep


def score_rule(rules: ScoreRules, slopes: Optional[torch.Tensor], q_offset: int = 0) -> Optional[Callable]:
    """score_mod for the soft-cap and ALiBi (applied in that order, as Gemma2 caps raw scores), or None."""
    if rules.softcap is None and not rules.alibi:
        return None
    cap = rules.softcap

    def modify(score, b, h, q, kv):
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if rules.alibi:
            score = score + slopes[h] * (kv - q - q_offset)
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


def dense_bias(rules: ScoreRules, slopes: Optional[torch.Tensor], s_q: int, s_kv: int, device,
               keys: KeyMask = NO_MASK) -> torch.Tensor:
    """The additive rules materialised: [b or 1, heads or 1, s_q, s_kv] fp32, 0 or ALiBi where kept, -inf
    where masked. Queries are the last s_q of the s_kv positions (a KV cache holds the others). A per-sequence
    mask's bias is built once per KeyMask (one forward), not per layer: on CPU decoding it was ~10% of a step."""
    memo = not keys.empty and not rules.alibi and not torch.compiler.is_compiling()  # slopes differ per layer
    if memo and ("bias", rules.window, rules.chunk, s_q, s_kv) in keys.memo:
        return keys.memo["bias", rules.window, rules.chunk, s_q, s_kv]
    offset = s_kv - s_q
    q = torch.arange(s_q, device=device)[:, None]
    kv = torch.arange(s_kv, device=device)[None, :]
    if keys.empty:
        keep = mask_rule(rules.window, q_offset=offset, chunk=rules.chunk)(None, None, q, kv)[None, None]  # [1, 1, s_q, s_kv]
    else:
        batch = next(t for t in (keys.valid, keys.documents, keys.query_end) if t is not None).shape[0]
        b = torch.arange(batch, device=device)[:, None, None, None]
        keep = mask_rule(rules.window, keys, offset, s_q, rules.chunk)(b, None, q, kv)  # [b, 1, s_q, s_kv]
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, -math.inf)
    if rules.alibi:
        heads = torch.arange(len(slopes), device=device)[:, None, None]
        bias = score_rule(ScoreRules(alibi=True), slopes, offset)(bias, None, heads, q, kv)  # [b, heads, s_q, s_kv]
    if memo:
        keys.memo["bias", rules.window, rules.chunk, s_q, s_kv] = bias
    return bias


def attention_probs(q: torch.Tensor, k: torch.Tensor, rules: ScoreRules, scale: float, slopes=None,
                    keys: KeyMask = NO_MASK, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax(scores) [b, heads, s_q, s_kv] in fp32 by eager math: the oracle, the soft-cap and sink kernel and
    what the attention probe reads. q [b, heads, s_q, d], k [b, kv_heads, s_kv, d]; sinks [heads]: each row's
    softmax also takes its head's sink logit, whose weight is then dropped (the row sums to less than 1)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query: each kv head serves a group
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, heads, s_q, s_kv]
    s_q, s_kv = scores.shape[-2:]
    if rules.softcap is not None:
        scores = torch.tanh(scores / rules.softcap) * rules.softcap
    bias = dense_bias(ScoreRules(window=rules.window, alibi=rules.alibi, chunk=rules.chunk), slopes, s_q, s_kv, q.device, keys)
    if sinks is None:
        return torch.softmax(scores + bias, dim=-1, dtype=torch.float32)
    column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # [b, heads, s_q, 1]
    return torch.softmax(torch.cat((scores + bias, column), dim=-1), dim=-1, dtype=torch.float32)[..., :-1]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rules: ScoreRules, scale: float,
    slopes: Optional[torch.Tensor] = None, keys: KeyMask = NO_MASK, sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention output [b, heads, s_q, d] from q [b, heads, s_q, d] and k, v [b, kv_heads, s_kv, d]; the
    queries are the last s_q positions (s_q < s_kv when a KV cache holds the earlier ones). sinks [heads]: the
    attention module's sink logits where rules.sinks."""
    if rules.sinks:
        # Eager math with explicit scores, on every device: SDPA takes no extra softmax column and returns no
        # log-sum-exp to rescale its output by (out * sigmoid(lse - sink) would be the same function), and
        # FlexAttention, which returns one, has no backward on CPU in torch 2.13. The [s_q, s_kv] probabilities
        # are kept for the backward, as for the soft-cap.
        return _eager(q, v, attention_probs(q, k, rules, scale, slopes, keys, sinks))
    gqa = q.shape[1] != k.shape[1]
    s_q, s_kv = q.shape[2], k.shape[2]
    if rules.plain and keys.empty and (s_q == s_kv or s_q == 1):
        # Causal over the whole sequence, or one new token that sees every cached key. enable_gqa lets SDPA
        # broadcast kv heads itself: no repeated K/V copy, and on CPU it measured as fast as
        # repeat_interleave or expand (within noise). FlashAttention takes it on GPU.
        return sdpa(q, k, v, is_causal=s_q > 1, scale=scale, enable_gqa=gqa)
    if q.is_cuda:
        return flex_attention(q, k, v, rules, scale, slopes, keys=keys)
    # chunks are absolute: a document cut out of its row would see other chunk boundaries, so the dense mask decides
    chunks = document_chunks(keys) if s_q == s_kv and rules.chunk is None else None
    if chunks is not None:
        return attend_by_document(q, k, v, rules, scale, slopes, keys.documents, chunks)
    return masked_attend(q, k, v, rules, scale, slopes, keys)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **kwargs) -> torch.Tensor:
    """SDPA where values and queries may differ in width (MLA: v_head_dim against nope + rope): the narrower is
    zero-padded to the wider, as transformers' DeepSeek does for FlashAttention. The fused kernels (CPU flash,
    FlashAttention) take one head width only; without the padding SDPA falls back to its math path, which keeps
    the [s, s] probabilities for the backward (+26% of a tiny MLA step's peak memory on CPU) and runs slower.
    Zero query and key columns add nothing to the scores (the scale is explicit), zero value columns give zero
    output columns, sliced off. This is the choice SDPA makes itself for equal widths; on CPU with wide heads and
    short sequences it costs time (DeepSeek's 192/128 at s 256: 64 against 48 ms forward and backward for math)
    and pays from s ~ 1024 on (146 against 228 ms; 1.8 against 3.7 s at 4096), and on GPU always."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dq < dv:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    elif dv < dq:
        v = F.pad(v, (0, dq - dv))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)[..., :dv]


def masked_attend(q, k, v, rules: ScoreRules, scale: float, slopes=None, keys: KeyMask = NO_MASK) -> torch.Tensor:
    """`attend` off CUDA with the dense mask: SDPA with it as a bias (additive rules), else eager math."""
    if rules.softcap is None:
        bias = dense_bias(rules, slopes, q.shape[2], k.shape[2], q.device, keys).to(q.dtype)
        return sdpa(q, k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return _eager(q, v, attention_probs(q, k, rules, scale, slopes, keys))


def _eager(q: torch.Tensor, v: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """probs [b, heads, s_q, s_kv] (fp32) times v [b, kv_heads, s_kv, d] -> [b, heads, s_q, d]."""
    return torch.matmul(probs.to(v.dtype), v.repeat_interleave(q.shape[1] // v.shape[1], dim=1))


def attend_by_document(q, k, v, rules: ScoreRules, scale: float, slopes, documents: torch.Tensor,
                       chunks: list[list[tuple[int, bool]]]) -> torch.Tensor:
    """`attend` under a document mask, chunk by chunk of `document_chunks`: CPU SDPA with a mask cannot skip
    masked blocks; this never computes them. Chunks of one length and kind, in any rows, run as one batch
    (rows holding one whole document, most often), as each kernel call costs a fixed overhead. unbind, split
    and stack, never indexing: their backwards write each gradient once, where a row slice's backward would
    fill a zero tensor of the whole batch."""
    pieces = []  # per row, per chunk: (q [heads, n, d], k, v, documents [n])
    groups: dict[tuple[int, bool], list[tuple[int, int]]] = {}  # (length, several documents) -> (row, chunk)
    for r, (row, *tensors) in enumerate(zip(chunks, q.unbind(0), k.unbind(0), v.unbind(0), documents.unbind(0))):
        lengths = [n for n, _ in row]
        *qkv, docs = tensors
        pieces.append(list(zip(*(t.split(lengths, dim=1) for t in qkv), docs.split(lengths))))
        for c, kind in enumerate(row):
            groups.setdefault(kind, []).append((r, c))
    out: list[list] = [[None] * len(row) for row in chunks]
    for (_, several), members in groups.items():
        qg, kg, vg, dg = (torch.stack([pieces[r][c][j] for r, c in members]) for j in range(4))  # [m, heads, n, d]
        if several:
            og = masked_attend(qg, kg, vg, rules, scale, slopes, KeyMask(documents=dg))
        else:
            og = attend(qg, kg, vg, rules, scale, slopes)  # one document each: plain causal within it
        for (r, c), oc in zip(members, og.unbind(0)):
            out[r][c] = oc
    return torch.stack([torch.cat(row, dim=1) for row in out])  # [b, heads, s, d]


SHORT_DOCUMENTS = 128  # consecutive documents shorter than this share one masked call, up to this many tokens


def document_chunks(keys: KeyMask) -> Optional[list[list[tuple[int, bool]]]]:
    """Each row cut at document boundaries into chunks (length, holds several documents), when document
    masks are the only masking and each document is one contiguous run of its row (ids never decrease
    along it, as packing and document_layout number them); otherwise None and the dense mask decides.
    A document of SHORT_DOCUMENTS tokens or more is a chunk of its own; shorter ones are grouped while
    their chunk is short, so many tiny documents cost a few kernel calls (each under 2 x SHORT_DOCUMENTS
    tokens), not one each."""
    documents = keys.documents
    if documents is None or keys.valid is not None or keys.query_end is not None:
        return None
    if torch.compiler.is_compiling():  # lengths read on the host would recompile the graph for every batch
        return None
    if "document_chunks" not in keys.memo:  # once per forward, not per layer: it reads the ids on the host
        keys.memo["document_chunks"] = _chunks(documents)
    return keys.memo["document_chunks"]


def _chunks(documents: torch.Tensor) -> Optional[list[list[tuple[int, bool]]]]:
    if (documents[:, 1:] < documents[:, :-1]).any():
        return None
    rows = []
    for row in documents:
        chunks: list[tuple[int, bool]] = []
        for n in torch.unique_consecutive(row, return_counts=True)[1].tolist():
            if n < SHORT_DOCUMENTS and chunks and chunks[-1][0] < SHORT_DOCUMENTS:
                chunks[-1] = (chunks[-1][0] + n, True)
            else:
                chunks.append((n, False))
        rows.append(chunks)
    return rows


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _block_mask(window: Optional[int], chunk: Optional[int], s_q: int, s_kv: int, device: str):
    """Without per-sequence masks a block mask depends only on the rule and the lengths: built once per
    shape, not per layer or step."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_rule(window, q_offset=s_kv - s_q, chunk=chunk), None, None, s_q, s_kv, device=device)


def flex_attention(q, k, v, rules: ScoreRules, scale: float, slopes=None, compiled: bool = True,
                   keys: KeyMask = NO_MASK) -> torch.Tensor:
    """FlexAttention with the same rules; `compiled=False` runs its eager reference (CPU forward, tests)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    s_q, s_kv = q.shape[2], k.shape[2]
    if keys.empty:
        block_mask = _block_mask(rules.window, rules.chunk, s_q, s_kv, str(q.device))
    else:
        block_mask = create_block_mask(mask_rule(rules.window, keys, s_kv - s_q, s_q, rules.chunk), q.shape[0], None, s_q, s_kv,
                                       device=str(q.device))
    kernel = _compiled_flex() if compiled else eager_flex
    return kernel(
        q, k, v, score_mod=score_rule(rules, slopes, s_kv - s_q), block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
