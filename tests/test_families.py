"""Each family of CASES (the dense ones) against transformers' own model of it, on tiny random models (fp32, CPU):
logits and loss of `megatron_llm.load_model(hf_dir)`, the Hugging Face round trip through native (bit
exact, config fields kept, transformers loads it and gives the same logits), and the Megatron round trip
at tp 2 x pp 2 where Megatron-LM can express the family (refused with one line, nothing written, where
it cannot). Norm weights and biases are randomised so that a mapping mistake shows.

A family is tested by adding its tiny config to CASES; tests/test_family_coverage.py keeps the registry and
the family test modules in step.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families import FAMILIES
from megatron_llm.checkpoint.hf import hf_config_from_model_config, model_config_from_hf
from megatron_llm.errors import UsageError

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
VOCAB, SEQ = 101, 24
# Llama-style names; a family with other key names lists its own in CASES.
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
WINDOW = 8  # shorter than SEQ, so sliding layers differ from full ones
# YaRN from 8 positions, so that Ministral 3's query temperature 1 + beta log1p(floor(p / 8)) changes within SEQ
MINISTRAL3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}
# case -> (config keys over SMALL, whether Megatron-LM can express it). A case is a model_type, or a
# model_type, '-' and a variant name where one family needs several configs (Falcon's two decoders).
CASES = {
    "llama": (dict(attention_bias=True, mlp_bias=True), True),
    "internlm3": (dict(head_dim=16, attention_bias=True, mlp_bias=True), True),
    "iquestcoder": (dict(head_dim=16), True),
    "exaone": ({}, True),
    "vaultgemma": (dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0), False),
    "mistral": (dict(sliding_window=WINDOW), True),  # Megatron's window_size
    "ministral": (dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), True),
    # Ministral 3: YaRN; the query temperature off (beta 0) is a Mistral Megatron-LM holds, on it is not in megatron-core
    "ministral3": (dict(head_dim=16, sliding_window=WINDOW, rope_parameters=dict(MINISTRAL3_YARN, llama_4_scaling_beta=0.0)),
                   True),
    "ministral3-temperature": (dict(head_dim=16, rope_parameters=MINISTRAL3_YARN), False),  # 1, 1.35, 1.55 over SEQ
    "qwen2": ({}, True),
    "qwen3": (dict(head_dim=24, tie_word_embeddings=True), True),
    "smollm3": (dict(no_rope_layers=[1, 0], tie_word_embeddings=True, pad_token_id=0), False),
    "granite": (dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0), False),
    "emu3_text_model": (dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), True),  # Emu3's language model
    # sliding layers with their own base, a full one, a full one without positions; a sink per head
    "granite_swa": (dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0,
                         num_hidden_layers=4, sliding_window=WINDOW, layer_rope_theta=[100.0, 10000.0, 0, 100.0],
                         layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"]),
                    False),
    "hyperclovax": (dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
                    False),
    "gemma": (dict(head_dim=16), False),
    "gemma2": (dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                    query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0), False),
    "gemma3_text": (dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                         query_pre_attn_scalar=24, rope_parameters={
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}), False),
    "olmo": (dict(clip_qkv=0.5), False),
    "olmo2": ({}, False),
    "phi3": (dict(sliding_window=WINDOW, pad_token_id=0, original_max_position_embeddings=16, rope_parameters={  # SEQ > 16: long factors
        "rope_type": "longrope", "partial_rotary_factor": 0.5, "long_factor": [1.0, 2.5, 4.0, 7.0],
        "short_factor": [1.0, 1.2, 1.5, 2.0]}), False),
    "glm": (dict(head_dim=16, pad_token_id=0), True),  # half of each head rotated, in interleaved pairs
    "glm4": (dict(head_dim=16, pad_token_id=0, partial_rotary_factor=0.75), False),
    "nemotron": (dict(attention_bias=True, mlp_bias=True), False),
    "arcee": ({}, False),
    "jais2": ({}, False),
    "nanochat": (dict(final_logit_softcapping=3.0), False),
    "cwm": (dict(head_dim=16, sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"], rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0}), True),
    "seed_oss": (dict(head_dim=16, attention_out_bias=True), False),
    "helium": (dict(head_dim=16, attention_bias=True), True),  # interleaved pairs
    "ernie4_5": (dict(head_dim=16, use_bias=True, tie_word_embeddings=False), True),  # interleaved pairs, every bias
    "exaone4": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), False),
    "olmo3": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},  # YaRN on the full layer alone
        "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}}),
        False),
    "hunyuan_v1_dense": (dict(head_dim=16, attention_bias=True, rope_parameters={  # NTK-alpha: a stretched base
        "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}), False),
    "apertus": (dict(attention_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "original_max_position_embeddings": 16, "low_freq_factor": 1.0, "high_freq_factor": 4.0}), False),
    "apertus1p5_text": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), False),
    # the released checkpoints' pruned head: rows for the first 80 ids only (inputs keep all 101)
    "apertus1p5_text-pruned": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, output_vocab_size=80,
                                    tie_word_embeddings=False), False),
    "gpt2": (dict(n_inner=96), False),
    "openai-gpt": (dict(n_embd=64, n_layer=2, n_head=4, n_positions=64), False),
    "gptj": (dict(n_inner=96, rotary_dim=8), False),
    "codegen": (dict(n_inner=96, rotary_dim=4, num_attention_heads=8), False),  # q/k/v fused per shard, 2 heads each
    "gpt_neo": (dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW), False),
    "gpt_bigcode": (dict(n_inner=96), False),  # multi-query: c_attn is [q; k; v]
    "gpt_bigcode-mha": (dict(n_inner=96, multi_query=False), False),  # c_attn per head [q_h; k_h; v_h]
    "opt": (dict(ffn_dim=96, word_embed_proj_dim=64, pad_token_id=1), False),  # pre-norm, a final norm
    "opt-post": (dict(ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=False, enable_bias=False,
                      layer_norm_elementwise_affine=False, tie_word_embeddings=False), False),  # the 350m's post-norm
    "biogpt": ({}, False),
    "xglm": (dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=96, max_position_embeddings=64), False),
    "gpt_neox": (dict(rotary_pct=0.5), False),
    "bloom": ({}, False),
    "mpt": (dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, attn_config={"clip_qkv": 0.5, "softmax_scale": 0.2}),
            False),
    "falcon": (dict(bias=True), False),  # the old decoder: parallel, one norm, multi-query
    "falcon-new": (dict(new_decoder_architecture=True, num_kv_heads=2, bias=True), False),
    "phi": (dict(qk_layernorm=True), False),
    "starcoder2": (dict(sliding_window=WINDOW), False),
    "stablelm": (dict(use_qkv_bias=True), True),  # a quarter of each head rotated, in halves
    "cohere": (dict(attention_bias=True, logit_scale=0.5), False),
    "persimmon": ({}, False),
    "cohere_compass_text": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], logit_scale=0.5,
                                 attention_bias=True, rope_parameters={"sliding_attention": {"rope_type": "default",
                                 "rope_theta": 100.0}, "full_attention": None}), False),  # full layers: NoPE
    "cohere2": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], attention_bias=True,
                     logit_scale=0.5), False),
}


def model_type_of(case: str) -> str:
    return case if case in FAMILIES else case.rsplit("-", 1)[0]  # openai-gpt has a '-' of its own


def causal_lm_class(config: transformers.PretrainedConfig) -> type:
    """transformers' causal LM for `config`: its Auto class's, else the one the family's table names (Emu3's language
    model, whose type transformers maps to a class only through the multimodal Emu3Config)."""
    mapping = transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    return mapping[type(config)] if type(config) in mapping else getattr(transformers, FAMILIES[config.model_type].architecture)


def hf_model(case: str) -> torch.nn.Module:
    extra, _ = CASES[case]
    config = transformers.AutoConfig.for_model(model_type_of(case), **{**SMALL, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = causal_lm_class(config)._from_config(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases and ones its norms: randomise so they are tested
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "norm" in name or "ln" in name.split(".")[-2]:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """case -> (its saved directory, the transformers model), built once per module."""
    built: dict = {}

    def get(case: str):
        if case not in built:
            model = hf_model(case)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            built[case] = (path, model)
        return built[case]

    return get


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


FAMILIES_TESTED = {model_type_of(case) for case in CASES}  # tests/test_family_coverage.py gathers these


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_transformers(hf_dir, case):
    assert_logits_and_loss_match(*hf_dir(case))


def assert_logits_and_loss_match(path: Path, hf: torch.nn.Module, x: Optional[torch.Tensor] = None) -> None:
    """`megatron_llm.load_model(path)` gives the logits and loss of transformers' model `hf` saved there, on x
    (default: tokens())."""
    model = megatron_llm.load_model(path)
    x = tokens() if x is None else x
    labels = x % hf.get_output_embeddings().out_features  # ids a pruned head (Apertus 1.5's) predicts; else x itself
    with torch.no_grad():
        expected = hf(x, labels=labels)
        torch.testing.assert_close(model(x), expected.logits, atol=1e-5, rtol=1e-5)
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # ours takes next-token labels, already shifted
        loss = model(x, labels=shifted).sum() / (shifted >= 0).sum()
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)


def assert_greedy_generation_matches(path: Path, hf: torch.nn.Module, prompts: torch.Tensor, new_tokens: int = 10) -> None:
    """generate_ids (one token per step through our cache) gives transformers' greedy continuation of each prompt."""
    from megatron_llm.inference.generate import Sampling, generate_ids
    theirs = hf.generate(prompts, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    ours = generate_ids(megatron_llm.load_model(path).eval(), prompts.tolist(), Sampling(max_new_tokens=new_tokens))
    assert ours == theirs[:, prompts.shape[1]:].tolist()


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    assert_hf_native_hf_round_trip(*hf_dir(case), tmp_path, model_type_of(case))


def assert_hf_native_hf_round_trip(path: Path, hf: torch.nn.Module, tmp_path: Path, model_type: str) -> None:
    """hf -> native -> hf bit exact with the config's fields kept; transformers loads the result with hf's logits."""
    hf_native_hf(path, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.model_type == model_type
    assert model_config_from_hf(config.to_dict()) == model_config_from_hf(hf.config.to_dict())
    config._attn_implementation = "eager"
    back = causal_lm_class(config).from_pretrained(tmp_path / "hf", config=config).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_megatron_round_trip_or_refusal(hf_dir, tmp_path, case):
    path, _ = hf_dir(case)
    # refused by the field, or first by a split the layout cannot make (one kv head at tp 2)
    assert_megatron_round_trip_or_refusal(path, tmp_path, None if CASES[case][1] else "cannot express model|does not divide")


def assert_megatron_round_trip_or_refusal(path: Path, tmp_path: Path, refusal: Optional[str]) -> None:
    """hf -> megatron at tp 2 x pp 2 -> hf bit exact, or (`refusal`: its words) one UsageError with nothing written."""
    if refusal is not None:
        with pytest.raises(UsageError, match=refusal):
            convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2))
        assert not (tmp_path / "mg").exists()
        return
    convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2))
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "hf"), "hf")
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_model_type_is_one_line():
    with pytest.raises(UsageError, match="model_type 'no_such_family' is not supported"):
        model_config_from_hf({"model_type": "no_such_family"})


