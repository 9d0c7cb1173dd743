"""The language models of the vision-language families with multimodal RoPE (M-RoPE): Qwen2-VL, Qwen2.5-VL, Qwen3-VL
and Qwen3-VL-MoE (model_types qwen2_vl_text, ...) as Qwen2's, Qwen3's and Qwen3-MoE's tables, GLM-4.1V and GLM-4.5V
(glm4v_text, glm4v_moe_text) as GLM-4's and GLM-4.5's, each with M-RoPE read in place of its RoPE.

M-RoPE gives each token three positions (temporal, height, width) and splits a head's rotated frequencies into
sections, one per position: contiguous in Qwen2-VL, Qwen2.5-VL and GLM-4V (rope_parameters.mrope_section), interleaved
t,h,w,t,h,w... in Qwen3-VL (its mrope_interleaved flag; its code always interleaves). transformers builds the three
rows of a text-only input from the same arange, so every frequency turns by the one position: ordinary RoPE with
the same inverse frequencies and attention factor (transformers' whole-model logits on text are the proof, in
tests/test_families_multimodal.py). Qwen3-VL's deepstack adds vision features to the first layers' hidden states at
the image tokens only, and passes none without pixels: nothing on text. Sections given are checked to cover the
rotated dims and kept by the carried config (hf.CARRIED_ROPE_KEYS) for an export to the same family.
"""

import torch

from megatron_llm.checkpoint.families.common import (
    GATED_ACTIVATIONS,
    ROPE,
    activation,
    partial_rope,
    shape_defaulting,
    without,
)
from megatron_llm.checkpoint.families.deepseek import GLM4_MOE, glm4_moe_config
from megatron_llm.checkpoint.families.fused import GLM4
from megatron_llm.checkpoint.families.gpt_oss import transposed_experts
from megatron_llm.checkpoint.families.llama import QWEN2, QWEN3
from megatron_llm.checkpoint.families.llama4 import split_gate_up
from megatron_llm.checkpoint.families.moe import QWEN3_MOE
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Key, Mapped
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig


def mrope_as(plain: Derived) -> Derived:
    """`plain` (the text family's RoPE entry) for a config whose RoPE block also holds M-RoPE's sections, checked
    where given (without them transformers fills its own, which text does not use); transformers 4's rope type
    "mrope" is its name for default RoPE with sections."""

    def read(hf: dict) -> dict:
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        section = params.pop("mrope_section", None)
        params.pop("mrope_interleaved", None)
        if params.get("rope_type", params.get("type")) == "mrope":
            params.pop("type", None)
            params["rope_type"] = "default"
        out = plain.read({**hf, "rope_parameters": params, "rope_scaling": None})
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rotated = int(head_dim * out["rope_fraction"])
        if section is not None and 2 * sum(section) != rotated:
            raise UsageError(f"config.json mrope_section={section} covers {2 * sum(section)} rotary dims but each head "
                             f"rotates {rotated}: M-RoPE's sections must sum to half the rotated dims")
        return out

    return Derived(read, plain.write)


def _with_mrope(config: tuple) -> tuple:
    return tuple(mrope_as(e) if e is ROPE else e for e in config)


QWEN2_VL = Family("qwen2_vl_text", "Qwen2VLTextModel", _with_mrope(QWEN2.config), QWEN2.tensors)
QWEN2_5_VL = Family("qwen2_5_vl_text", "Qwen2_5_VLTextModel", QWEN2_VL.config, QWEN2.tensors)
QWEN3_VL = Family("qwen3_vl_text", "Qwen3VLTextModel", _with_mrope(QWEN3.config), QWEN3.tensors)


