"""Hybrid families: Gated DeltaNet linear-attention layers (model/linear_attention.py) between full-attention ones,
layer_types "linear_attention" / "full_attention" (3 to 1 as published). Qwen3-Next (qwen3_next), Qwen3.5 dense
(qwen3_5_text) and Qwen3.5-MoE (qwen3_5_moe_text); the multimodal qwen3_5 / qwen3_5_moe read as these through
multimodal.py's wrappers.

All three share the full layers' attention: q_proj makes [q_h; gate_h] per head, read as wq and the sigmoid output
gate's own wg (model.attention_gate; Fused "heads" splits and interleaves the rows bit for bit), a per-head QK-norm,
a quarter of each head rotated by halves, norms of weight 1 + w (zero-centred; the gated norm of the linear layers
excepted: a plain weight). The linear layers' projections are stored fused: Qwen3-Next's
in_proj_qkvz and in_proj_ba group q, k, v, z (and b, a) per key head; Qwen3.5's in_proj_qkv concatenates q, k, v
and keeps z, b, a apart. The depthwise convolution over the q, k, v channels is one conv1d [channels, 1, taps].
"""

from __future__ import annotations

import torch

from megatron_llm.checkpoint.families.common import (GATED_ACTIVATIONS, LLAMA_TENSORS, ROPE, SHAPE, activation,
                                                    partial_rope, without_mlp)
from megatron_llm.checkpoint.families.moe import ROUTING, expert_count, experts, shared_mlp
from megatron_llm.checkpoint.families.mrope import mrope_as
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key, Mapped
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

LINEAR = "layers.{i}.attention"
MLP = "layers.{i}.feed_forward"
KINDS = {"linear_attention": "linear", "full_attention": "full"}


def _read_layer_types(hf: dict) -> dict:
    """layer_types as the config classes fill it when config.json leaves it out: every full_attention_interval-th
    layer full (4), the others linear."""
    interval = hf.get("full_attention_interval") or 4
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                      for i in range(hf["num_hidden_layers"])]
    unknown = set(types) - set(KINDS)
    if unknown:
        raise UsageError(f"config.json layer_types {sorted(unknown)} is not supported: these families have "
                         "linear_attention and full_attention layers")
    return dict(layer_types=[KINDS[t] for t in types])


def _write_layer_types(cfg: ModelConfig) -> dict:
    if cfg.sliding_window or any(cfg.layer(i).chunk for i in range(cfg.num_layers)):
        return {"layer_types": "<no sliding or chunked layers here>"}
    return {"layer_types": [f"{'linear' if cfg.layer(i).linear else 'full'}_attention" for i in range(cfg.num_layers)]}


LINEAR_SHAPE = (
    Key("linear_num_key_heads", "linear_num_key_heads", default=16),
    Key("linear_num_value_heads", "linear_num_value_heads", default=32),
    Key("linear_key_head_dim", "linear_key_head_dim", default=128),
    Key("linear_value_head_dim", "linear_value_head_dim", default=128),
    Key("linear_conv_kernel_dim", "linear_conv_kernel", default=4),
)



def _hybrid_attention(head_dim: int) -> tuple:
    """The shape, activation, epsilon, biases and per-head QK-norm every family here reads alike."""
    return (*(e for e in SHAPE if getattr(e, "ours", None) != "head_dim"), Key("head_dim", "head_dim", default=head_dim),
            activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-6),
            Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
            Fixed("mlp_bias", False), Fixed("qk_norm", True), *LINEAR_SHAPE)


# What the Qwen families here are, besides the RoPE entry: Qwen3-Next's config keys and fixed choices.
HYBRID_CONFIG = (
    *_hybrid_attention(256), Fixed("norm_unit_offset", True),
    Fixed("attention_gate", "sigmoid"), Key("attention_bias", "attention_gate_bias", default=False),
    Derived(_read_layer_types, _write_layer_types),
)


