"""Hugging Face <-> native through the family tables (checkpoint/families/): config.json to ModelConfig
and back, and whole state dicts by name. The streaming reader and writer (hf_io.py) use the same tables.
"""

from __future__ import annotations

import re
from typing import Collection, Optional

from megatron_llm.checkpoint.families import FAMILIES, NOT_READ, family
from megatron_llm.checkpoint.families.multimodal import text_config, unwrap
from megatron_llm.checkpoint.families.table import Family
from megatron_llm.checkpoint.stream import EMBEDDING, HEAD, native_shapes
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

# Older Hugging Face checkpoints saved the RoPE table (and GPT-2, GPT-J and GPT-NeoX their causal masks);
# we recompute them.
HF_IGNORED = re.compile(r".*\.(rotary_emb\.inv_freq|(attn|attention)\.(bias|masked_bias))$")


def text_family(hf_config: dict) -> Family:
    """The family of config.json's language model: its own, or a multimodal wrapper's text_config's."""
    text = text_config(hf_config)
    if text is not hf_config and text["model_type"] not in FAMILIES and text["model_type"] not in NOT_READ:
        raise UsageError(f"the language model of this {hf_config['model_type']} checkpoint has text_config model_type "
                         f"{text['model_type']!r}, which is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return family(text.get("model_type"))  # a NOT_READ type: refused with its reason


# transformers' quantization configs that load a quantized checkpoint dequantized (their dequantize=True)
DEQUANTIZING_CONFIGS = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def refuse_quantized(hf_config: dict) -> None:
    """Published DeepSeek-V3 (fp8 blocks and scales), gpt-oss (MXFP4 experts) and the GPTQ/AWQ/bitsandbytes
    uploads store weights no family table reads: refused by the config, before any tensor is looked at."""
    quantization = text_config(hf_config).get("quantization_config") or hf_config.get("quantization_config")
    if not quantization:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
    how = (f" (transformers: from_pretrained with quantization_config={DEQUANTIZING_CONFIGS[method]}(dequantize=True), "
           "then save_pretrained)" if method in DEQUANTIZING_CONFIGS else "")
    raise UsageError(f"config.json has quantization_config (quant_method {method!r}): its weights are quantized and we "
                     f"read full-precision weights only; save a dequantized copy first{how}")


def model_config_from_hf(hf_config: dict, tensors: Optional[Collection[str]] = None) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 layout, or a multimodal
    wrapper's: its language model), through its family; a quantized checkpoint is refused. `tensors`, the
    names the files hold, decide whether multi-token prediction depths are read (Family.read_config)."""
    refuse_quantized(hf_config)
    return text_family(hf_config).read_config(text_config(hf_config), tensors)


def hf_config_from_model_config(cfg: ModelConfig, model_type: str) -> dict:
    """config.json of `model_type` for `cfg`; UsageError naming the first field the family cannot express."""
    return family(model_type).write_config(cfg)


def infer_family(cfg: ModelConfig) -> str:
    """The first family (in registry order: the plainest first) that expresses `cfg` exactly."""
    for model_type, candidate in FAMILIES.items():
        try:
            candidate.write_config(cfg)
        except UsageError:
            continue
        return model_type
    raise UsageError("no Hugging Face family expresses this model; export it as native or megatron instead")


# Rewritten by the family's write_config, so dropped from a carried-over config: transformers 5 writes
# `rope_parameters` and `dtype`, which would otherwise contradict ours.
REWRITTEN_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype", "layer_types",
                  "architectures", "partial_rotary_factor")


TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # kept across families too
# M-RoPE's layout in a RoPE block (Qwen-VL): text reads it as RoPE (families/mrope.py), the same family gets it back
CARRIED_ROPE_KEYS = ("mrope_section", "mrope_interleaved")


def export_hf_config(cfg: ModelConfig, dtype: str, base: Optional[dict] = None, model_type: Optional[str] = None) -> dict:
    """config.json for `cfg`. `base` is the source model's own config.json when known (from a Hugging Face
    input or carried beside a converted checkpoint): its other fields are kept when the family stays the
    same, its token ids always. The family is `model_type`, else base's, else the plainest that fits (a
    multimodal base's language model: its vision half is not ours to write)."""
    base = text_config(base or {})
    model_type = model_type or base.get("model_type") or infer_family(cfg)
    same_family = base.get("model_type") == model_type
    kept = {k: v for k, v in base.items() if k not in REWRITTEN_KEYS and (same_family or k in TOKEN_KEYS)}
    out = {**kept, **hf_config_from_model_config(cfg, model_type), "torch_dtype": dtype}
    rope = base.get("rope_parameters") or base.get("rope_scaling") or {}
    carried = {k: rope[k] for k in CARRIED_ROPE_KEYS if k in rope} if same_family else {}
    if carried:  # after the family's own RoPE block, which text training reads without them
        out["rope_parameters"] = {**out["rope_parameters"], **carried}
    return out


def hf_to_native(state_dict: dict, hf_config: dict) -> dict:
    """A Hugging Face state dict renamed (and split) to ours. A tied checkpoint may omit the head; the
    native dict then gets output.weight = tok_embeddings.weight, as a tied model's state_dict has. A multimodal
    model's state dict gives its language model's tensors."""
    stored = unwrap(hf_config, list(state_dict)).stored
    cfg = model_config_from_hf(hf_config, stored)
    names = [n for n in native_shapes(cfg) if not (cfg.tie_embeddings and n == HEAD)]
    out = text_family(hf_config).from_hf(names, lambda name: state_dict[stored[name]], cfg)
    if cfg.tie_embeddings:
        out[HEAD] = out[EMBEDDING]
    return out


def native_to_hf(state_dict: dict, cfg: ModelConfig, model_type: str) -> dict:
    """Our state dict as `model_type`'s (the head kept even when tied, as transformers' state_dict has it)."""
    return family(model_type).to_hf(state_dict, cfg)