def _gate_up_from_hf(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """w1, w3 [E, ffn, hidden] from gate_up_proj as transformers 5 holds and saves it ([E, 2 ffn, hidden]: gate rows
    then up rows) or as published ([E, hidden, 2 ffn]); like transformers' loader, the shape of its own parameter wins."""
    if tuple(fused.shape[1:]) == (2 * cfg.moe_ffn_hidden_size, cfg.hidden_size):
        return [half.contiguous() for half in fused.chunk(2, dim=1)]
    return split_gate_up(fused)


def _down_from_hf(down: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """w2 [E, hidden, ffn] from down_proj as transformers 5 holds it (ours) or as published ([E, ffn, hidden])."""
    if tuple(down.shape[1:]) == (cfg.hidden_size, cfg.moe_ffn_hidden_size):
        return [down]
    return [transposed_experts([down])]


EXPERTS = "layers.{i}.feed_forward.experts"
# Qwen3-VL-MoE: Qwen3-MoE's router, always renormalised (its config has no norm_topk_prob); the experts stacked in
# one tensor each, written as transformers 5 writes them: its text model reads only that layout (the published
# [E, in, out] is transposed by its conversion mapping of the whole qwen3_vl_moe model alone).
QWEN3_VL_MOE = Family(
    "qwen3_vl_moe_text", "Qwen3VLMoeTextModel",
    (*_with_mrope(without(QWEN3_MOE.config, "moe_renormalize")), Fixed("moe_renormalize", True)),
    {**{k: v for k, v in QWEN3_MOE.tensors.items() if ".experts." not in k},
     "model.layers.{i}.mlp.experts.gate_up_proj": Mapped((f"{EXPERTS}.w1", f"{EXPERTS}.w3"),
                                                         lambda parts: torch.cat(parts, dim=1), _gate_up_from_hf,
                                                         config=True),
     "model.layers.{i}.mlp.experts.down_proj": Mapped((f"{EXPERTS}.w2",), lambda parts: parts[0], _down_from_hf,
                                                      config=True)},
)



def _read_glm4v_head_dim(hf: dict) -> dict:
    """Glm4vTextAttention's heads are hidden_size / num_attention_heads wide whatever head_dim says (its RoPE takes
    head_dim): a head_dim that differs is a model transformers itself runs inconsistently."""
    width = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, width):
        raise UsageError(f"config.json head_dim={hf['head_dim']} is not supported: glm4v_text's heads are hidden_size / "
                         f"num_attention_heads = {width} wide")
    return dict(head_dim=width)


# GLM-4.1V: GLM-4's block (sandwich norms, gate/up fused, RoPE on interleaved pairs of the first partial_rotary_factor
# of each head), q/k/v biases always, its config class's defaults: whole heads rotated, norm epsilon 1e-5.
GLM4V = Family(
    "glm4v_text", "Glm4vTextModel",
    (*without(shape_defaulting(head_dim=128, kv_heads=2), "head_dim"), Derived(_read_glm4v_head_dim, lambda cfg: {}),
     activation("hidden_act", GATED_ACTIVATIONS, default="silu"), Key("rms_norm_eps", "norm_eps", default=1e-5),
     mrope_as(ROPE), Fixed("rope_interleaved", True), Fixed("qkv_bias", True), Fixed("out_bias", False),
     Fixed("mlp_bias", False), Fixed("norm_placement", "sandwich")),
    GLM4.tensors,
)

# GLM-4.5V: GLM-4.5's model (half of each head rotated by halves, DeepSeek-V3's router) without QK-norm, q/k/v biases
# by default; its experts stored one tensor each, as GLM-4.5's.
GLM4V_MOE = Family(
    "glm4v_moe_text", "Glm4vMoeTextModel",
    tuple(Fixed("qk_norm", False) if getattr(e, "ours", None) == "qk_norm" else
          Key("attention_bias", "qkv_bias", default=True) if getattr(e, "ours", None) == "qkv_bias" else e
          for e in glm4_moe_config(mrope_as(partial_rope(0.5)), 1e-5, False, 1.0)),
    GLM4_MOE.tensors,
)

FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, GLM4V, GLM4V_MOE)
