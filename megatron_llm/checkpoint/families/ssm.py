"""State-space hybrid families: Mamba-2 mixers (model/mamba.py) between attention layers, Bamba (bamba) and
Granite 4.0's hybrids (granitemoehybrid); LFM2's gated short convolutions (model/short_conv.py) between attention
layers (lfm2, and lfm2_moe with experts).

Their Mamba-2 layers store the five input projections fused in one in_proj [z; x; B; C; dt], the convolution over
x, B and C as one conv1d [channels, 1, taps] (and its bias), A_log, D and dt_bias as bare [heads] parameters and the
gated norm's weight as norm.weight; ours are apart so that tensor parallelism splits them by heads and groups.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_llm.checkpoint.families.common import (GATED_ACTIVATIONS, LLAMA_TENSORS, PLAIN_ACTIVATIONS, ROPE, SHAPE,
                                                    activation, partial_rope, shape_defaulting, without)
from megatron_llm.checkpoint.families.llama import GRANITE
from megatron_llm.checkpoint.families.moe import (EXPERT_BIAS, EXPERTS_REQUIRED, GRANITE_MOE_TENSORS, ROUTING,
                                                 SHARED_GRANITE_MLP, experts)
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key, Mapped, Stacked, When
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

MIXER = "layers.{i}.attention"


def _time_step_limit(value) -> float:
    """A time_step_limit bound as config.json holds it: a number, or transformers' {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def _read_mamba(hf: dict) -> dict:
    heads, hidden = hf.get("mamba_n_heads", 128), hf["hidden_size"]
    head_dim = hf.get("mamba_d_head", "auto")
    inner = hf.get("mamba_expand", 2) * hidden
    head_dim = inner // heads if head_dim in (None, "auto") else head_dim
    if head_dim * heads != inner:
        raise UsageError(f"config.json mamba_n_heads x mamba_d_head ({heads} x {head_dim}) is not mamba_expand x "
                         f"hidden_size ({inner}), which transformers requires")
    low, high = (_time_step_limit(v) for v in (hf.get("time_step_limit") or (0.0, math.inf)))
    return dict(mamba_num_heads=heads, mamba_head_dim=head_dim, mamba_dt_floor=low,
                mamba_dt_ceiling=None if math.isinf(high) else high)


def _write_mamba(cfg: ModelConfig) -> dict:
    inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    expand = inner // cfg.hidden_size if inner % cfg.hidden_size == 0 else f"<no mamba_expand for inner width {inner}>"
    high = cfg.mamba_dt_ceiling if cfg.mamba_dt_ceiling is not None else math.inf
    return {"mamba_n_heads": cfg.mamba_num_heads, "mamba_d_head": cfg.mamba_head_dim, "mamba_expand": expand,
            "time_step_limit": [cfg.mamba_dt_floor, high]}


MAMBA_CONFIG = (
    Derived(_read_mamba, _write_mamba),
    Key("mamba_n_groups", "mamba_groups", default=1), Key("mamba_d_state", "mamba_state_size", default=256),
    Key("mamba_d_conv", "mamba_conv_kernel", default=4), Key("mamba_chunk_size", "mamba_chunk_size", default=256),
    Key("mamba_conv_bias", "mamba_conv_bias", default=True), Key("mamba_proj_bias", "mamba_proj_bias", default=False),
)


def layer_kinds(types: list[str], kinds: dict[str, str], family: str) -> dict:
    """layer_types from a family's names of its layer kinds (`kinds`: its name -> ours), unknown names refused."""
    unknown = set(types) - set(kinds)
    if unknown:
        raise UsageError(f"config.json layer_types {sorted(unknown)} is not supported: {family} has "
                         f"{', '.join(sorted(set(kinds)))} layers")
    return dict(layer_types=[kinds[t] for t in types])


def hf_layer_kinds(cfg: ModelConfig, names: dict[str, str]) -> Optional[list[str]]:
    """Each layer's kind in a family's names (`names`: our LayerSpec.mixer, or "mlp" for a block with a feed_forward
    alone -> its name), or None where a layer is of a kind the family does not have (export then refuses by the
    written config)."""
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    kinds = [s.mixer if s.sublayers != "ffn" else "mlp" for s in specs]
    if any(s.window or s.chunk for s in specs) or any(k not in names for k in kinds):
        return None
    return [names[k] for k in kinds]