def _sizes(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(key heads, query/key width, value heads per key head, value width, key head width)."""
    heads, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    group = cfg.linear_num_value_heads // heads
    return heads, heads * dk, group, cfg.linear_num_value_heads * dv, dk


def _qkvz_to_hf(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """q_proj, k_proj [hk dk, h], v_proj, z_proj [hv dv, h] -> in_proj_qkvz, per key head [q_h; k_h; its value
    heads' v; their z]."""
    heads = cfg.linear_num_key_heads
    return torch.cat([t.reshape(heads, -1, t.shape[-1]) for t in parts], dim=1).reshape(-1, parts[0].shape[-1])


def _qkvz_from_hf(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    heads, dk, v_dim = cfg.linear_num_key_heads, cfg.linear_key_head_dim, _v_dim(cfg)
    grouped = fused.view(heads, -1, fused.shape[-1])  # [hk, 2 dk + 2 group dv, h]
    q, k, v, z = grouped.split([dk, dk, v_dim // heads, v_dim // heads], dim=1)
    return [t.reshape(-1, fused.shape[-1]).contiguous() for t in (q, k, v, z)]


def _ba_to_hf(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """b_proj, a_proj [hv, h] -> in_proj_ba, per key head [its value heads' b; their a]."""
    return _qkvz_to_hf(parts, cfg)  # the same grouping by key head


def _ba_from_hf(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    heads = cfg.linear_num_key_heads
    b, a = fused.view(heads, 2, -1, fused.shape[-1]).unbind(1)  # per key head [its b; its a]
    return [t.reshape(-1, fused.shape[-1]).contiguous() for t in (b, a)]


def _v_dim(cfg: ModelConfig) -> int:
    return cfg.linear_num_value_heads * cfg.linear_value_head_dim


def _qkv_split(cfg: ModelConfig) -> list[int]:
    kv_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    return [kv_dim, kv_dim, _v_dim(cfg)]


def _conv_to_hf(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our conv_q, conv_k, conv_v [channels, taps] -> conv1d.weight [q + k + v channels, 1, taps]."""
    return torch.cat(parts).unsqueeze(1)


def _conv_from_hf(weight: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [t.contiguous() for t in weight.squeeze(1).split(_qkv_split(cfg), dim=0)]


def _qkv_from_hf(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [t.contiguous() for t in fused.split(_qkv_split(cfg), dim=0)]


def _per_head(name: str) -> Mapped:
    """A_log and dt_bias: stored as bare parameters [v_heads], ours the weight of a module (Rows)."""
    return Mapped((f"{LINEAR}.{name}.weight",), lambda parts: parts[0], lambda t: [t])


# The linear layers' tensors every family here names alike, and the attention layers' (Llama's).
LINEAR_TENSORS = {
    **without_mlp(LLAMA_TENSORS),
    "model.layers.{i}.linear_attn.conv1d.weight": Mapped((f"{LINEAR}.conv_q.weight", f"{LINEAR}.conv_k.weight",
                                                          f"{LINEAR}.conv_v.weight"), _conv_to_hf, _conv_from_hf,
                                                         config=True),
    "model.layers.{i}.linear_attn.A_log": _per_head("a_log"),
    "model.layers.{i}.linear_attn.dt_bias": _per_head("dt_bias"),
    "model.layers.{i}.linear_attn.out_proj.weight": f"{LINEAR}.out_proj.weight",
}
# The Qwen families' gated norm, and their full layers' q_proj twice as tall: per head the query's rows, then the
# output gate's.
COMMON_TENSORS = {
    **LINEAR_TENSORS, "model.layers.{i}.linear_attn.norm.weight": f"{LINEAR}.norm.weight",
    **{f"model.layers.{{i}}.self_attn.q_proj.{p}": Fused(
        (f"layers.{{i}}.attention.wq.{p}", f"layers.{{i}}.attention.wg.{p}"), "heads") for p in ("weight", "bias")},
}
QWEN_MOE = {**experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"), **shared_mlp("shared_expert"),
            "model.layers.{i}.mlp.shared_expert_gate.weight": "layers.{i}.feed_forward.shared_gate.weight"}
DENSE_MLP = {k: v for k, v in LLAMA_TENSORS.items() if ".mlp." in k}
SHARED_EXPERTS = (Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size"), Fixed("moe_shared_gate", True),
                  expert_count("num_experts", "num_local_experts"), Key("moe_intermediate_size", "moe_ffn_hidden_size"),
                  *ROUTING)
NO_DENSE_MLP = Derived(lambda hf: dict(ffn_hidden_size=hf["moe_intermediate_size"]), lambda cfg: {})  # every layer MoE

# Qwen3-Next: q, k, v, z and b, a fused per key head; MoE layers every decoder_sparse_step-th (dense ones in
# mlp_only_layers), a sigmoid-gated shared expert beside the routed ones.
QWEN3_NEXT = Family(
    "qwen3_next", "Qwen3NextForCausalLM",
    (*HYBRID_CONFIG, partial_rope(0.25), *SHARED_EXPERTS, Key("norm_topk_prob", "moe_renormalize", default=True),
     Key("decoder_sparse_step", "moe_layer_freq", default=1), Key("mlp_only_layers", "moe_dense_layers", default=[])),
    {**COMMON_TENSORS, **DENSE_MLP, **QWEN_MOE,
     "model.layers.{i}.linear_attn.in_proj_qkvz.weight": Mapped(
         tuple(f"{LINEAR}.{w}_proj.weight" for w in "qkvz"), _qkvz_to_hf, _qkvz_from_hf, config=True,
         config_to_hf=True),
     "model.layers.{i}.linear_attn.in_proj_ba.weight": Mapped(
         (f"{LINEAR}.b_proj.weight", f"{LINEAR}.a_proj.weight"), _ba_to_hf, _ba_from_hf, config=True,
         config_to_hf=True)},
)

QWEN3_5_LINEAR = {
    "model.layers.{i}.linear_attn.in_proj_qkv.weight": Mapped(
        tuple(f"{LINEAR}.{w}_proj.weight" for w in "qkv"), lambda parts: torch.cat(parts), _qkv_from_hf, config=True),
    "model.layers.{i}.linear_attn.in_proj_z.weight": f"{LINEAR}.z_proj.weight",
    "model.layers.{i}.linear_attn.in_proj_b.weight": f"{LINEAR}.b_proj.weight",
    "model.layers.{i}.linear_attn.in_proj_a.weight": f"{LINEAR}.a_proj.weight",
}
QWEN3_5_ROPE = mrope_as(partial_rope(0.25))  # M-RoPE's sections, on text plain RoPE (families/mrope.py)

# Qwen3.5: q, k, v concatenated, z, b, a apart; dense MLPs.
QWEN3_5 = Family("qwen3_5_text", "Qwen3_5ForCausalLM", (*HYBRID_CONFIG, QWEN3_5_ROPE),
                 {**COMMON_TENSORS, **DENSE_MLP, **QWEN3_5_LINEAR})

# Qwen3.5-MoE: every layer MoE, the top-k always renormalised, the shared expert gated as Qwen3-Next's.
QWEN3_5_MOE = Family(
    "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM",
    (*(e for e in HYBRID_CONFIG if getattr(e, "ours", None) != "ffn_hidden_size"), QWEN3_5_ROPE, *SHARED_EXPERTS,
     Fixed("moe_renormalize", True), NO_DENSE_MLP),
    {**COMMON_TENSORS, **QWEN_MOE, **QWEN3_5_LINEAR},
)

LARA_KINDS = {**KINDS, "sliding_attention": "sliding"}
LARA_PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")


def _read_lara_layers(hf: dict) -> dict:
    """Linear, sliding and full layers (the config class's period-5 pattern where config.json leaves it out); only
    the sliding ones rotate (the full ones have no positions)."""
    types = hf.get("layer_types") or [LARA_PATTERN[i % 5] for i in range(hf["num_hidden_layers"])]
    unknown = set(types) - set(LARA_KINDS)
    if unknown:
        raise UsageError(f"config.json layer_types {sorted(unknown)} is not supported: lara_mini has linear_attention, "
                         "sliding_attention and full_attention layers")
    ours = [LARA_KINDS[t] for t in types]
    window = hf.get("sliding_window", 512) if "sliding" in ours else None
    return dict(layer_types=ours, sliding_window=window, nope_layers=[i for i, t in enumerate(ours) if t == "full"])


def _write_lara_layers(cfg: ModelConfig) -> dict:
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    if any(s.mixer == "attention" and (s.rope is None) != (not s.window) or s.chunk for s in specs):
        return {"layer_types": "<positions in the sliding layers only, no chunked layers>"}
    types = ["linear_attention" if s.linear else "sliding_attention" if s.window else "full_attention" for s in specs]
    return {"layer_types": types, "sliding_window": cfg.sliding_window}


def _in_proj_from_hf(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    heads = cfg.linear_num_value_heads
    return [t.contiguous() for t in fused.split([*_qkv_split(cfg), _v_dim(cfg), heads, heads], dim=0)]


# Lara-Mini: Qwen3.5's Gated DeltaNet (its published in_proj concatenating q, k, v, z, b, a; the gated norm named
# out_norm) beside Qwen3's attention without an output gate, RoPE in the sliding layers only, plain norm weights;
# every layer MoE: a softmax top-k beside an ungated shared expert.
LARA_MINI = Family(
    "lara_mini", "LaraMiniForCausalLM",
    (*_hybrid_attention(128), Fixed("norm_unit_offset", False), Derived(_read_lara_layers, _write_lara_layers), ROPE,
     *(e for e in SHARED_EXPERTS if getattr(e, "ours", None) != "moe_shared_gate"), Fixed("moe_shared_gate", False),
     Key("norm_topk_prob", "moe_renormalize", default=True), NO_DENSE_MLP),
    {**LINEAR_TENSORS, **shared_mlp("shared_expert"), "model.layers.{i}.mlp.gate.weight": f"{MLP}.router.weight",
     # transformers 5's stacked experts as saved: gate_up_proj [E, 2 ffn, h] (gate rows first), down_proj [E, h, ffn]
     "model.layers.{i}.mlp.experts.gate_up_proj": Fused((f"{MLP}.experts.w1", f"{MLP}.experts.w3")),
     "model.layers.{i}.mlp.experts.down_proj": f"{MLP}.experts.w2",
     "model.layers.{i}.linear_attn.out_norm.weight": f"{LINEAR}.norm.weight",
     "model.layers.{i}.linear_attn.in_proj.weight": Mapped(
         tuple(f"{LINEAR}.{w}_proj.weight" for w in "qkvzba"), lambda parts: torch.cat(parts), _in_proj_from_hf,
         config=True)},
)

FAMILIES = (QWEN3_NEXT, QWEN3_5, QWEN3_5_MOE, LARA_MINI)
