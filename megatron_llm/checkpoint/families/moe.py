"""Mixture-of-experts families with a router of their own shape, and the expert pieces every MoE table shares: the
router and the experts (stored one tensor per expert, stacked into our [E, ...] weights by `Stacked`), the shared
experts, the expert count and bias, and refusals by name. Softmax top-k routers first (Mixtral, Qwen2/3-MoE, OLMoE,
FlexOlmo), MiniMax-M2's sigmoid one, then HunYuan, Cohere2, Granite (gate/up fused per expert) and ERNIE. DeepSeek's
router and latent attention, and the families that copied them: families/deepseek.py; DBRX: dbrx.py. Every config
value a table cannot reproduce is refused by name on read (`unsupported` and the Derived readers)."""

from typing import Any, Callable

import torch

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    HEAD_DIM,
    LAYERS,
    LLAMA_CONFIG,
    LLAMA_TENSORS,
    ROPE,
    activation,
    rope_defaulting,
    without,
    without_mlp,
    write_every_layer_type,
)
from megatron_llm.checkpoint.families.dense import HUNYUAN_DENSE
from megatron_llm.checkpoint.families.gpt import WHOLE_ROPE
from megatron_llm.checkpoint.families.layernorm import TIED
from megatron_llm.checkpoint.families.llama import GRANITE, GRANITE_SWA, MISTRAL, OLMO2, QWEN2, QWEN3
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key, Mapped, Stacked, get_family_value
from megatron_llm.errors import UsageError


def unsupported(hf_key: str, why: str) -> Derived:
    """A key whose non-null value the model cannot reproduce: refused by name on read, never written."""

    def read(hf: dict) -> dict:
        if hf.get(hf_key):
            raise UsageError(f"config.json {hf_key}={hf[hf_key]!r} is not supported: {why}")
        return {}

    return Derived(read, lambda cfg: {})


def expert_count(hf_key: str, other: str) -> Derived:
    """model.moe_experts from `hf_key`, or from `other` where transformers' attribute map wrote that name
    (Qwen3-MoE's config.json says num_experts, its to_dict num_local_experts)."""

    def read(hf: dict) -> dict:
        count = hf.get(hf_key) or hf.get(other)
        if not count:
            raise UsageError(f"config.json lacks {hf_key!r}, the number of experts")
        return dict(moe_experts=count)

    return Derived(read, lambda cfg: {hf_key: cfg.moe_experts})


def experts(prefix: str, gate: str, up: str, down: str, router: str = "gate") -> dict:
    """The router (`router`.weight) and the stacked experts under `prefix` (the layer's MoE module), with the
    family's names for the gate, up and down projections of one expert."""
    ours = "layers.{i}.feed_forward"
    return {
        f"{prefix}.{router}.weight": f"{ours}.router.weight",
        f"{prefix}.experts.{{e}}.{gate}.weight": Stacked(f"{ours}.experts.w1"),
        f"{prefix}.experts.{{e}}.{up}.weight": Stacked(f"{ours}.experts.w3"),
        f"{prefix}.experts.{{e}}.{down}.weight": Stacked(f"{ours}.experts.w2"),
    }


def shared_mlp(prefix: str) -> dict:
    """Llama's MLP names under `prefix` (the shared experts' module) -> our shared_experts."""
    return {k.replace(".mlp.", f".mlp.{prefix}."): v.replace(".feed_forward.", ".feed_forward.shared_experts.")
            for k, v in LLAMA_TENSORS.items() if ".mlp." in k}


def softmax_routing(aux_loss_coeff: float) -> tuple:
    """transformers' names: top-k of a softmax, the load-balancing coefficient (`aux_loss_coeff` where config.json
    leaves it out: the config class's)."""
    return (Key("num_experts_per_tok", "moe_top_k"),
            Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=aux_loss_coeff), Fixed("moe_score", "softmax"))