def _read_attention_layers(hf: dict) -> dict:
    """Bamba's attn_layer_indices: attention there, Mamba-2 elsewhere."""
    attention = set(hf.get("attn_layer_indices") or ())
    return dict(layer_types=["full" if i in attention else "mamba" for i in range(hf["num_hidden_layers"])])


def _write_attention_layers(cfg: ModelConfig) -> dict:
    kinds = hf_layer_kinds(cfg, {"attention": "attention", "mamba": "mamba"})
    return {"attn_layer_indices": [i for i, k in enumerate(kinds) if k == "attention"] if kinds is not None
            else "<only full attention and mamba layers here>"}


def _sizes(cfg: ModelConfig) -> list[int]:
    """Rows of z, x, B, C and dt in the fused in_proj."""
    inner, bc = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_groups * cfg.mamba_state_size
    return [inner, inner, bc, bc, cfg.mamba_num_heads]


def _split(fused: torch.Tensor, cfg: ModelConfig, sizes: list[int]) -> list[torch.Tensor]:
    return [t.contiguous() for t in fused.split(sizes, dim=0)]


def _mapped_rows(parts: tuple[str, ...], sizes) -> Mapped:
    """One stored tensor whose rows are our parts in order (in_proj's weight and bias, conv1d's bias)."""
    return Mapped(parts, lambda ts: torch.cat(ts), lambda t, cfg: _split(t, cfg, sizes(cfg)), config=True)