def test_quantized_checkpoints_are_refused_before_any_tensor(tmp_path):
    """DeepSeek-V3's published fp8 blocks, a GPTQ upload: one line saying how to dequantize where transformers can,
    from config.json alone (the directory holds no tensors), nothing written."""
    import json

    config = transformers.AutoConfig.for_model("llama", **SMALL).to_dict()
    fp8 = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(fp8))
    with pytest.raises(UsageError, match=r"quant_method 'fp8'\).*FineGrainedFP8Config\(dequantize=True\)"):
        convert(str(tmp_path / "fp8"), "hf", str(tmp_path / "out"), "native")
    assert not (tmp_path / "out").exists()
    gptq = {**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(UsageError, match=r"quant_method 'gptq'\): its weights are quantized .*dequantized copy first$"):
        model_config_from_hf(gptq)


def test_missing_key_is_named():
    config = transformers.AutoConfig.for_model("llama", **SMALL).to_dict()
    del config["hidden_size"]
    with pytest.raises(UsageError, match="lacks 'hidden_size'"):
        model_config_from_hf(config)


def test_sliding_window_differs_from_full_attention(hf_dir):
    """The window is real: past it, a sliding layer's output differs from full attention's."""
    path, _ = hf_dir("mistral")
    model = megatron_llm.load_model(path)
    full = megatron_llm.load_model(path)
    full.cfg.sliding_window = None
    for layer in full.layers.values():
        layer.attention.rules = type(layer.attention.rules)()
    with torch.no_grad():
        windowed, plain = model(tokens()), full(tokens())
    torch.testing.assert_close(windowed[:, :WINDOW], plain[:, :WINDOW])
    assert not torch.allclose(windowed[:, WINDOW:], plain[:, WINDOW:], atol=1e-3)
    assert math.isfinite(windowed.sum().item())


def test_megatron_refusal_names_the_field(hf_dir, tmp_path):
    path, _ = hf_dir("gemma2")
    with pytest.raises(UsageError, match=r"model\.\w+="):
        convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=1, pp=1))
    assert not Path(tmp_path / "mg").exists()