def shared_experts(hf_key: str, default: int) -> Derived:
    """model.moe_shared_ffn_hidden_size from the count of shared experts, each moe_intermediate_size wide (one
    MLP of their summed width is the same function); `default` where config.json leaves the count out."""

    def read(hf: dict) -> dict:
        return dict(moe_shared_ffn_hidden_size=get_family_value(hf, hf_key, default=default) * hf["moe_intermediate_size"])

    return Derived(read, lambda cfg: {hf_key: cfg.moe_shared_ffn_hidden_size // cfg.moe_ffn_hidden_size})


def _require_experts(cfg) -> dict:
    """Export to a family whose every config reads experts (its writers divide by their width): a dense model is
    refused here by name, not by the arithmetic."""
    if not cfg.moe_experts:
        raise UsageError("a mixture-of-experts family cannot express model.moe_experts=0 (a dense model); choose "
                         "another --output-family")
    return {}


EXPERTS_REQUIRED = Derived(lambda hf: {}, _require_experts)
EXPERT_BIAS = "layers.{i}.feed_forward.router.expert_bias"  # added to the scores for the choice only (not the weights)


ROUTING = softmax_routing(0.001)  # Mixtral's and Qwen's
# Qwen-style MoE layers: an expert width of their own, every n-th layer sparse, some layers kept dense.
QWEN_LAYOUT = (
    expert_count("num_experts", "num_local_experts"),
    Key("moe_intermediate_size", "moe_ffn_hidden_size"),
    Key("norm_topk_prob", "moe_renormalize", default=False),
    Key("decoder_sparse_step", "moe_layer_freq", default=1),
    Key("mlp_only_layers", "moe_dense_layers", default=[]),
)
QWEN_EXPERTS = {**LLAMA_TENSORS, **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj")}

MIXTRAL = Family(
    "mixtral", "MixtralForCausalLM",
    (*MISTRAL.config, *ROUTING, expert_count("num_local_experts", "num_experts"),
     Fixed("moe_renormalize", True), unsupported("router_jitter_noise", "the router has no jitter")),
    {**without_mlp(LLAMA_TENSORS),
     **experts("model.layers.{i}.block_sparse_moe", "w1", "w3", "w2")},
)

QWEN2_MOE = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM",
    (*without(QWEN2.config, "qkv_bias"), Key("qkv_bias", "qkv_bias", default=True), *ROUTING, *QWEN_LAYOUT,
     Key("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size"), Fixed("moe_shared_gate", True)),
    {**QWEN_EXPERTS, **shared_mlp("shared_expert"),
     "model.layers.{i}.mlp.shared_expert_gate.weight": "layers.{i}.feed_forward.shared_gate.weight"},
)

QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", (*QWEN3.config, *ROUTING, *QWEN_LAYOUT), QWEN_EXPERTS)

# OLMoE: OLMo2's QK-norm over the whole projection in a pre-norm block, and experts of intermediate_size.
OLMO_ROUTING = (*softmax_routing(0.01), expert_count("num_experts", "num_local_experts"),
                Key("norm_topk_prob", "moe_renormalize", default=False))
OLMOE = Family(
    "olmoe", "OlmoeForCausalLM",
    (*without(OLMO2.config, "norm_placement"), *OLMO_ROUTING,
     unsupported("clip_qkv", "OLMoE clips q, k and v after their norms, the model before")),
    QWEN_EXPERTS,
)

# FlexOLMo: OLMoE's experts in OLMo2's block (each sublayer's output normed inside the residual).
FLEX_OLMO = Family(
    "flex_olmo", "FlexOlmoForCausalLM",
    (*without(OLMO2.config, "mlp_bias"), Fixed("mlp_bias", False), *OLMO_ROUTING),
    {**without_mlp(OLMO2.tensors),
     **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj")},
)


def _read_minimax_m2_rope(hf: dict) -> dict:
    """MiniMaxM2Config's fills: base 5e6 where config.json gives none, and the rotated part of each head from the
    legacy rotary_dim its published config.json has (rope_parameters' partial_rotary_factor takes precedence)."""
    fill = {"rope_theta": 5000000.0}
    if hf.get("rotary_dim"):
        fill["partial_rotary_factor"] = hf["rotary_dim"] / (hf.get("head_dim") or 128)
    return ROPE.read({**fill, **{k: v for k, v in hf.items() if v is not None}})


# MiniMax-M2: OLMo2's QK-norm over the whole projection in a pre-norm block, part of each head rotated (by halves);
# a sigmoid router choosing with the expert bias, renormalised, no groups or shared experts, whose load-balancing
# loss in transformers takes the softmax of the router's logits (Mixtral's load_balancing_loss_func).
MINIMAX_M2 = Family(
    "minimax_m2", "MiniMaxM2ForCausalLM",
    (*(e for e in without(LLAMA_CONFIG, "qkv_bias", "out_bias", "mlp_bias") if e is not ROPE),
     Derived(_read_minimax_m2_rope, ROPE.write), Fixed("qkv_bias", False), Fixed("out_bias", False),
     Fixed("mlp_bias", False), Fixed("qk_norm", True), Fixed("qk_norm_per_head", False),
     expert_count("num_local_experts", "num_experts"), Key("num_experts_per_tok", "moe_top_k"),
     Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001), Fixed("moe_score", "sigmoid"),
     Fixed("moe_expert_bias", True), Fixed("moe_renormalize", True), Fixed("moe_aux_loss_probs", "softmax"),
     unsupported("router_jitter_noise", "the router has no jitter")),
    {**without_mlp(LLAMA_TENSORS),
     **experts("model.layers.{i}.block_sparse_moe", "w1", "w3", "w2"),
     "model.layers.{i}.block_sparse_moe.e_score_correction_bias": EXPERT_BIAS},
)


def one_for_all_layers(hf_key: str) -> Callable[[Any], Any]:
    """A Key's read for a value a config.json may give per layer (HunYuan's moe_topk): one value, or a list of
    equal ones; a list that varies is refused (every MoE layer has the same router and experts here)."""

    def read(value):
        if not isinstance(value, list):
            return value
        if len(set(value)) != 1:
            raise UsageError(f"config.json {hf_key}={value!r} is not supported: it varies by layer, and every MoE "
                             "layer here has the same router and experts")
        return value[0]

    return read


# HunYuan-MoE (hunyuan_v1_moe): HunYuan dense's attention (QK-norm after RoPE, NTK-alpha RoPE); every layer a
# renormalised softmax top-k over experts as wide as the shared MLP beside them (both intermediate_size).
HUNYUAN_MOE = Family(
    "hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM",
    (*HUNYUAN_DENSE.config, EXPERTS_REQUIRED, Key("num_experts", "moe_experts", read=one_for_all_layers("num_experts")),
     Key("moe_topk", "moe_top_k", read=one_for_all_layers("moe_topk")), Fixed("moe_score", "softmax"),
     Fixed("moe_renormalize", True), Fixed("moe_aux_loss_coeff", 0.0),
     Derived(lambda hf: dict(moe_ffn_hidden_size=hf["intermediate_size"], moe_shared_ffn_hidden_size=hf["intermediate_size"]),
             lambda cfg: {})),
    {**without_mlp(HUNYUAN_DENSE.tensors),
     **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     "model.layers.{i}.mlp.gate.wg.weight": "layers.{i}.feed_forward.router.weight", **shared_mlp("shared_mlp")},
)


def _read_cohere2_moe_layers(hf: dict) -> dict:
    """Which layers slide, rotate and are dense, as Cohere2MoeConfig fills them where config.json leaves them out
    (from first_k_dense_replace, with a pattern of its own for those first layers): RoPE only in the sliding layers
    (with a window), and in the dense ones too where prefix_dense_sliding_window_pattern is 1 (its force_rope)."""
    n, first = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    prefix, pattern = hf.get("prefix_dense_sliding_window_pattern", 1), hf.get("sliding_window_pattern", 4)
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % (prefix if i < first else pattern) == 0 else "sliding_attention"
        for i in [*range(first), *range(n - first)]]
    kinds = hf.get("mlp_layer_types") or ["dense" if i < first else "sparse" for i in range(n)]
    window = hf["sliding_window"] if "sliding_window" in hf else 4096
    dense = [i for i, kind in enumerate(kinds) if kind == "dense"]
    rotating = [i for i, kind in enumerate(types) if (kind == "sliding_attention" and window) or (prefix == 1 and i in dense)]
    return {**LAYERS.read({**hf, "sliding_window": window, "layer_types": types}), "moe_dense_layers": dense,
            "nope_layers": [i for i in range(n) if i not in rotating]}


def _write_cohere2_moe_layers(cfg) -> dict:
    dense = [i for i in range(cfg.num_layers) if not cfg.layer(i).moe]
    return {**write_every_layer_type(cfg),
            "mlp_layer_types": ["dense" if i in dense else "sparse" for i in range(cfg.num_layers)],
            "prefix_dense_sliding_window_pattern": 1 if all(cfg.layer(i).rope for i in dense) else 2}


def _read_cohere2_moe_experts(hf: dict) -> dict:
    """Experts and shared experts intermediate_size wide (the two outputs summed or averaged), the dense first layers
    prefix_dense_intermediate_size; a softmax router takes the softmax of the top-k logits (our renormalised
    softmax), a sigmoid one renormalises or not."""
    width, shared = hf["intermediate_size"], hf.get("num_shared_experts") or 0
    combine = hf.get("shared_expert_combination_strategy", "average") if shared else "sum"  # moot without shared experts
    if combine not in ("sum", "average"):
        raise UsageError(f"config.json shared_expert_combination_strategy={combine!r} is not supported: cohere2_moe "
                         "has sum or average")
    score = hf.get("expert_selection_fn", "softmax")
    if score not in ("softmax", "sigmoid"):
        raise UsageError(f"config.json expert_selection_fn={score!r}: cohere2_moe has softmax or sigmoid")
    return dict(moe_ffn_hidden_size=width, ffn_hidden_size=hf.get("prefix_dense_intermediate_size") or width,
                moe_shared_ffn_hidden_size=shared * width, moe_shared_combine=combine, moe_score=score,
                moe_renormalize=score == "softmax" or hf.get("norm_topk_prob", True))


def _write_cohere2_moe_experts(cfg) -> dict:
    return {"intermediate_size": cfg.moe_ffn_hidden_size, "prefix_dense_intermediate_size": cfg.ffn_hidden_size,
            "num_shared_experts": cfg.moe_shared_ffn_hidden_size // cfg.moe_ffn_hidden_size,
            "shared_expert_combination_strategy": cfg.moe_shared_combine, "expert_selection_fn": cfg.moe_score,
            "norm_topk_prob": cfg.moe_renormalize}


def _read_cohere2_moe_norm(hf: dict) -> dict:
    """RMSNorm where rms_norm_eps is set, else Cohere's LayerNorm without bias."""
    if hf.get("rms_norm_eps") is not None:
        return dict(norm="rmsnorm", norm_eps=hf["rms_norm_eps"])
    return dict(norm="layernorm", norm_bias=False, norm_eps=get_family_value(hf, "layer_norm_eps", default=1e-5))


# Cohere2-MoE: Cohere2's block (attention and feed-forward in parallel from one norm, RoPE in interleaved pairs in
# the sliding layers only, scaled logits) with a top-k router over experts, shared experts, dense first layers.
COHERE2_MOE = Family(
    "cohere2_moe", "Cohere2MoeForCausalLM",
    (*(e for e in TIED if e is not HEAD_DIM and getattr(e, "ours", None) != "ffn_hidden_size"),
     Key("head_dim", "head_dim", default=128), activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
     Derived(_read_cohere2_moe_norm, lambda cfg: {"rms_norm_eps": cfg.norm_eps} if cfg.norm == "rmsnorm" else
             {"rms_norm_eps": None, "layer_norm_eps": cfg.norm_eps}),
     *WHOLE_ROPE, Fixed("rope_interleaved", True), Fixed("parallel_residual", True),
     Key("attention_bias", "qkv_bias", default=False), Key("attention_bias", "out_bias", default=False),
     Fixed("mlp_bias", False), Key("logit_scale", "logit_multiplier", default=0.0625),
     EXPERTS_REQUIRED, Derived(_read_cohere2_moe_layers, _write_cohere2_moe_layers),
     Key("num_experts", "moe_experts", default=8),
     Key("num_experts_per_tok", "moe_top_k", default=2), Derived(_read_cohere2_moe_experts, _write_cohere2_moe_experts),
     Fixed("moe_aux_loss_coeff", 0.0)),
    {**LLAMA_TENSORS, **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     **shared_mlp("shared_experts")},
)

# Granite-MoE: Granite's multipliers (embedding, residual, attention, logits) with Mixtral's router; each layer's
# experts as one [E, 2 ffn, hidden] input_linear (gate, then up, per expert) and one output_linear [E, hidden, ffn].
# GraniteMoeShared adds a shared MLP, its gate/up fused the same way.
GRANITE_EXPERTS = ("layers.{i}.feed_forward.experts.w1", "layers.{i}.feed_forward.experts.w3")
GRANITE_MOE_TENSORS = {
    **without_mlp(LLAMA_TENSORS),
    "model.layers.{i}.block_sparse_moe.router.layer.weight": "layers.{i}.feed_forward.router.weight",
    "model.layers.{i}.block_sparse_moe.input_linear.weight": Fused(GRANITE_EXPERTS),
    "model.layers.{i}.block_sparse_moe.output_linear.weight": "layers.{i}.feed_forward.experts.w2",
}
GRANITE_MOE_CONFIG = (*without(GRANITE.config, "mlp_bias"), Fixed("mlp_bias", False), *ROUTING,
                      expert_count("num_local_experts", "num_experts"), Fixed("moe_renormalize", True))
GRANITE_MOE = Family("granitemoe", "GraniteMoeForCausalLM", GRANITE_MOE_CONFIG, GRANITE_MOE_TENSORS)
GRANITE_MOE_SHARED = Family(
    "granitemoeshared", "GraniteMoeSharedForCausalLM",
    (*GRANITE_MOE_CONFIG, Key("shared_intermediate_size", "moe_shared_ffn_hidden_size", default=0)),
    {**GRANITE_MOE_TENSORS,
     "model.layers.{i}.shared_mlp.input_linear.weight": Fused(tuple(p.replace(".experts.", ".shared_experts.") + ".weight"
                                                                     for p in GRANITE_EXPERTS)),
     "model.layers.{i}.shared_mlp.output_linear.weight": "layers.{i}.feed_forward.shared_experts.w2.weight"},
)

SHARED_GRANITE_MLP = {k: v for k, v in GRANITE_MOE_SHARED.tensors.items() if ".shared_mlp." in k}

# Granite-MoE SWA: Granite SWA's attention (a sink per head, sliding layers, a RoPE base per layer) with Granite-MoE's
# router, optional shared MLP, and its experts under transformers 5's names: gate_up_proj [E, 2 ffn, hidden] (gate,
# then up) and down_proj [E, hidden, ffn]; untied by default.
GRANITE_MOE_SWA = Family(
    "granitemoe_swa", "GraniteMoeSWAForCausalLM",
    (*without(GRANITE_SWA.config, "mlp_bias", "tie_embeddings"), Key("tie_word_embeddings", "tie_embeddings", default=False),
     Fixed("mlp_bias", False), *ROUTING, expert_count("num_local_experts", "num_experts"), Fixed("moe_renormalize", True),
     Key("shared_intermediate_size", "moe_shared_ffn_hidden_size", default=0)),
    {**without_mlp(GRANITE_SWA.tensors), **SHARED_GRANITE_MLP,
     "model.layers.{i}.block_sparse_moe.router.weight": "layers.{i}.feed_forward.router.weight",
     "model.layers.{i}.block_sparse_moe.experts.gate_up_proj": Fused(GRANITE_EXPERTS),
     "model.layers.{i}.block_sparse_moe.experts.down_proj": "layers.{i}.feed_forward.experts.w2"},
)


def _aria_fc1(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=1).transpose(1, 2).contiguous()  # w1, w3 [E, ffn, hidden] -> [E, hidden, 2 ffn]


def _aria_w1_w3(fc1: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2).contiguous() for t in fc1.chunk(2, dim=2)]