def _conv_from_hf(weight: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return _split(weight.squeeze(1), cfg, _sizes(cfg)[1:4])


def _bare(name: str) -> Mapped:
    """A_log, D, dt_bias: stored as bare parameters [heads], ours the weight of a module (Rows)."""
    return Mapped((f"{MIXER}.{name}.weight",), lambda parts: parts[0], lambda t: [t])


def mamba_tensors(prefix: str) -> dict:
    """The Mamba-2 mixer's tensors under `prefix` (model.layers.{i}.mamba)."""
    projections = tuple(f"{MIXER}.{p}_proj" for p in ("z", "x", "b", "c", "dt"))
    convs = tuple(f"{MIXER}.conv_{p}" for p in "xbc")
    return {
        f"{prefix}.in_proj.weight": _mapped_rows(tuple(f"{p}.weight" for p in projections), _sizes),
        f"{prefix}.in_proj.bias": _mapped_rows(tuple(f"{p}.bias" for p in projections), _sizes),
        f"{prefix}.conv1d.weight": Mapped(tuple(f"{c}.weight" for c in convs), lambda ts: torch.cat(ts).unsqueeze(1),
                                          _conv_from_hf, config=True),
        f"{prefix}.conv1d.bias": _mapped_rows(tuple(f"{c}.bias" for c in convs), lambda cfg: _sizes(cfg)[1:4]),
        f"{prefix}.A_log": _bare("a_log"), f"{prefix}.D": _bare("d"), f"{prefix}.dt_bias": _bare("dt_bias"),
        f"{prefix}.norm.weight": f"{MIXER}.gate_norm.weight",
        f"{prefix}.out_proj.weight": f"{MIXER}.out_proj.weight",
        f"{prefix}.out_proj.bias": f"{MIXER}.out_proj.bias",
    }


# Bamba: Llama attention (half of each head rotated) at attn_layer_indices, Mamba-2 elsewhere, a SwiGLU MLP
# (feed_forward) in every layer, pre_ff_layernorm before it and final_layernorm at the end.
BAMBA = Family(
    "bamba", "BambaForCausalLM",
    (*SHAPE, activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     partial_rope(0.5), Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Key("mlp_bias", "mlp_bias", default=False), Fixed("rope_fraction", 0.5),
     Derived(_read_attention_layers, _write_attention_layers), *MAMBA_CONFIG),
    {**{k: v for k, v in LLAMA_TENSORS.items() if ".mlp." not in k and "post_attention" not in k
        and k != "model.norm.weight"},
     "model.layers.{i}.pre_ff_layernorm.weight": "layers.{i}.ffn_norm.weight",
     **{k.replace(".mlp.", ".feed_forward."): v for k, v in LLAMA_TENSORS.items() if ".mlp." in k},
     "model.final_layernorm.weight": "norm.weight",
     **mamba_tensors("model.layers.{i}.mamba")},
)



def _read_block_types(hf: dict) -> dict:
    """layer_types as config.json spells them in transformers 5 (linear_attention / full_attention) or as Granite 4.0
    was published (mamba / attention); the config class fills a missing list with Mamba-2 layers."""
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * hf["num_hidden_layers"]
    return layer_kinds(types, {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "full",
                               "attention": "full"}, "Granite 4.0")


def _write_block_types(cfg: ModelConfig) -> dict:
    kinds = hf_layer_kinds(cfg, {"mamba": "linear_attention", "attention": "full_attention"})
    return {"layer_types": kinds if kinds is not None else "<only full attention and mamba layers here>"}


def _read_position(hf: dict) -> dict:
    """position_embedding_type: "rope", or null for attention without positions (NoPE: Granite 4.0's)."""
    kind = hf.get("position_embedding_type")
    if kind not in (None, "rope"):
        raise UsageError(f"config.json position_embedding_type {kind!r} is not supported: rope or null (NoPE)")
    return {**ROPE.read(hf), "position": "rope" if kind == "rope" else "none"}


def _write_position(cfg: ModelConfig) -> dict:
    kind = {"rope": "rope", "none": None}.get(cfg.position, f"<no position_embedding_type for {cfg.position}>")
    return {**ROPE.write(cfg), "position_embedding_type": kind}


def _read_experts(hf: dict) -> dict:
    """num_local_experts routed experts beside the shared MLP (shared_intermediate_size wide); none: the shared MLP
    alone is the layer's dense MLP (Granite 4.0-H-Micro)."""
    count, shared = hf.get("num_local_experts", 8), hf.get("shared_intermediate_size", 1024)
    if count:
        return dict(moe_experts=count, moe_shared_ffn_hidden_size=shared)
    return dict(moe_experts=0, ffn_hidden_size=shared)


def _write_experts(cfg: ModelConfig) -> dict:
    shared = cfg.moe_shared_ffn_hidden_size if cfg.moe_experts else cfg.ffn_hidden_size
    return {"num_local_experts": cfg.moe_experts, "shared_intermediate_size": shared}


# Granite 4.0 (granitemoehybrid): Granite's multipliers (embedding, residual, attention scale, logits), Mamba-2 and
# attention layers by layer_types, attention without positions unless position_embedding_type is rope, and in every
# layer Granite-MoE's routed experts plus a shared MLP (their sum), or the shared MLP alone without experts.
GRANITE_HYBRID = Family(
    "granitemoehybrid", "GraniteMoeHybridForCausalLM",
    (*(e for e in without(GRANITE.config, "mlp_bias") if e is not ROPE), Fixed("mlp_bias", False), *ROUTING,
     Fixed("moe_renormalize", True), Derived(_read_position, _write_position), Derived(_read_experts, _write_experts),
     Derived(_read_block_types, _write_block_types), *MAMBA_CONFIG),
    {**GRANITE_MOE_TENSORS, **SHARED_GRANITE_MLP, **mamba_tensors("model.layers.{i}.mamba")},
    variants=(When({"moe_experts": 0}, {
        "model.layers.{i}.shared_mlp.input_linear.weight": Fused(("layers.{i}.feed_forward.w1.weight",
                                                                   "layers.{i}.feed_forward.w3.weight")),
        "model.layers.{i}.shared_mlp.output_linear.weight": "layers.{i}.feed_forward.w2.weight"}),),
)



def _read_conv_layers(hf: dict) -> dict:
    """LFM2's layer_types (conv / full_attention), or full_attn_idxs as its config class reads them (none: all full)."""
    attention = hf.get("full_attn_idxs")
    types = hf.get("layer_types") or ["full_attention" if attention is None or i in attention else "conv"
                                      for i in range(hf["num_hidden_layers"])]
    return layer_kinds(types, {"conv": "short_conv", "full_attention": "full"}, "LFM2")


def _write_conv_layers(cfg: ModelConfig) -> dict:
    kinds = hf_layer_kinds(cfg, {"short_conv": "conv", "attention": "full_attention"})
    return {"layer_types": kinds if kinds is not None else "<only full attention and short_conv layers here>"}


def _read_lfm2_ffn(hf: dict) -> dict:
    """The MLP's width as Lfm2MLP derives it from intermediate_size when block_auto_adjust_ff_dim: two thirds, times
    block_ffn_dim_multiplier, rounded up to block_multiple_of."""
    width = hf.get("intermediate_size", 12288)
    if hf.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        if hf.get("block_ffn_dim_multiplier", 1.0) is not None:
            multiple = hf.get("block_multiple_of", 256)
            width = int(hf.get("block_ffn_dim_multiplier", 1.0) * width)
            width = multiple * ((width + multiple - 1) // multiple)
    return dict(ffn_hidden_size=width)


# LFM2: gated short convolutions (model/short_conv.py) and grouped-query attention with a per-head QK-norm; a SwiGLU
# feed_forward in every layer, operator_norm / ffn_norm before them and the final norm named embedding_norm; biases
# (conv_bias) on the convolution layers' projections and taps only; tied embeddings by default.
LFM2_CONV = "layers.{i}.attention"
LFM2 = Family(
    "lfm2", "Lfm2ForCausalLM",
    (*(e for e in SHAPE if getattr(e, "ours", None) not in ("ffn_hidden_size", "tie_embeddings")),
     Key("tie_word_embeddings", "tie_embeddings", default=True), Derived(_read_lfm2_ffn, lambda cfg: {
         "intermediate_size": cfg.ffn_hidden_size, "block_auto_adjust_ff_dim": False}),
     Key("norm_eps", "norm_eps", default=1e-5), ROPE, Fixed("mlp", "swiglu"), Fixed("qk_norm", True),
     Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False),
     Key("conv_L_cache", "short_conv_kernel", default=3), Key("conv_bias", "short_conv_bias", default=False),
     Derived(_read_conv_layers, _write_conv_layers)),
    {"model.embed_tokens.weight": "tok_embeddings.weight",
     "model.layers.{i}.operator_norm.weight": "layers.{i}.attention_norm.weight",
     "model.layers.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
     **{f"model.layers.{{i}}.self_attn.{p}_proj.weight": f"layers.{{i}}.attention.w{p}.weight" for p in "qkv"},
     "model.layers.{i}.self_attn.out_proj.weight": "layers.{i}.attention.wo.weight",
     "model.layers.{i}.self_attn.q_layernorm.weight": "layers.{i}.attention.q_norm.weight",
     "model.layers.{i}.self_attn.k_layernorm.weight": "layers.{i}.attention.k_norm.weight",
     **{f"model.layers.{{i}}.feed_forward.w{n}.weight": f"layers.{{i}}.feed_forward.w{n}.weight" for n in "123"},
     **{f"model.layers.{{i}}.conv.in_proj.{p}": _mapped_rows(tuple(f"{LFM2_CONV}.{x}_proj.{p}" for x in "bcx"),
                                                           lambda cfg: [cfg.hidden_size] * 3) for p in ("weight", "bias")},
     "model.layers.{i}.conv.conv.weight": Mapped((f"{LFM2_CONV}.conv.weight",), lambda ts: ts[0].unsqueeze(1),
                                                 lambda t: [t.squeeze(1).contiguous()]),
     "model.layers.{i}.conv.conv.bias": f"{LFM2_CONV}.conv.bias",
     **{f"model.layers.{{i}}.conv.out_proj.{p}": f"{LFM2_CONV}.out_proj.{p}" for p in ("weight", "bias")},
     "model.embedding_norm.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
)

# LFM2-MoE: LFM2 whose layers after the first num_dense_layers hold a mixture of experts (a sigmoid router, the expert
# bias for the choice, top-k renormalised and times routed_scaling_factor, no auxiliary loss); its dense MLPs are
# intermediate_size wide as written (no auto-adjust). transformers renormalises with +1e-6 in the denominator, we
# with +1e-20: a relative difference of ~1e-6 in the routed weights.
LFM2_MOE = Family(
    "lfm2_moe", "Lfm2MoeForCausalLM",
    (*(e for e in LFM2.config if not (isinstance(e, Derived) and e.read is _read_lfm2_ffn)),
     Key("intermediate_size", "ffn_hidden_size"), EXPERTS_REQUIRED, Key("num_experts", "moe_experts"),
     Key("num_experts_per_tok", "moe_top_k"), Key("moe_intermediate_size", "moe_ffn_hidden_size"),
     Key("routed_scaling_factor", "moe_routed_scale", default=1.0), Fixed("moe_score", "sigmoid"),
     Key("use_expert_bias", "moe_expert_bias", default=True), Key("norm_topk_prob", "moe_renormalize", default=True),
     Fixed("moe_aux_loss_coeff", 0.0),
     Derived(lambda hf: dict(moe_dense_layers=list(range(hf.get("num_dense_layers", 2)))),
             lambda cfg: {"num_dense_layers": len(cfg.moe_dense_layers)
                          if cfg.moe_dense_layers == list(range(len(cfg.moe_dense_layers)))
                          else "<only the first layers dense here>"})),
    {**LFM2.tensors, **experts("model.layers.{i}.feed_forward", "w1", "w3", "w2"),
     "model.layers.{i}.feed_forward.expert_bias": EXPERT_BIAS},
)



def _silu_mixer(key: str) -> Derived:
    """The Mamba-2 mixer's activation (on the convolution's output) under `key`: SiLU, the one ours has."""
    def read(hf: dict) -> dict:
        if hf.get(key, "silu") not in ("silu", "swish"):
            raise UsageError(f"config.json {key} {hf[key]!r} is not supported: the Mamba-2 mixer's activation is silu")
        return {}
    return Derived(read, lambda cfg: {key: "silu"})


def _block_types(hf: dict) -> list[str]:
    """Nemotron-H's layers_block_type (transformers 5), or the hybrid_override_pattern its published configs hold
    (one character a layer: M Mamba-2, * attention, - MLP, E mixture of experts)."""
    pattern = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    types = hf.get("layers_block_type") or [pattern.get(c, c) for c in hf.get("hybrid_override_pattern", "")]
    if not types:
        raise UsageError("config.json lacks 'layers_block_type' (or 'hybrid_override_pattern'), which model_type "
                         "nemotron_h needs")
    return types


def _read_block_kinds(hf: dict) -> dict:
    """The layers and their kinds; with "moe" layers, the experts: a sigmoid router with the expert bias for the choice
    (e_score_correction_bias) and group-limited top-k (DeepSeek-V3's), top-k renormalised times routed_scaling_factor,
    no aux loss; plain experts of mlp_hidden_act (no gate) and one shared MLP beside them; the "mlp" layers dense."""
    types = _block_types(hf)
    kinds = layer_kinds(types, {"linear_attention": "mamba", "full_attention": "full", "mlp": "mlp", "moe": "mlp"},
                        "Nemotron-H")
    if "moe" not in types:
        return dict(num_layers=len(types), **kinds)
    if hf.get("moe_latent_size") is not None:
        raise UsageError(f"config.json moe_latent_size {hf['moe_latent_size']} is not supported: the experts work at "
                         "hidden_size, with no latent projections around them")
    return dict(num_layers=len(types), **kinds, moe_experts=hf.get("n_routed_experts", 8),
                moe_top_k=hf.get("num_experts_per_tok", 2), moe_ffn_hidden_size=hf.get("moe_intermediate_size", 7688),
                moe_shared_ffn_hidden_size=hf.get("moe_shared_expert_intermediate_size", 7688),
                moe_routed_scale=float(hf.get("routed_scaling_factor", 1.0)), moe_groups=hf.get("n_group", 1),
                moe_topk_groups=hf.get("topk_group", 1), moe_renormalize=hf.get("norm_topk_prob", True),
                moe_score="sigmoid", moe_expert_bias=True, moe_aux_loss_coeff=0.0,
                moe_dense_layers=[i for i, t in enumerate(types) if t == "mlp"])


def _write_block_kinds(cfg: ModelConfig) -> dict:
    kinds = hf_layer_kinds(cfg, {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp"})
    if kinds is None:
        return {"layers_block_type": "<only full attention, mamba and mlp layers here>"}
    out = {"layers_block_type": ["moe" if cfg.layer(i).moe else k for i, k in enumerate(kinds)]}
    if cfg.moe_experts:
        out.update(n_routed_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_top_k,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size, n_shared_experts=1,
                   moe_shared_expert_intermediate_size=cfg.moe_shared_ffn_hidden_size,
                   routed_scaling_factor=cfg.moe_routed_scale, n_group=cfg.moe_groups, topk_group=cfg.moe_topk_groups,
                   norm_topk_prob=cfg.moe_renormalize, moe_latent_size=None)
    return out


# The Mamba-2 mixer's settings as Nemotron-H names them (its published configs' older mamba_* names read too); the
# time step is clamped below by time_step_min and not above, whatever time_step_limit says (NemotronHMamba2Mixer).
NEMOTRON_H_MAMBA = (
    Key("mamba_num_heads", "mamba_num_heads"), Key("mamba_head_dim", "mamba_head_dim"),
    Key("n_groups", "mamba_groups", default=8, also=("mamba_n_groups",)),
    Key("ssm_state_size", "mamba_state_size", default=128), Key("conv_kernel", "mamba_conv_kernel", default=4,
                                                                 also=("mamba_d_conv",)),
    Key("chunk_size", "mamba_chunk_size", default=128, also=("mamba_chunk_size",)),
    Key("use_conv_bias", "mamba_conv_bias", default=True, also=("mamba_conv_bias",)),
    Key("use_bias", "mamba_proj_bias", default=False), Key("time_step_min", "mamba_dt_floor", default=0.001,
                                                            also=("mamba_dt_min",)),
    Fixed("mamba_dt_ceiling", None), _silu_mixer("mamba_hidden_act"),
)

# Nemotron-H (Nemotron-H 8B/47B/56B, Nemotron-Nano-9B-v2, Nemotron 3 Nano 30B-A3B): blocks of one sublayer each
# (model.single_sublayer) behind an RMS norm, by layers_block_type: a Mamba-2 mixer, attention without positions
# (NoPE) or biases, a plain MLP (relu2: up_proj, down_proj) or a mixture of experts (_read_block_kinds); one norm name,
# backbone.layers.{i}.norm, for whichever sublayer the block holds. Its files name the model backbone, as published
# and as transformers saves them (it reads them as model.); the multi-token prediction layers some publish (mtp.*),
# which transformers ignores, are refused as unexpected tensors.
NEMOTRON_H = Family(
    "nemotron_h", "NemotronHForCausalLM",
    (*(e for e in shape_defaulting(128, 8) if getattr(e, "ours", None) != "num_layers"),
     Derived(_read_block_kinds, _write_block_kinds), activation("mlp_hidden_act", PLAIN_ACTIVATIONS, default="relu2"),
     Key("mlp_bias", "mlp_bias", default=False), Key("layer_norm_epsilon", "norm_eps", default=1e-5),
     Fixed("position", "none"), Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("single_sublayer", True),
     *NEMOTRON_H_MAMBA),
    {"backbone.embeddings.weight": "tok_embeddings.weight",
     "backbone.layers.{i}.norm.weight": "layers.{i}.attention_norm.weight",
     **{f"backbone.layers.{{i}}.mixer.{p}_proj.weight": f"layers.{{i}}.attention.w{p}.weight" for p in "qkv"},
     "backbone.layers.{i}.mixer.o_proj.weight": "layers.{i}.attention.wo.weight",
     **{f"backbone.layers.{{i}}.mixer.{p}_proj.{b}": f"layers.{{i}}.feed_forward.w{n}.{b}"
        for p, n in (("up", 1), ("down", 2)) for b in ("weight", "bias")},
     **mamba_tensors("backbone.layers.{i}.mixer"),
     "backbone.layers.{i}.mixer.gate.weight": "layers.{i}.feed_forward.router.weight",
     "backbone.layers.{i}.mixer.gate.e_score_correction_bias": EXPERT_BIAS,
     **{f"backbone.layers.{{i}}.mixer.experts.{{e}}.{p}_proj.weight": Stacked(f"layers.{{i}}.feed_forward.experts.w{n}")
        for p, n in (("up", 1), ("down", 2))},
     **{f"backbone.layers.{{i}}.mixer.shared_experts.{p}_proj.{b}": f"layers.{{i}}.feed_forward.shared_experts.w{n}.{b}"
        for p, n in (("up", 1), ("down", 2)) for b in ("weight", "bias")},
     "backbone.norm_f.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
    # a block with a feed_forward alone has its norm in that slot, under the same name
    variants=(When({"single_sublayer": True}, {"backbone.layers.{i}.norm.weight": "layers.{i}.ffn_norm.weight"}),),
)


def _read_mamba2(hf: dict) -> dict:
    heads, head_dim = hf.get("num_heads", 128), hf.get("head_dim", 64)
    layers = hf.get("num_hidden_layers", 64)
    low, high = (_time_step_limit(v) for v in (hf.get("time_step_limit") or (0.0, math.inf)))
    return dict(mamba_num_heads=heads, mamba_head_dim=head_dim, num_layers=layers, layer_types=["mamba"] * layers,
                mamba_dt_floor=low, mamba_dt_ceiling=None if math.isinf(high) else high)


def _write_mamba2(cfg: ModelConfig) -> dict:
    inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    expand = inner // cfg.hidden_size if inner % cfg.hidden_size == 0 else f"<no expand for inner width {inner}>"
    kinds = hf_layer_kinds(cfg, {"mamba": "mamba"})
    high = cfg.mamba_dt_ceiling if cfg.mamba_dt_ceiling is not None else math.inf
    return {"num_heads": cfg.mamba_num_heads, "head_dim": cfg.mamba_head_dim, "expand": expand,
            "num_hidden_layers": cfg.num_layers if kinds is not None else "<only mamba layers here>",
            "time_step_limit": [cfg.mamba_dt_floor, high]}


# Mamba-2 (Mamba2ForCausalLM: state-spaces/mamba2-*, Codestral Mamba): every block a norm and a Mamba-2 mixer, no MLP
# and no attention, whose sizes stay placeholders (one head, ffn width 1: nothing is built of them); no positions,
# so model.max_seq_len is fixed at 2^20 tokens (nothing is sized by it). residual_in_fp32 (a bf16 run's residual
# adds in fp32) is not read: fp32 runs are equal.
MAMBA2 = Family(
    "mamba2", "Mamba2ForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("hidden_size", "hidden_size"), Derived(_read_mamba2, _write_mamba2),
     Fixed("num_heads", 1), Fixed("ffn_hidden_size", 1), Fixed("max_seq_len", 1 << 20), Fixed("position", "none"),
     Fixed("single_sublayer", True),
     Key("tie_word_embeddings", "tie_embeddings", default=False), Key("layer_norm_epsilon", "norm_eps", default=1e-5),
     Key("n_groups", "mamba_groups", default=8), Key("state_size", "mamba_state_size", default=128),
     Key("conv_kernel", "mamba_conv_kernel", default=4), Key("chunk_size", "mamba_chunk_size", default=256),
     Key("use_conv_bias", "mamba_conv_bias", default=True), Key("use_bias", "mamba_proj_bias", default=False),
     _silu_mixer("hidden_act")),
    {"backbone.embeddings.weight": "tok_embeddings.weight",
     "backbone.layers.{i}.norm.weight": "layers.{i}.attention_norm.weight",
     **mamba_tensors("backbone.layers.{i}.mixer"),
     "backbone.norm_f.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
)

FAMILIES = (BAMBA, GRANITE_HYBRID, LFM2, LFM2_MOE, NEMOTRON_H, MAMBA2)
