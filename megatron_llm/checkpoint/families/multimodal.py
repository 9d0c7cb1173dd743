"""Multimodal checkpoints read as their language model: Llama 4 Scout/Maverick (llama4), Gemma 3 4b and up
(gemma3), Mistral Small 3.1 (mistral3), LLaVA (llava), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V and
GLM-4.5V (their M-RoPE read as RoPE: families/mrope.py), Qwen3.5 and Qwen3.5-MoE (families/hybrid.py), Aria
(aria_text: families/moe.py), Gemma 4 (gemma4, gemma4_unified: families/gemma.py), GOT-OCR 2.0 (got_ocr2: qwen2),
Fuyu (fuyu: persimmon), Emu3 (emu3: emu3_text_model beside its VQ image tokenizer) and MOSS Transcribe Diarize
(moss_transcribe_diarize: qwen3 beside a Whisper-like audio tower), Phi-4-multimodal (phi4_multimodal: phi3, flat,
its image and audio embedders under model.embed_tokens_extend). Their config.json holds the text model's config
under
`text_config` (the published Qwen2-VL and Qwen2.5-VL at its top level) and their safetensors hold its tensors under a
prefix beside a vision tower and projector we do not model. A wrapper is data: its model_type and the config keys
transformers reads from the top level rather than from text_config (it ties the head by the wrapper's
tie_word_embeddings: Mistral 3's top level says true while its text_config says false). The text model then goes
through its own family's table; an export writes that text family, or with --vision-from the wrapper again: its
config.json with ours as text_config (wrap_config), its other tensors copied (hf_io.HFWriter).

The tensor prefixes are the same for every wrapper (Emu3's say text_model where the others say language_model),
in one of three layouts: the published checkpoints and
transformers 5.x's save_pretrained (which reverses its conversion mapping on save) keep the language model
whole under `language_model.` (language_model.model.layers..., language_model.lm_head.weight), while
transformers 5.x's in-memory state_dict has model.language_model.layers... and lm_head.weight (as have the published
Qwen3-VL and GLM-4V, saved so too); Qwen2-VL and Qwen2.5-VL keep the text model's own names (model.layers...,
lm_head.weight) beside `visual.`, as published and as transformers 5 saves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_llm.errors import UsageError


@dataclass(frozen=True)
class Wrapper:
    model_type: str
    # config.json keys that hold at the wrapper's top level, over text_config's, when present there
    top_level: tuple[str, ...] = ("tie_word_embeddings", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    # the text model_type of a config.json without text_config, whose text keys then sit at the top level (the
    # published Qwen2-VL and Qwen2.5-VL, written by transformers 4.4x); None: text_config is required
    flat_text_type: Optional[str] = None
    # stored prefixes inside the text model's layout that are not the text model's (Phi-4's towers sit in its model.)
    not_text: tuple[str, ...] = ()


# transformers 4.x wrote a wrapper's text_config as a diff against its text config class's defaults, so the
# published Gemma 3 and LLaVA 1.5 checkpoints omit the head counts and even the vocabulary: those defaults,
# by text model_type, as transformers 5.24's Gemma3TextConfig and LlamaConfig hold them (a test reads each
# published config both ways).
TEXT_DEFAULTS: dict[str, dict] = {
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window=4096, sliding_window_pattern=6,
                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  hidden_act="silu", tie_word_embeddings=False),
}

WRAPPERS: dict[str, Wrapper] = {w.model_type: w for w in (
    Wrapper("llama4"), Wrapper("gemma3"), Wrapper("mistral3"), Wrapper("llava"),
    Wrapper("qwen2_vl", flat_text_type="qwen2_vl_text"), Wrapper("qwen2_5_vl", flat_text_type="qwen2_5_vl_text"),
    Wrapper("qwen3_vl"), Wrapper("qwen3_vl_moe"), Wrapper("glm4v"), Wrapper("glm4v_moe"), Wrapper("qwen3_5"),
    Wrapper("qwen3_5_moe"), Wrapper("aria"), Wrapper("gemma4"), Wrapper("gemma4_unified"), Wrapper("got_ocr2"),
    Wrapper("fuyu"), Wrapper("emu3"), Wrapper("moss_transcribe_diarize"),
    Wrapper("phi4_multimodal", flat_text_type="phi3", not_text=("model.embed_tokens_extend.",)))}
VISION_KEYS = ("vision_config", "audio_config", "architectures")  # a flat config's keys that are not the text model's

# (prefix of the text model's own name, prefix stored) pairs, first match wins; a layout is chosen by where
# the text model's embedding is found.
LAYOUTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("", "language_model."),),  # published and saved: the whole *ForCausalLM under language_model
    (("model.", "model.language_model."), ("lm_head.", "lm_head.")),  # transformers 5.x in memory, Qwen3-VL
    (("", "text_model."),),  # Emu3's, published and saved
    (("model.", "model.text_model."), ("lm_head.", "lm_head.")),  # Emu3's in memory
    (("model.", "model."), ("lm_head.", "lm_head.")),  # Qwen2-VL, Qwen2.5-VL: the text model's names beside visual.
)
EMBEDDING = "model.embed_tokens.weight"  # the text model's embedding in every family a wrapper holds


@dataclass(frozen=True)
class Unwrapped:
    hf_config: dict  # the text model's config.json: what its family reads and an export writes
    stored: dict[str, str]  # the text model's tensor name -> the name stored in the checkpoint
    left_out: int  # stored tensors that are not the text model's (vision tower, projector)
    wrapper: Optional[str]  # the multimodal model_type, None for a plain text checkpoint
    layout: tuple = ()  # the checkpoint's LAYOUTS entry (a wrapper's)

    def stored_name(self, own: str) -> str:
        """Where this checkpoint's layout keeps the text model's tensor `own`, stored or not (an untied head
        written into a tied checkpoint)."""
        return self.stored.get(own) or _stored(self.layout, own)

    def note(self, where: str) -> Optional[str]:
        if self.wrapper is None:
            return None
        return (f"note: {where} is a {self.wrapper} multimodal checkpoint: reading its {self.hf_config['model_type']} "
                f"language model ({len(self.stored)} tensors) and leaving out {self.left_out} vision/projector tensors; "
                f"an export writes model_type {self.hf_config['model_type']}, or this {self.wrapper} again with --vision-from "
                f"{where}")


def text_config(hf: dict) -> dict:
    """The language model's config.json: `hf` itself unless its model_type is a wrapper."""
    wrapper = WRAPPERS.get(hf.get("model_type"))
    if wrapper is None:
        return hf
    text = hf.get("text_config")
    if text is None and wrapper.flat_text_type is not None:
        text = {**{k: v for k, v in hf.items() if k not in VISION_KEYS}, "model_type": wrapper.flat_text_type}
    if not isinstance(text, dict) or "model_type" not in text:
        raise UsageError(f"config.json of model_type {wrapper.model_type} lacks a text_config with a model_type: "
                         "is it complete?")
    top = {k: hf[k] for k in wrapper.top_level if hf.get(k) is not None}
    return {**TEXT_DEFAULTS.get(text["model_type"], {}), **text, **top}