# (model_type, a config key the menu cannot express when true): refused on read, by name, in one line.
UNEXPRESSIBLE = [("gpt2", "scale_attn_by_inverse_layer_idx"), ("gpt2", "add_cross_attention"),
                 ("bloom", "apply_residual_connection_post_layernorm"), ("falcon", "alibi"),
                 ("stablelm", "qk_layernorm"), ("cohere", "use_qk_norm"), ("opt", "_remove_final_layer_norm"),
                 ("xglm", "add_cross_attention")]


@pytest.mark.parametrize("model_type, key", UNEXPRESSIBLE)
def test_unexpressible_key_is_named(model_type, key):
    config = transformers.AutoConfig.for_model(model_type, **SMALL, **{key: True}).to_dict()
    with pytest.raises(UsageError, match=f"^config.json {key}=True is not supported: "):
        model_config_from_hf(config)


def test_falcon_decoder_follows_the_model(hf_dir):
    """Separate norms or grouped kv heads take the new decoder; a sequential model with groups fits neither."""
    cfg = model_config_from_hf(hf_dir("falcon-new")[1].config.to_dict())
    assert hf_config_from_model_config(cfg, "falcon")["new_decoder_architecture"]
    with pytest.raises(UsageError, match=r"falcon cannot express model\.num_kv_heads=2 "):
        hf_config_from_model_config(dataclasses.replace(cfg, parallel_residual=False), "falcon")


