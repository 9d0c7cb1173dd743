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

from megatron_llm.checkpoint.families.common import (GATED_ACTIVATIONS, LLAMA_TENSORS, SHAPE, activation, partial_rope,
                                                    without_mlp)
from megatron_llm.checkpoint.families.moe import ROUTING, expert_count, experts, shared_mlp
from megatron_llm.checkpoint.families.mrope import mrope_as
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key, Mapped
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

LINEAR = "layers.{i}.attention"
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

# What every family here is, besides the RoPE entry: Qwen3-Next's config keys and fixed choices.
HYBRID_CONFIG = (
    *(e for e in SHAPE if getattr(e, "ours", None) != "head_dim"), Key("head_dim", "head_dim", default=256),
    activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-6),
    Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
    Fixed("mlp_bias", False), Fixed("qk_norm", True), Fixed("norm_unit_offset", True),
    Fixed("attention_gate", "sigmoid"), Key("attention_bias", "attention_gate_bias", default=False),
    Derived(_read_layer_types, _write_layer_types), *LINEAR_SHAPE,
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


# The linear layers' tensors every family here names alike, and the full layers' (Llama's, q_proj twice as tall:
# per head the query's rows, then the output gate's).
COMMON_TENSORS = {
    **without_mlp(LLAMA_TENSORS),
    **{f"model.layers.{{i}}.self_attn.q_proj.{p}": Fused(
        (f"layers.{{i}}.attention.wq.{p}", f"layers.{{i}}.attention.wg.{p}"), "heads") for p in ("weight", "bias")},
    "model.layers.{i}.linear_attn.conv1d.weight": Mapped((f"{LINEAR}.conv_q.weight", f"{LINEAR}.conv_k.weight",
                                                          f"{LINEAR}.conv_v.weight"), _conv_to_hf, _conv_from_hf,
                                                         config=True),
    "model.layers.{i}.linear_attn.A_log": _per_head("a_log"),
    "model.layers.{i}.linear_attn.dt_bias": _per_head("dt_bias"),
    "model.layers.{i}.linear_attn.norm.weight": f"{LINEAR}.norm.weight",
    "model.layers.{i}.linear_attn.out_proj.weight": f"{LINEAR}.out_proj.weight",
}
QWEN_MOE = {**experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"), **shared_mlp("shared_expert"),
            "model.layers.{i}.mlp.shared_expert_gate.weight": "layers.{i}.feed_forward.shared_gate.weight"}
DENSE_MLP = {k: v for k, v in LLAMA_TENSORS.items() if ".mlp." in k}
SHARED_EXPERTS = (Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size"), Fixed("moe_shared_gate", True),
                  expert_count("num_experts", "num_local_experts"), Key("moe_intermediate_size", "moe_ffn_hidden_size"),
                  *ROUTING)

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
     Fixed("moe_renormalize", True),
     Derived(lambda hf: dict(ffn_hidden_size=hf["moe_intermediate_size"]), lambda cfg: {})),  # no dense MLPs
    {**COMMON_TENSORS, **QWEN_MOE, **QWEN3_5_LINEAR},
)

FAMILIES = (QWEN3_NEXT, QWEN3_5, QWEN3_5_MOE)
