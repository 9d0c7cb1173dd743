"""Causal grouped-query self-attention, and the context it receives besides the hidden states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.attention_kernels import NO_MASK, KeyMask, ScoreRules, attend
from megatron_llm.model.kv_cache import KVCache
from megatron_llm.model.norms import build_norm, normalize
from megatron_llm.model.rope import apply_rolled, apply_rope, rolled_tables
from megatron_llm.model_config import LayerSpec, ModelConfig


@dataclass
class AttentionContext:
    """What every attention layer of one forward shares. Built inside each pipeline stage's forward, so
    stage inputs and outputs stay plain tensors, and passed by keyword, so tensor-parallel plans that
    prepare a module's inputs see only the hidden states.

    rope: table name ("global", "local") -> (cos, sin), each [max_seq_len, rope_dim/2].
    positions: [s] or [b, s] positions of this forward's tokens (a KV cache's continuation, left-padded
    prompts, packed documents restarting at 0); None means 0..s-1 of the length attention sees (under
    sequence parallelism that is the gathered sequence, not this rank's shard).
    keys: per-sequence masks (padding, document boundaries); cache: the caller's KV cache, or None.
    """

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    positions: Optional[torch.Tensor] = None
    keys: KeyMask = NO_MASK
    cache: Optional[KVCache] = None
    _gathered: dict = dataclasses.field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> "AttentionContext":
        """This context with its tensors on `device` (a model spread over devices, inference.set_device)."""
        fields = (getattr(self.keys, f.name) for f in dataclasses.fields(KeyMask))  # astuple would deep-copy tensors
        keys = KeyMask(*(None if t is None else t.to(device) for t in fields))
        rope = {name: (cos.to(device), sin.to(device)) for name, (cos, sin) in self.rope.items()}
        positions = None if self.positions is None else self.positions.to(device)
        return AttentionContext(rope, positions, keys, self.cache)

    def rope_at(self, name: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's rows at this forward's positions, gathered once per forward for all layers."""
        cos, sin = self.rope[name]
        rows = slice(seq_len) if self.positions is None else self.positions
        if torch.compiler.is_compiling():  # a compiled block gathers for itself: no state across graphs
            return cos[rows], sin[rows]
        if (name, seq_len) not in self._gathered:
            self._gathered[name, seq_len] = (cos[rows], sin[rows])
        return self._gathered[name, seq_len]

    def rotate(self, name: str, interleaved: bool, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [b, s, heads, d] and k [b, s, kv_heads, d] rotated to this forward's positions by table `name`.
        Without autograd (decoding), rotate-half takes the rolled tables, built once per forward for all layers,
        and rotates q and k joined along the heads: one set of ops per layer where the split form took a dozen
        per tensor (~6% of a tiny model's decoding step). Same values either way."""
        s = q.shape[1]
        if interleaved or torch.is_grad_enabled() or torch.compiler.is_compiling():
            cos, sin = self.rope_at(name, s)
            return apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
        tables = self._gathered.get(("rolled", name, s))
        if tables is None:
            tables = self._gathered["rolled", name, s] = rolled_tables(*self.rope_at(name, s))
        heads = q.shape[2]
        qk = apply_rolled(torch.cat((q, k), dim=2), *tables)  # [b, s, heads + kv_heads, d]
        return qk.narrow(2, 0, heads), qk.narrow(2, heads, qk.shape[2] - heads)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] over d to unit root-mean-square, without a weight, in fp32 (Llama 4's Llama4TextL2Norm): the
    weightless RMSNorm's own normalisation."""
    return normalize(x, eps)[0]


def query_temperature(positions: Optional[torch.Tensor], s: int, floor: float, scale: float, offset: int = 1,
                      device=None) -> torch.Tensor:
    """1 + scale * log1p(floor((p + offset) / floor)) per query position p, as [1 or b, s, 1, 1] for q [b, s, heads, d]:
    positions [s] or [b, s] (a cache's continuation), else 0..s-1."""
    p = torch.arange(s, device=device) if positions is None else positions
    t = torch.log1p(torch.floor((p.float() + offset) / floor)) * scale + 1.0
    return t.view(-1, s, 1, 1)


class HeadSinks(nn.Module):
    """gpt-oss's attention sinks: one learned logit per query head [heads], which joins each row of its head's
    softmax as an extra column (attention_kernels.attend). A module of its own, so that the tensor-parallel plan
    shards it with the heads and hands the attention this rank's plain slice, as it does the projections'."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()  # no sink at first: exp(0) beside the row's exp(scores)

    def forward(self) -> torch.Tensor:
        return self.weight


class Attention(nn.Module):
    """Grouped-query attention: num_kv_heads divides num_heads; MHA and MQA are the two ends.

    Head counts are read from the projected tensors, never stored: a tensor-parallel plan that shards
    wq/wk/wv by output rows, wo by input columns (and alibi_slopes by heads) leaves each rank a smaller
    but complete attention.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        d = self.head_dim = spec.head_dim or cfg.head_dim  # Gemma 4's full layers have their own width and kv heads
        q_dim, kv_dim = cfg.num_heads * d, (spec.kv_heads or cfg.num_kv_heads) * d
        self.wq = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.wv = None if spec.values_from_keys else nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.out_bias)
        # The output gate (AFMoE, Laguna, Qwen3-Next), from a projection of its own: act(wg x) per output element or
        # per head. Qwen3-Next stores it inside q_proj ([q_h; gate_h] per head); its table splits the rows apart.
        gate_rows = cfg.num_heads * (1 if cfg.attention_gate_per_head else d)
        gated = cfg.attention_gate != "none"
        self.wg = nn.Linear(cfg.hidden_size, gate_rows, bias=cfg.attention_gate_bias) if gated else None
        self.gate_act = F.softplus if cfg.attention_gate == "softplus" else torch.sigmoid
        self.gate_width = 1 if cfg.attention_gate_per_head else d  # outputs each gate value scales
        # A norm on queries and keys before RoPE bounds the attention logits: over each head (Qwen3) or
        # over the whole projection (OLMo2).
        self.qk_norm_per_head, self.qk_norm_after_rope = cfg.qk_norm_per_head, cfg.qk_norm_after_rope  # HunYuan: after
        self.q_norm = build_norm(cfg, d if cfg.qk_norm_per_head else q_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, d if cfg.qk_norm_per_head else kv_dim) if cfg.qk_norm else None
        self.rope, self.rope_interleaved, self.clip = spec.rope, cfg.rope_interleaved, cfg.qkv_clip
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else d**-0.5
        self.rules = ScoreRules(window=spec.window, softcap=cfg.attn_softcap, alibi=cfg.position == "alibi",
                                sinks=cfg.attention_sinks, chunk=spec.chunk)
        # Llama 4: a weightless norm of the rotated heads on RoPE layers; a position-dependent query temperature on
        # NoPE layers (Ministral 3: on every layer), which lets scores sharpen with the distance covered (arXiv 2501.19399).
        self.l2_eps = cfg.norm_eps if cfg.qk_l2_norm and spec.rope is not None else None
        self.v_norm_eps = cfg.norm_eps if cfg.v_norm else None  # Gemma 4: values to unit RMS per head, no weight
        temperature = cfg.attn_temperature_floor is not None and (spec.rope is None or cfg.attn_temperature_layers == "all")
        self.temperature = (cfg.attn_temperature_floor, cfg.attn_temperature_scale,
                            cfg.attn_temperature_offset) if temperature else None
        self.sinks = HeadSinks(cfg.num_heads) if cfg.attention_sinks else None
        # Derived from the head count, so kept out of checkpoints; filled by init_weights.
        slopes = torch.empty(cfg.num_heads) if self.rules.alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def forward(self, x: torch.Tensor, *, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, ctx)
        slopes = self.alibi_slopes if self.rules.alibi else None  # a buffer read costs a module __getattr__
        sinks = self.sinks() if self.rules.sinks else None  # [heads]; this rank's heads under TP
        out = attend(q, k, v, self.rules, self.scale, slopes, ctx.keys, sinks)  # [b, heads, s, d]
        out = out.transpose(1, 2).reshape(b, s, -1)  # [b, s, heads * d]
        if self.wg is not None:  # [b, s, heads, d] times [b, s, heads, d or 1]
            g = self.gate_act(self.wg(x).float()).to(out.dtype).view(b, s, -1, self.gate_width)  # local heads under TP
            out = (out.view(b, s, -1, self.head_dim) * g).view(b, s, -1)
        return self.wo(out)

    def qkv(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [b, heads, s, d] and keys and values [b, kv_heads, s_kv, d] as the scores see them: projected,
        clipped, normed, rotated, and joined to the cache's. The attention probe reads them too."""
        b, s, _ = x.shape
        q, k = self.wq(x), self.wk(x)  # [b, s, heads * d], [b, s, kv_heads * d]
        v = k if self.wv is None else self.wv(x)  # [b, s, kv_heads * d]; the keys' own projection without wv
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, -1, self.head_dim)  # [b, s, heads, d]; local heads under TP
        k = k.view(b, s, -1, self.head_dim)  # [b, s, kv_heads, d]
        v = v.view(b, s, -1, self.head_dim)
        if self.v_norm_eps is not None:
            v = l2_norm(v, self.v_norm_eps)
        if self.q_norm is not None and self.qk_norm_per_head and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = ctx.rotate(self.rope, self.rope_interleaved, q, k)
        if self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.l2_eps is not None:
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        if self.temperature is not None:
            q = q * query_temperature(ctx.positions, s, *self.temperature, device=q.device).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
        if ctx.cache is not None:
            k, v = ctx.cache.update(self, k, v)  # [b, kv_heads, cached + s, d]
        return q, k, v