def test_published_key_spellings_are_read():
    """EXAONE 3 and InternLM3 checkpoints spell some keys as their remote code did; transformers maps them."""
    small = {k: v for k, v in SMALL.items() if k not in ("num_hidden_layers", "num_key_value_heads")}
    exaone = model_config_from_hf({"model_type": "exaone", **small, "num_layers": 3, "num_key_value_heads": 2,
                                   "layer_norm_epsilon": 1e-3, "activation_function": "gelu"})
    assert (exaone.num_layers, exaone.norm_eps, exaone.mlp) == (3, 1e-3, "geglu")
    internlm3 = model_config_from_hf({"model_type": "internlm3", **SMALL, "qkv_bias": True, "bias": True})
    assert internlm3.qkv_bias and internlm3.mlp_bias and internlm3.head_dim == 128
    with pytest.raises(UsageError, match="^internlm3 runs on Llama's code, which needs attention_bias == mlp_bias"):
        model_config_from_hf({"model_type": "internlm3", **SMALL, "qkv_bias": True, "bias": False})


def test_mpt_options_transformers_does_not_run_are_refused():
    config = transformers.AutoConfig.for_model("mpt", d_model=64, n_heads=4, n_layers=2, attn_config={"qk_ln": True})
    with pytest.raises(UsageError, match=r"^config.json attn_config.qk_ln=true is not supported"):
        model_config_from_hf(config.to_dict())


def test_granite_swa_bases_beyond_the_menu_are_refused():
    """One RoPE base per kind of layer (full, sliding): a second one among the full layers, or a sliding base of its
    own beside rope scaling (ours leaves the sliding table unscaled), is refused by name."""
    config = transformers.AutoConfig.for_model("granite_swa", **SMALL, sliding_window=WINDOW,
                                               layer_types=["full_attention", "full_attention"]).to_dict()
    with pytest.raises(UsageError, match=r"^config.json layer_rope_theta \[100.0, 200.0\] gives one kind of layer"):
        model_config_from_hf({**config, "layer_rope_theta": [100.0, 200.0]})
    scaled = {**config, "layer_types": ["sliding_attention", "full_attention"], "layer_rope_theta": [100.0, 200.0],
              "rope_parameters": {"rope_type": "linear", "rope_theta": 200.0, "factor": 2.0}}
    with pytest.raises(UsageError, match=r"^config.json scales the RoPE of every base"):
        model_config_from_hf(scaled)
    assert model_config_from_hf({**scaled, "rope_parameters": {"rope_type": "default", "rope_theta": 200.0}}).rope_local_theta == 100.0


