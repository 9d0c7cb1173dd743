"""Llama 4's text model (Scout, Maverick: model_type llama4_text) as a table. Attention: RoPE on pairs (complex
multiplication), chunked attention on the RoPE layers with a weightless norm of the rotated q and k, full attention
without positions every fourth layer with a query temperature growing with the position. Feed-forward: MoE layers
(every n-th, or those listed) whose router takes the top-k logits' sigmoids and scales each expert's input by its
weight, plus a shared expert of the experts' width; the dense layers' MLPs have a width of their own.
transformers stores the experts stacked [E, in, out], gate then up halves on the last dim of gate_up_proj: the
named transforms below move them to our [E, out, in] weights."""

import torch

from megatron_llm.checkpoint.families.common import LLAMA_TENSORS, rope_defaulting, shape_defaulting, without, without_mlp
from megatron_llm.checkpoint.families.gpt_oss import transposed_experts
from megatron_llm.checkpoint.families.moe import expert_count, unsupported
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key, Mapped
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

FF = "layers.{i}.feed_forward"


def concat_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our w1, w3 [E, ffn, hidden] -> their gate_up_proj [E, hidden, 2 ffn]: gate then up along the last dim."""
    return torch.cat(parts, dim=1).transpose(1, 2).contiguous()


def split_gate_up(fused: torch.Tensor) -> list[torch.Tensor]:
    """concat_gate_up's inverse: gate_up_proj [E, hidden, 2 ffn] -> w1, w3 [E, ffn, hidden]."""
    return [half.transpose(1, 2).contiguous() for half in fused.chunk(2, dim=-1)]


def _read_moe_layers(hf: dict) -> dict:
    """moe_layers, or every interleave_moe_layer_step-th layer (the config class's fill), as our frequency where it
    is that pattern, else every layer sparse but the dense ones listed. Indices past the layers are ignored, as
    transformers ignores them."""
    n, step = hf["num_hidden_layers"], hf.get("interleave_moe_layer_step") or 1
    sparse = hf.get("moe_layers")
    sparse = None if sparse is None else [i for i in sparse if i < n]
    if sparse is None or sparse == list(range(step - 1, n, step)):
        return dict(moe_layer_freq=step, moe_dense_layers=[])
    return dict(moe_layer_freq=1, moe_dense_layers=[i for i in range(n) if i not in sparse])


def _write_moe_layers(cfg: ModelConfig) -> dict:
    return {"interleave_moe_layer_step": cfg.moe_layer_freq,
            "moe_layers": [i for i in range(cfg.num_layers) if cfg.layer(i).moe]}


def _read_positions(hf: dict) -> dict:
    """no_rope_layers (1: RoPE, 0: NoPE; default a NoPE layer every no_rope_layer_interval-th) and layer_types
    (chunked on the RoPE layers where attention_chunk_size is set, as the config class fills it); transformers reads
    the first num_hidden_layers entries of each list."""
    n, chunk = hf["num_hidden_layers"], hf.get("attention_chunk_size")
    interval = hf.get("no_rope_layer_interval") or 4
    uses_rope = (hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)])[:n]
    kinds = (hf.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                       for r in uses_rope])[:n]
    ours = ["chunked" if kind == "chunked_attention" else "full" for kind in kinds]
    return dict(nope_layers=[i for i, r in enumerate(uses_rope) if not r], attention_chunk_size=chunk,
                layer_types=ours if "chunked" in ours else None)


def _write_positions(cfg: ModelConfig) -> dict:
    kinds = [("chunked_attention" if cfg.layer(i).chunk else "full_attention") for i in range(cfg.num_layers)]
    return {"no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
            "attention_chunk_size": cfg.attention_chunk_size, "layer_types": kinds}


def _read_temperature(hf: dict) -> dict:
    on = hf.get("attn_temperature_tuning", True)
    return dict(attn_temperature_floor=float(hf.get("floor_scale") or 8192) if on else None,
                attn_temperature_scale=float(hf.get("attn_scale", 0.1)))


def _write_temperature(cfg: ModelConfig) -> dict:
    floor = cfg.attn_temperature_floor
    if floor is not None and not float(floor).is_integer():
        raise UsageError(f"llama4_text stores floor_scale as an integer: model.attn_temperature_floor {floor} cannot be "
                         "written; choose another --output-family")
    return {"attn_temperature_tuning": floor is not None, "floor_scale": int(floor) if floor is not None else 8192,
            "attn_scale": cfg.attn_temperature_scale}


def _mlp(prefix: str, ours: str) -> dict:
    """Llama's gate/up/down names under `prefix` -> our w1, w3, w2 under `ours`."""
    return {f"{prefix}.{hf}.weight": f"{ours}.{w}.weight" for hf, w in (("gate_proj", "w1"), ("up_proj", "w3"),
                                                                           ("down_proj", "w2"))}


LLAMA4_TEXT = Family(
    "llama4_text", "Llama4ForCausalLM",
    (*without(shape_defaulting(128, 8), "ffn_hidden_size"),
     # intermediate_size: each routed expert's width and the shared expert's (written once: export refuses another
     # shared width); intermediate_size_mlp: the dense layers'
     Key("intermediate_size_mlp", "ffn_hidden_size", default=16384),
     Key("intermediate_size", "moe_ffn_hidden_size", default=8192),
     Derived(lambda hf: dict(moe_shared_ffn_hidden_size=hf.get("intermediate_size") or 8192), lambda cfg: {}),
     Fixed("mlp", "swiglu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     rope_defaulting({"rope_type": "default", "rope_theta": 500000.0}), Fixed("rope_interleaved", True),
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Fixed("mlp_bias", False), Key("use_qk_norm", "qk_l2_norm", default=True),
     Derived(_read_positions, _write_positions), Derived(_read_temperature, _write_temperature),
     expert_count("num_local_experts", "num_experts"), Key("num_experts_per_tok", "moe_top_k", default=1),
     Fixed("moe_score", "sigmoid"), Fixed("moe_renormalize", False), Fixed("moe_weight_input", True),
     # Llama4ForCausalLM adds no router loss, whatever router_aux_loss_coef says: a training step here neither
     Fixed("moe_aux_loss_coeff", 0.0),
     Derived(_read_moe_layers, _write_moe_layers),
     unsupported("router_jitter_noise", "the router has no jitter")),
    {**without_mlp(LLAMA_TENSORS),
     **_mlp("model.layers.{i}.feed_forward", FF),
     **_mlp("model.layers.{i}.feed_forward.shared_expert", f"{FF}.shared_experts"),
     "model.layers.{i}.feed_forward.router.weight": f"{FF}.router.weight",
     "model.layers.{i}.feed_forward.experts.gate_up_proj": Mapped((f"{FF}.experts.w1", f"{FF}.experts.w3"),
                                                                  concat_gate_up, split_gate_up),
     "model.layers.{i}.feed_forward.experts.down_proj": Mapped((f"{FF}.experts.w2",), transposed_experts,
                                                               lambda t: [transposed_experts([t])])},
)

FAMILIES = (LLAMA4_TEXT,)