def _aria_fc2(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].transpose(1, 2).contiguous()  # w2 [E, hidden, ffn] -> [E, ffn, hidden]


def _aria_w2(fc2: torch.Tensor) -> list[torch.Tensor]:
    return [fc2.transpose(1, 2).contiguous()]


# Aria's language model (aria_text): Llama's attention, every layer sparse: the softmax of the top-k logits (our
# renormalised softmax) over SiLU-gated experts intermediate_size wide, stored [in, out] per expert (fc1: gate then up
# on the last dim; fc2), beside shared experts moe_num_shared_experts times as wide. transformers computes no aux loss.
ARIA_TEXT = Family(
    "aria_text", "AriaTextForCausalLM",
    (*(e for e in LLAMA_CONFIG if getattr(e, "ours", None) != "mlp"), activation("hidden_act", {"silu": "swiglu"}, "silu"),
     EXPERTS_REQUIRED, Key("moe_num_experts", "moe_experts", default=8), Key("moe_topk", "moe_top_k", default=2),
     Fixed("moe_score", "softmax"), Fixed("moe_renormalize", True), Fixed("moe_aux_loss_coeff", 0.0),
     Derived(lambda hf: dict(moe_ffn_hidden_size=hf["intermediate_size"], moe_shared_ffn_hidden_size=hf["intermediate_size"]
                             * get_family_value(hf, "moe_num_shared_experts", default=2)),
             lambda cfg: {"moe_num_shared_experts": cfg.moe_shared_ffn_hidden_size // cfg.moe_ffn_hidden_size})),
    {**without_mlp(LLAMA_TENSORS), **shared_mlp("shared_experts"),
     "model.layers.{i}.mlp.router.weight": "layers.{i}.feed_forward.router.weight",
     "model.layers.{i}.mlp.experts.fc1.weight": Mapped(GRANITE_EXPERTS, _aria_fc1, _aria_w1_w3),
     "model.layers.{i}.mlp.experts.fc2.weight": Mapped(("layers.{i}.feed_forward.experts.w2",), _aria_fc2, _aria_w2)},
)


def _read_ernie_layers(hf: dict) -> dict:
    """Every moe_layer_interval-th layer sparse between moe_layer_start_index and moe_layer_end_index (-1: the
    last); the layers outside that would be sparse by the interval are our dense layers."""
    n, step = hf["num_hidden_layers"], get_family_value(hf, "moe_layer_interval", default=1)
    start = get_family_value(hf, "moe_layer_start_index", default=1)
    end = get_family_value(hf, "moe_layer_end_index", default=-1)
    end = n - 1 if end == -1 else end
    return dict(moe_layer_freq=step, moe_dense_layers=[i for i in range(n) if (i + 1) % step == 0 and not start <= i <= end])


def _write_ernie_layers(cfg) -> dict:
    sparse = [i for i in range(cfg.num_layers) if cfg.layer(i).moe]
    return {"moe_layer_interval": cfg.moe_layer_freq, "moe_layer_start_index": sparse[0], "moe_layer_end_index": sparse[-1]}


def _read_ernie_norm_min(hf: dict) -> dict:
    """ERNIE divides the top-k weights by max(their sum, moe_norm_min). The k largest of E softmax scores sum to at
    least k / E, so below that the clamp never binds and the division is our renormalisation."""
    floor = get_family_value(hf, "moe_k", "num_experts_per_tok") / get_family_value(hf, "moe_num_experts", "num_experts")
    if (hf.get("moe_norm_min") or 0) >= floor:
        raise UsageError(f"config.json moe_norm_min={hf['moe_norm_min']!r} is not supported: a floor on the top-k sum "
                         f"of at least top_k / experts ({floor:g}) would bind, and ours renormalises by the sum itself")
    return {}


def _unsqueezed(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].unsqueeze(0)  # [1, E]: ERNIE keeps one row per expert group, and it has one


def _squeezed(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor.squeeze(0)]


# ERNIE 4.5 MoE: Llama's attention with RoPE in interleaved pairs, use_bias on every projection and the head; a
# softmax router whose choice adds the expert bias (moe_statics), renormalised top-k, shared experts; sparse layers
# by interval within a range.
ERNIE4_5_MOE = Family(
    "ernie4_5_moe", "Ernie4_5_MoeForCausalLM",
    (*(e for e in TIED if getattr(e, "ours", None) != "ffn_hidden_size"), Key("intermediate_size", "ffn_hidden_size"),
     activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     rope_defaulting({"rope_type": "default", "rope_theta": 500000.0}), Fixed("rope_fraction", 1.0),
     Fixed("rope_interleaved", True),
     *(Key("use_bias", ours, default=False) for ours in ("qkv_bias", "out_bias", "mlp_bias", "output_bias")),
     EXPERTS_REQUIRED, Key("moe_num_experts", "moe_experts", also=("num_experts",)), Key("moe_k", "moe_top_k", also=("num_experts_per_tok",)),
     Key("moe_intermediate_size", "moe_ffn_hidden_size"), shared_experts("moe_num_shared_experts", 2),
     Key("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001), Fixed("moe_score", "softmax"),
     Fixed("moe_expert_bias", True), Fixed("moe_renormalize", True), Derived(_read_ernie_norm_min, lambda cfg: {}),
     Derived(_read_ernie_layers, _write_ernie_layers)),
    {**LLAMA_TENSORS, "lm_head.bias": "output.bias", **experts("model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"),
     **shared_mlp("shared_experts"),
     "model.layers.{i}.mlp.moe_statics.e_score_correction_bias": Mapped((EXPERT_BIAS,), _unsqueezed, _squeezed)},
)

FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, FLEX_OLMO, MINIMAX_M2, HUNYUAN_MOE, COHERE2_MOE, GRANITE_MOE,
            GRANITE_MOE_SHARED, GRANITE_MOE_SWA, ERNIE4_5_MOE, ARIA_TEXT)