def test_cohere_compass_needs_a_rope_block_per_layer_type():
    """transformers looks up each layer type's block (KeyError without one): refused on read, by name."""
    config = transformers.AutoConfig.for_model("cohere_compass_text", **SMALL).to_dict()  # rope_parameters {}
    with pytest.raises(UsageError, match=r"^config.json rope_parameters has no block for the layer types \['full_attention'\]"):
        model_config_from_hf(config)


def test_opt_350m_projections_are_refused():
    """OPT-350m embeds in 512 dims and projects in and out of its 1024 (project_in, project_out): refused by name."""
    config = transformers.AutoConfig.for_model("opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               ffn_dim=96, word_embed_proj_dim=32).to_dict()
    with pytest.raises(UsageError, match=r"^config.json word_embed_proj_dim=32 is not supported: embeddings narrower"):
        model_config_from_hf(config)


def test_published_ministral3_reads_through_its_mistral3_wrapper():
    """Ministral 3 is published as a mistral3 checkpoint whose text_config is ministral3, its RoPE block in the old
    spelling ("type") with the temperature's beta and transformers' max_position_embeddings inside."""
    text = dict(SMALL, model_type="ministral3", head_dim=16, rope_parameters={
        "type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
        "max_position_embeddings": 262144, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
        "llama_4_scaling_beta": 0.1})
    cfg = model_config_from_hf({"model_type": "mistral3", "text_config": text, "vision_config": {}})
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 16.0
    assert (cfg.attn_temperature_floor, cfg.attn_temperature_scale, cfg.attn_temperature_offset,
            cfg.attn_temperature_layers) == (16384.0, 0.1, 0, "all")


def test_modernbert_decoder_is_refused_by_name():
    config = transformers.AutoConfig.for_model("modernbert-decoder", **SMALL).to_dict()
    with pytest.raises(UsageError, match=r"^model_type 'modernbert-decoder' is not supported: ModernBERT's decoder puts a "
                                         "prediction head"):
        model_config_from_hf(config)



def test_pruned_head_is_refused_where_it_cannot_be(tiny_config):
    """Apertus 1.5's pruned head (model.output_vocab_size) predicts only its rows' ids: data holding a label past them
    is refused in one line before any process group, as transformers' loss refuses such a label (its docs: mask it
    with -100); a tied pruned head (the tie is the whole embedding) and Megatron-LM, which has no such head, by name."""
    from megatron_llm.check_config import check_inputs
    from megatron_llm.checkpoint.megatron import Layout, megatron_args

    cfg = tiny_config(model__output_vocab_size=200)  # the byte corpus ends every document with id 256
    with pytest.raises(UsageError, match=r"\.bin holds token id 256, a label the model's head has no row for: it "
                                         r"predicts ids below 200 \(model\.output_vocab_size\)"):
        check_inputs(cfg)
    check_inputs(tiny_config(model__output_vocab_size=257))
    with pytest.raises(UsageError, match=r"^model\.output_vocab_size \(200\) keeps the first rows of an lm head"):
        tiny_config(model__output_vocab_size=200, model__tie_embeddings=True)
    with pytest.raises(UsageError, match=r"^Megatron-LM cannot express model\.output_vocab_size=200"):
        megatron_args(cfg.model, Layout.of(cfg.model, 1, 1), torch.float32, "local")


def test_pruned_head_generates_as_transformers(hf_dir):
    """Greedy decoding picks among the pruned head's rows only, token for token as transformers' generate, from
    prompts holding ids past those rows."""
    from megatron_llm.inference.generate import Sampling, generate_ids

    path, hf = hf_dir("apertus1p5_text-pruned")
    prompts = tokens()
    assert prompts.max() >= hf.config.output_vocab_size
    ours = generate_ids(megatron_llm.load_model(path), prompts.tolist(), Sampling(max_new_tokens=8))
    with torch.no_grad():
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False,
                             eos_token_id=None)
    assert ours == theirs[:, SEQ:].tolist()