def unwrap(hf: dict, names: list[str]) -> Unwrapped:
    """The text model's config and tensors of a checkpoint whose config.json is `hf` and whose stored tensors
    are `names`."""
    text = text_config(hf)
    if text is hf:
        return Unwrapped(hf, {n: n for n in names}, 0, None)
    present = set(names)
    for layout in LAYOUTS:
        if _stored(layout, EMBEDDING) in present:
            break
    towers = WRAPPERS[hf["model_type"]].not_text
    stored = {own: name for name in names if not name.startswith(towers) for own in [_own(layout, name)] if own is not None}
    return Unwrapped(text, stored, len(names) - len(stored), hf["model_type"], layout)


def wrap_config(hf: dict, text: dict) -> dict:
    """The wrapper's config.json `hf` holding the language model config `text` instead of its own: in text_config,
    or at the top level where `hf` keeps it there (flat), with the top-level keys transformers lets win over
    text_config set to text's, so that both say the same (a tied head, the vocabulary, the token ids)."""
    wrapper = WRAPPERS[hf["model_type"]]
    text = {k: v for k, v in text.items() if k != "architectures"}  # the wrapper's class loads it, not the text model's
    if "text_config" not in hf:  # flat: text's keys at the top level beside the vision ones
        return {**text, **{k: hf[k] for k in VISION_KEYS if k in hf}, "model_type": wrapper.model_type}
    top = {k: text[k] for k in wrapper.top_level if k in hf and k in text}
    return {**hf, **top, "text_config": text}


def _stored(layout, own: str) -> str:
    prefix, at = next((p, s) for p, s in layout if own.startswith(p))
    return at + own[len(prefix):]


def _own(layout, name: str) -> Optional[str]:
    """The text model's name for the stored `name`, None for a tensor outside the language model."""
    for prefix, at in layout:
        if name.startswith(at):
            return prefix + name[len(at):]
    return None
