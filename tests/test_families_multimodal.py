"""Multimodal checkpoints (checkpoint/families/multimodal.py) read as their language model: a tiny random
model of each wrapper from transformers, with a tiny vision tower, saved as transformers saves it; our model
must give its logits on text-only input, the text model we export must give them under transformers too, and
written back with --vision-from it must be the checkpoint it came from (test_families_multimodal_export.py: a
changed language model written back)."""

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import ROOT, perturb_norms_and_biases, tiny_overrides, transformers_first_loss
from megatron_llm import load_model
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families.multimodal import WRAPPERS, unwrap
from megatron_llm.checkpoint.hf import hf_to_native, model_config_from_hf
from megatron_llm.checkpoint.hf_io import SINGLE
from megatron_llm.config import load_config
from test_convert import run_cli
from test_families import causal_lm_class

VOCAB = 128
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=VOCAB)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
# wrapper -> (text config, vision config, wrapper keys); the image token is the last id, never in the input


def whole(model, x):
    return model(input_ids=x).logits


def inner_causal_lm(model, x):
    """Llama 4's whole forward fails on text-only input in transformers 5.24 (it builds its output from the
    inner model's `image_outputs`, which that has not): the Llama4ForCausalLM it wraps is its text path."""
    return model.language_model(input_ids=x).logits


def text_model_with_head(directory):
    """transformers' text model of an exported Qwen-VL language model (the *_vl_text types have no causal-LM class):
    its hidden states times the exported head."""
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    with safe_open(directory / "model.safetensors", "pt") as f:
        head = f.get_tensor("lm_head.weight")
    return lambda x: model(input_ids=x).last_hidden_state @ head.T


def causal_lm(directory):
    config = transformers.AutoConfig.from_pretrained(directory)  # Emu3's text model has no Auto causal-LM class
    model = causal_lm_class(config).from_pretrained(directory, attn_implementation="eager").eval()
    return lambda x: model(x).logits


REFERENCE = {"llama4": inner_causal_lm}  # else the whole model
# Qwen-VL: a tiny tower, its sections covering head_dim 8 (temporal 2, height 1, width 1), their image and video ids
# the last two in the vocabulary; its language model exported as its own family (M-RoPE kept) and as the text family
# whose RoPE equals M-RoPE on text.
QWEN_VISION = dict(depth=1, embed_dim=16, num_heads=2, out_hidden_size=32, spatial_merge_size=1, num_position_embeddings=4,
                   deepstack_visual_indexes=[0])
MROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
QWEN_TOP = {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2}
QWEN3_5_TEXT = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=8, linear_value_head_dim=8,
                   rope_parameters={**MROPE["rope_parameters"], "partial_rotary_factor": 1.0})
QWEN3_5_VISION = {k: v for k, v in QWEN_VISION.items() if k != "deepstack_visual_indexes"}
GLM_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, spatial_merge_size=1)
# experts stacked in memory, one tensor per expert in files (GLM-4.5V), or renamed (Aria's gate_up_proj, fc1 in files):
# transformers' conversion
EXPERTS_SPLIT_ON_SAVE = ("glm4v_moe", "aria", "qwen3_5_moe")
M_ROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
# How transformers loads an exported language model: its *ForCausalLM (the default), or for the M-RoPE types, which
# have no causal-LM class, the text model with the exported head; GLM-4.5V's text model alone reads only stacked
# experts (its whole model converts the per-expert files we write, as published): its checks are the tensors'
# identity with transformers' and the glm4_moe export.
TEXT_EXPORT = {**{w: text_model_with_head for w in M_ROPE}, "glm4v_moe": None}
PLAIN_EXPORT = {"qwen2_vl": "qwen2", "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe", "glm4v": "glm4",
                "glm4v_moe": "glm4_moe"}
