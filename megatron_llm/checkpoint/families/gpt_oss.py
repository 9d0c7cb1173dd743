"""gpt-oss (OpenAI's open mixture of experts, 20b and 120b) as a table: Llama's attention with biases on every
projection and a learned sink logit per head, sliding and full layers alternating, YaRN RoPE; every layer a MoE
whose router has a bias and takes the softmax of its top-k logits (our renormalised softmax), and whose experts,
with biases, apply the clamped SwiGLU. transformers stores the experts stacked, [E, in, out], with gate and up
interleaved on the last dim: the two named transforms below move them to our [E, out, in] weights."""

import torch

from megatron_llm.checkpoint.families.common import (
    LLAMA_TENSORS,
    SHAPE,
    layers_defaulting,
    rope_defaulting,
    without_mlp,
)
from megatron_llm.checkpoint.families.moe import expert_count, softmax_routing
from megatron_llm.checkpoint.families.table import Family, Fixed, Key, Mapped

EXPERTS = "layers.{i}.feed_forward.experts"


def interleave_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our gate and up (w1, w3 [E, ffn, hidden], or their biases [E, ffn]) -> theirs with gate at the even and up
    at the odd places of the ffn dim: gate_up_proj [E, hidden, 2 ffn] (transposed), gate_up_proj_bias [E, 2 ffn]."""
    fused = torch.stack(parts, dim=2).flatten(1, 2)  # [E, 2 ffn, ...]: g0, u0, g1, u1, ...
    return fused.transpose(1, 2).contiguous() if fused.dim() == 3 else fused


def split_gate_up(fused: torch.Tensor) -> list[torch.Tensor]:
    """interleave_gate_up's inverse: [E, hidden, 2 ffn] or [E, 2 ffn] -> gate, up ([E, ffn, hidden] or [E, ffn])."""
    rows = fused.transpose(1, 2) if fused.dim() == 3 else fused  # [E, 2 ffn, ...]
    return [part.contiguous() for part in rows.unflatten(1, (-1, 2)).unbind(2)]


def transposed_experts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our w2 [E, hidden, ffn] <-> their down_proj [E, ffn, hidden] (each expert's matrix transposed; its own inverse)."""
    (weight,) = parts
    return weight.transpose(1, 2).contiguous()


# GptOssConfig's fills where config.json leaves a key out: YaRN x32 over 4096 positions at base 150000; layer i
# sliding (window 128) where i is even, full where odd.
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}

GPT_OSS = Family(
    "gpt_oss", "GptOssForCausalLM",
    (*SHAPE, Key("rms_norm_eps", "norm_eps", default=1e-5), rope_defaulting(YARN),
     layers_defaulting(128, lambda i: i % 2 == 1),
     Key("attention_bias", "qkv_bias", default=True), Key("attention_bias", "out_bias", default=True),
     Fixed("mlp_bias", False), Fixed("attention_sinks", True),
     # transformers' experts apply _apply_gate whatever hidden_act says
     Fixed("mlp", "swiglu_clamped"), Key("swiglu_alpha", "swiglu_alpha", default=1.702),
     Key("swiglu_limit", "swiglu_limit", default=7.0),
     expert_count("num_local_experts", "num_experts"), *softmax_routing(0.001), Fixed("moe_renormalize", True),
     Fixed("moe_router_bias", True), Fixed("moe_ffn_bias", True)),  # MXFP4 uploads: hf.refuse_quantized
    {**without_mlp(LLAMA_TENSORS),
     "model.layers.{i}.self_attn.sinks": "layers.{i}.attention.sinks.weight",
     "model.layers.{i}.mlp.router.weight": "layers.{i}.feed_forward.router.weight",
     "model.layers.{i}.mlp.router.bias": "layers.{i}.feed_forward.router.bias",
     "model.layers.{i}.mlp.experts.gate_up_proj": Mapped((f"{EXPERTS}.w1", f"{EXPERTS}.w3"), interleave_gate_up, split_gate_up),
     "model.layers.{i}.mlp.experts.gate_up_proj_bias": Mapped((f"{EXPERTS}.w1_bias", f"{EXPERTS}.w3_bias"),
                                                              interleave_gate_up, split_gate_up),
     "model.layers.{i}.mlp.experts.down_proj": Mapped((f"{EXPERTS}.w2",), transposed_experts,
                                                      lambda t: [transposed_experts([t])]),
     "model.layers.{i}.mlp.experts.down_proj_bias": f"{EXPERTS}.w2_bias"},
)

FAMILIES = (GPT_OSS,)