GEMMA4_TEXT = dict(global_head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
GEMMA4_VISION = dict(num_key_value_heads=2, head_dim=8)
GOT_VISION = dict(output_channels=8, image_size=32, patch_size=16, global_attn_indexes=[0], mlp_dim=32)
EMU3_VQ = dict(embed_dim=4, codebook_size=16, latent_channels=4, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
               attn_resolutions=[], temporal_downsample_factor=1, hidden_size=32)
AUDIO = dict(num_mel_bins=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_size=16,
             max_source_positions=16)
PHI4_VISION = dict(crop_size=28, image_token_id=VOCAB - 1)
PHI4_AUDIO = dict(hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=16,
                  depthwise_separable_out_channel=16, nemo_conv_channels=16, input_size=8, nemo_final_size=1,
                  audio_token_id=VOCAB - 2)
CASES = {
    "gemma3": (dict(model_type="gemma3_text", sliding_window=4), dict(model_type="siglip_vision_model"), {}),
    # its top level ties the head while its text_config does not: transformers follows the top level
    "mistral3": (dict(model_type="mistral"), dict(model_type="pixtral", head_dim=8), {"tie_word_embeddings": True}),
    "llama4": (dict(model_type="llama4_text", intermediate_size_mlp=64, num_local_experts=2),
               dict(model_type="llama4_vision_model", vision_output_dim=16, projector_input_dim=16, projector_output_dim=32),
               {}),
    "llava": (dict(model_type="llama", tie_word_embeddings=False), dict(model_type="clip_vision_model"), {}),
    # Qwen2-VL's merger outputs vision_config.hidden_size: the text model's width, for its image path to run
    "qwen2_vl": (dict(model_type="qwen2_vl_text", **MROPE), {**QWEN_VISION, "hidden_size": 32}, QWEN_TOP),
    "qwen2_5_vl": (dict(model_type="qwen2_5_vl_text", **MROPE), QWEN_VISION, QWEN_TOP),
    "qwen3_vl": (dict(model_type="qwen3_vl_text", **MROPE), QWEN_VISION, QWEN_TOP),
    # expert width 24: no stacked expert is square, so transformers' loader tells its two layouts apart
    "qwen3_vl_moe": (dict(model_type="qwen3_vl_moe_text", moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                          **MROPE), QWEN_VISION, QWEN_TOP),
    # GLM-4V: pairs of half of each head rotated (GLM-4.5V: halves), a section for each pair; GLM-4.5V's first layer
    # dense, one shared expert, its router bias drawn as the other biases
    "glm4v": (dict(model_type="glm4v_text", rope_parameters={**MROPE["rope_parameters"], "partial_rotary_factor": 0.5,
                                                            "mrope_section": [1, 0, 1]}), GLM_VISION, QWEN_TOP),
    "glm4v_moe": (dict(model_type="glm4v_moe_text", moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                       first_k_dense_replace=1, rope_parameters={**MROPE["rope_parameters"], "partial_rotary_factor": 0.5,
                                                                 "mrope_section": [1, 0, 1]}), GLM_VISION, QWEN_TOP),
    # Qwen3.5 (-MoE): a Gated DeltaNet layer then a full one (families/hybrid.py), whole heads rotated here so that the
    # sections cover them; Qwen3-VL's tower without its deepstack
    "qwen3_5": (dict(model_type="qwen3_5_text", **QWEN3_5_TEXT), QWEN3_5_VISION, QWEN_TOP),
    "qwen3_5_moe": (dict(model_type="qwen3_5_moe_text", moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                         shared_expert_intermediate_size=16, **QWEN3_5_TEXT), QWEN3_5_VISION, QWEN_TOP),
    # Aria: its MoE language model (experts stored [in, out]) beside Idefics3's vision tower and a cross-attention projector
    "aria": (dict(model_type="aria_text", moe_num_experts=4, moe_topk=2), dict(model_type="idefics3_vision"), {}),
    # Gemma 4: a sliding layer and a full one twice as wide, without the per-layer inputs (refused); its own vision tower
    "gemma4": (dict(model_type="gemma4_text", hidden_size_per_layer_input=0, **GEMMA4_TEXT),
               dict(model_type="gemma4_vision", **GEMMA4_VISION), {"image_token_id": VOCAB - 1}),
    "gemma4_unified": (dict(model_type="gemma4_unified_text", **GEMMA4_TEXT),
                       dict(model_type="gemma4_unified_vision", mm_embed_dim=16, mm_posemb_size=4, output_proj_dims=16),
                       {"image_token_id": VOCAB - 1}),
    "got_ocr2": (dict(model_type="qwen2"), GOT_VISION, {}),
    # Fuyu: Persimmon fed linear patch embeddings (no vision config); Emu3: a tiny VQ image tokenizer beside its text model
    "fuyu": (dict(model_type="persimmon"), None, {"image_token_id": VOCAB - 1, "patch_size": 4}),
    "emu3": (dict(model_type="emu3_text_model", pad_token_id=0), None, {"vq_config": EMU3_VQ, "vocabulary_map": {"<image>": VOCAB - 1}}),
    # an audio tower instead; its top level ties the head while its text_config does not
    "moss_transcribe_diarize": (dict(model_type="qwen3"), None, {"audio_config": AUDIO, "audio_token_id": VOCAB - 1}),
    # Phi-4-multimodal: Phi-3's keys at its top level (FLAT) beside tiny image and audio embedders
    "phi4_multimodal": (dict(model_type="phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2), PHI4_VISION,
                        {"audio_config": PHI4_AUDIO}),
}
WHOLE = {w: transformers.AutoModelForCausalLM for w in ("moss_transcribe_diarize", "phi4_multimodal")}  # else image-text
FLAT = ("phi4_multimodal",)  # transformers 5 keeps its text keys at the top level, not in text_config
LANGUAGE_MODEL = ("language_model.", "model.language_model.", "lm_head.", "model.embed_tokens.", "model.layers.",
                  "model.norm.", "text_model.", "model.text_model.")  # the stored prefixes of the layouts' text model


def multimodal_model(wrapper: str, **text_overrides) -> torch.nn.Module:
    """transformers' whole multimodal model, fp32, eager attention, norms and biases drawn away from their constant
    inits."""
    text, vision, top = CASES[wrapper]
    towers = {} if vision is None else {"vision_config": {**VISION, **vision}}
    text = {**TEXT, **text, **text_overrides}
    text = {k: v for k, v in text.items() if k != "model_type"} if wrapper in FLAT else {"text_config": text}
    config = transformers.AutoConfig.for_model(wrapper, **text, **towers, **({"image_token_index": VOCAB - 1} | top))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = WHOLE.get(wrapper, transformers.AutoModelForImageTextToText).from_config(config).eval()
    perturb_norms_and_biases(model, 0.5)
    return model


# the language models read from the wrappers; tests/test_family_coverage.py gathers these
FAMILIES_TESTED = {text["model_type"] for text, _, _ in CASES.values()}


def test_every_wrapper_is_tested():
    assert sorted(CASES) == sorted(WRAPPERS)


@pytest.mark.parametrize("wrapper", sorted(CASES))
def test_multimodal_reads_as_its_language_model(wrapper, tmp_path, capsys):
    model = multimodal_model(wrapper)
    model.save_pretrained(tmp_path / "mm")
    x = torch.randint(0, VOCAB - 1, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = REFERENCE.get(wrapper, whole)(model, x)

    ours = load_model(str(tmp_path / "mm"))
    with safe_open(tmp_path / "mm" / "model.safetensors", "pt") as f:
        vision = [k for k in f.keys() if not k.startswith(LANGUAGE_MODEL)]
    assert vision  # the tower and projector are there, and left out by count
    text_config = CASES[wrapper][0]
    text_type = text_config["model_type"]
    assert f"leaving out {len(vision)} vision/projector tensors" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)

    # transformers 5.x's in-memory names (model.language_model..., lm_head) read the same
    if wrapper not in EXPERTS_SPLIT_ON_SAVE:
        native = hf_to_native(model.state_dict(), json.loads((tmp_path / "mm" / "config.json").read_text()))
        for name, tensor in ours.state_dict().items():
            assert torch.equal(native[name], tensor), name

    convert(str(tmp_path / "mm"), "hf", str(tmp_path / "native"), "native")
    # written back into the multimodal checkpoint: every tensor as it was, read strictly by transformers' wrapper class
    convert(str(tmp_path / "native"), "native", str(tmp_path / "back"), "hf", Options(vision_from=str(tmp_path / "mm")))
    with safe_open(tmp_path / "mm" / SINGLE, "pt") as mm, safe_open(tmp_path / "back" / SINGLE, "pt") as back:
        assert sorted(back.keys()) == sorted(mm.keys())
        assert all(torch.equal(back.get_tensor(name), mm.get_tensor(name)) for name in mm.keys())
    _, info = WHOLE.get(wrapper, transformers.AutoModelForImageTextToText).from_pretrained(tmp_path / "back",
                                                                                          output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    convert(str(tmp_path / "native"), "native", str(tmp_path / "hf"), "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == text_type
    assert written["rope_parameters"].get("mrope_section") == text_config.get("rope_parameters", {}).get("mrope_section")
    with safe_open(tmp_path / "mm" / SINGLE, "pt") as mm, safe_open(tmp_path / "hf" / SINGLE, "pt") as out:
        stored = unwrap(json.loads((tmp_path / "mm" / "config.json").read_text()), list(mm.keys())).stored
        for name in out.keys():  # the text model's tensors as transformers wrote them, bit for bit
            assert torch.equal(out.get_tensor(name), mm.get_tensor(stored[name])), name
    loader = TEXT_EXPORT.get(wrapper, causal_lm)
    with torch.no_grad():
        if loader is not None:
            torch.testing.assert_close(loader(tmp_path / "hf")(x), want, rtol=1e-5, atol=1e-5)
    if wrapper in PLAIN_EXPORT:
        plain = Options(hf_family=PLAIN_EXPORT[wrapper])
        convert(str(tmp_path / "native"), "native", str(tmp_path / "plain"), "hf", plain)
        with torch.no_grad():
            torch.testing.assert_close(causal_lm(tmp_path / "plain")(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, named", [
    # a wrapper holding a text model_type we lack (Ministral 3's ministral3 was this case until fb7d25d read it)
    ({"model_type": "mistral3", "text_config": {**TEXT, "model_type": "no_such_text"}, "vision_config": VISION},
     ("mistral3 checkpoint", "'no_such_text'")),
    # a wrapper holding a text model_type transformers builds and the menu cannot express: refused with its reason
    ({"model_type": "llava", "text_config": {**TEXT, "model_type": "diffllama"}, "vision_config": VISION},
     ("'diffllama' is not supported", "differential attention")),
    # sections covering 10 of head_dim 8's rotated dims (transformers' Qwen2-VL fails on them; Qwen3-VL's slices
    # would silently drop or repeat frequencies), in Qwen2-VL's flat transformers 4 layout
    ({"model_type": "qwen2_vl", **TEXT, "max_position_embeddings": 64,
      "rope_scaling": {"type": "mrope", "mrope_section": [1, 2, 2]}, "vision_config": {}},
     ("mrope_section=[1, 2, 2]", "covers 10 rotary dims", "rotates 8")),
], ids=["unknown-text-type", "not-read-text-type", "mrope-section"])
def test_unexpressible_language_model_is_refused_by_name(config, named, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "--input", tmp_path / "in", "--input-format", "hf", "--output", tmp_path / "out",
                           "--output-format", "native")
    assert code == 2 and err.count("\n") == 1 and all(n in err for n in named), err
    assert not (tmp_path / "out").exists()


# Published config.json files (transformers 4.x), abridged to what the text model reads: Gemma 3 4b's and LLaVA
# 1.5's text_config omit what equals their text config class's defaults, and Gemma 3 1b is in 4.x's layout.
GEMMA3_4B = {"model_type": "gemma3", "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
             "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                             "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
             "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                               "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
LLAVA_15 = {"model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "tie_word_embeddings": False, "vocab_size": 32064,
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
                            "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}
GEMMA3_1B = {"model_type": "gemma3_text", "bos_token_id": 2, "eos_token_id": [1, 106], "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
             "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
             "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
             "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
             "sliding_window_pattern": 6, "vocab_size": 262144}


# Qwen2-VL-7B-Instruct keeps its text keys at the top level (no text_config), its sections in a rope_scaling of type
# mrope; Qwen3-VL-30B-A3B-Instruct has a text_config with interleaved sections and a norm_topk_prob its code ignores.
QWEN2_VL_7B = {"model_type": "qwen2_vl", "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
               "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 28,
               "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
               "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
               "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
               "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584,
                                 "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
QWEN3_VL_30B = {"model_type": "qwen3_vl_moe", "tie_word_embeddings": False, "image_token_id": 151655,
                "text_config": {"bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
                                "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
                                "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_vl_moe_text",
                                "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
                                "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
                                "rms_norm_eps": 1e-06, "rope_theta": 5000000, "vocab_size": 151936,
                                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
                "vision_config": {"depth": 27, "hidden_size": 1152, "model_type": "qwen3_vl_moe", "num_heads": 16,
                                  "out_hidden_size": 2048, "deepstack_visual_indexes": [8, 16, 24]}}

# GLM-4.1V-9B-Thinking: partial_rotary_factor beside its RoPE block, which transformers 5 moves into it.
GLM41V_9B = {"model_type": "glm4v", "tie_word_embeddings": False, "image_token_id": 151343,
             "text_config": {"vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
                             "num_attention_heads": 32, "num_key_value_heads": 2, "max_position_embeddings": 65536,
                             "rms_norm_eps": 1e-05, "partial_rotary_factor": 0.5, "rope_theta": 10000, "attention_bias": True,
                             "hidden_act": "silu", "rope_scaling": {"rope_type": "default", "mrope_section": [8, 12, 12]},
                             "model_type": "glm4v_text", "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338]},
             "vision_config": {"depth": 24, "hidden_size": 1536, "model_type": "glm4v", "out_hidden_size": 4096}}


@pytest.mark.parametrize("published", [GEMMA3_4B, LLAVA_15, GEMMA3_1B, QWEN2_VL_7B, QWEN3_VL_30B, GLM41V_9B],
                         ids=["gemma3-4b", "llava-1.5", "gemma3-1b", "qwen2-vl-7b", "qwen3-vl-30b-a3b", "glm-4.1v-9b"])
def test_published_config_reads_as_transformers_fills_it(published):
    """Ours from the published file == ours from transformers 5.24's reading of it, every field written out."""
    full = transformers.AutoConfig.for_model(**copy.deepcopy(published))
    filled = {**getattr(full, "text_config", full).to_dict(), "tie_word_embeddings": full.tie_word_embeddings}
    assert dataclasses.asdict(model_config_from_hf(published)) == dataclasses.asdict(model_config_from_hf(filled))


@pytest.mark.parametrize("wrapper", ["gemma3", "qwen3_vl_moe"])
def test_init_from_multimodal_starts_at_the_transformers_loss(wrapper, corpus_dir, tmp_path):
    """--checkpoint.init_from a multimodal checkpoint fine-tunes its language model: the first step's loss is the whole
    model's on text (the byte corpus: a vocabulary of 257, the image tokens outside it); written back with
    --vision-from, transformers' whole model gives the trained model's logits."""
    from megatron_llm.training.trainer import train

    text, vision, top = CASES[wrapper]
    widths = dict(vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=64)  # tiny_overrides'
    if "rope_parameters" in text:  # M-RoPE's sections for head_dim 16
        widths["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [4, 2, 2]}
    images = {key: 300 + i for i, key in enumerate(top)} or {"image_token_index": 300}
    config = transformers.AutoConfig.for_model(wrapper, text_config={**TEXT, **text, **widths},
                                               vision_config={**VISION, **vision}, **images)
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageTextToText.from_config(config).eval()
    hf.save_pretrained(tmp_path / "mm")
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(
        corpus_dir, tmp_path / "run", training__steps=1, training__eval_interval=0, checkpoint__init_from=str(tmp_path / "mm")))
    assert (cfg.model.qk_norm, cfg.model.num_layers, cfg.model.tie_embeddings, cfg.model.moe_experts) == (
        True, 2, config.tie_word_embeddings, text.get("num_experts", 0))
    expected, _ = transformers_first_loss(hf, cfg)
    assert train(cfg).losses[0] == pytest.approx(expected, abs=1e-5)

    # and the fine-tuned language model goes back into the multimodal checkpoint, which transformers serves
    convert(cfg.checkpoint.dir, "native", str(tmp_path / "tuned"), "hf", Options(vision_from=str(tmp_path / "mm")))
    tuned = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "tuned", attn_implementation="eager")
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(cfg.checkpoint.dir)(x)
        torch.testing.assert_close(tuned.eval()(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)
        assert (ours - hf(input_ids=x).logits).abs().max() > 1e-4  # the step moved it
