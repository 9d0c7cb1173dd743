"""Gemma 4's language models (families/gemma.py) against transformers' own, tiny and random (fp32, CPU; norms drawn
away from one and each layer's stored scalar away from one): logits and loss of `megatron_llm.load_model(hf_dir)`, the
Hugging Face round trip through native (bit exact, config kept, transformers loads it with the same logits) and the
Megatron refusal by name, through tests/test_families.py's checks. Each Gemma 4 piece of the menu is shown to bite (the
logits move when ours leaves it out), and what the menu has not is refused by its key before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import transformers
from safetensors.torch import load_file

import megatron_llm
from megatron_llm.checkpoint.families import family
from megatron_llm.checkpoint.hf import model_config_from_hf
from megatron_llm.errors import UsageError
from megatron_llm.model.kv_cache import KVCache
from megatron_llm.model.transformer import build_model, flops_per_token
from tests.test_families import (SMALL, WINDOW, assert_hf_native_hf_round_trip, assert_logits_and_loss_match,
                                  assert_megatron_round_trip_or_refusal, tokens)
from tests.test_families_moe import random_hf_model, saved

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# a sliding layer (head_dim 16, its own base 100) and a full one (32 wide, proportional RoPE over a quarter of its
# frequencies); no per-layer inputs (the config class's default, 256, is refused)
GEMMA4 = dict(head_dim=16, global_head_dim=32, sliding_window=WINDOW, hidden_size_per_layer_input=0,
              layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                  "rope_theta": 10000.0}})
# the full layers' values are their keys' projection (no v_proj), with one key/value head where the sliding ones have 2
K_EQ_V = dict(attention_k_eq_v=True, num_global_key_value_heads=1)
# case -> config keys over SMALL and GEMMA4
CASES = {
    "gemma4_text": {},
    "gemma4_text-k_eq_v": dict(K_EQ_V, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma4_unified_text": K_EQ_V,
}
FAMILIES_TESTED = {case.split("-")[0] for case in CASES}  # tests/test_family_coverage.py gathers these


def hf_model(case: str) -> torch.nn.Module:
    model = random_hf_model(case.split("-")[0], {**SMALL, **GEMMA4, **CASES[case]})
    with torch.no_grad():  # transformers fills each layer's scalar with 1: draw it, so that a missing one shows
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """case -> (its saved directory, the transformers model), built once per module."""
    return functools.cache(lambda case: saved(hf_model(case), tmp_path_factory.mktemp(case)))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_transformers(hf_dir, case):
    assert_logits_and_loss_match(*hf_dir(case))


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    assert_hf_native_hf_round_trip(*hf_dir(case), tmp_path, case.split("-")[0])


@pytest.mark.parametrize("case", CASES)
def test_megatron_is_refused_by_name(hf_dir, tmp_path, case):
    assert_megatron_round_trip_or_refusal(hf_dir(case)[0], tmp_path, "cannot express model")


def test_full_layers_have_their_own_shape(hf_dir):
    """The full layers' width and key/value heads read from transformers' per_layer_config; with attention_k_eq_v they
    store no value projection, and ours has none."""
    path, hf = hf_dir("gemma4_text-k_eq_v")
    cfg = model_config_from_hf(hf.config.to_dict())
    assert (cfg.head_dim, cfg.full_head_dim, cfg.num_kv_heads, cfg.full_kv_heads) == (16, 32, 2, 1)
    stored = load_file(path / "model.safetensors")
    assert "model.layers.1.self_attn.v_proj.weight" not in stored and "model.layers.0.self_attn.v_proj.weight" in stored
    model = megatron_llm.load_model(path)
    assert model.layers["1"].attention.wv is None and model.layers["1"].attention.wk.weight.shape == (32, 64)


# menu field -> the value that leaves Gemma 4's piece out; proportional RoPE is left out as the ordinary partial
# rotary of a quarter of the head (its first 8 dims, at their own frequencies)
LEFT_OUT = {"v_norm": dict(v_norm=False), "layer_scalar": dict(layer_scalar=False),
            "proportional": dict(rope_scaling=None, rope_fraction=0.25), "softcap": dict(logit_softcap=None)}


@pytest.mark.parametrize("piece", LEFT_OUT)
def test_each_piece_bites(hf_dir, piece):
    """Ours without the piece (the rest of the weights as read) is off transformers' logits by more than 1e-3,
    where with it test_logits_and_loss_match_transformers holds them within 1e-5."""
    path, hf = hf_dir("gemma4_text")
    model = megatron_llm.load_model(path)
    without = build_model(dataclasses.replace(model.cfg, **LEFT_OUT[piece]), "cpu", init=False)
    without.load_state_dict({k: v for k, v in model.state_dict().items() if k in without.state_dict()})
    with torch.no_grad():
        moved = (without(tokens()) - hf(tokens()).logits).abs().max().item()
    assert moved > 1e-3, f"{piece} left out moves the logits by only {moved}"


@pytest.mark.parametrize("key, value", [("hidden_size_per_layer_input", None), ("num_kv_shared_layers", 1),
                                        ("enable_moe_block", True), ("use_bidirectional_attention", "all")])
def test_what_the_menu_has_not_is_refused_by_its_key(key, value):
    """One line naming the key, from config.json alone (no tensor is read); the per-layer inputs are refused where
    config.json leaves the key to Gemma4TextConfig's default (256)."""
    config = {"model_type": "gemma4_text", **SMALL, **GEMMA4, key: value}
    if value is None:
        del config[key]
    with pytest.raises(UsageError, match=f"^config.json {key} .*which the model menu has not[^\n]*$"):
        model_config_from_hf(config)


@pytest.mark.parametrize("model_type", ["gemma3n_text", "gemma3n"])
def test_gemma3n_is_refused_by_name(model_type):
    with pytest.raises(UsageError, match=f"'{model_type}' is not supported: Gemma 3n.*AltUp"):
        family(model_type)


def test_published_layout_reads_as_transformers_builds_it():
    """The published config.json's global_head_dim, num_global_key_value_heads and attention_k_eq_v (transformers 5
    saves per_layer_config instead) give the config transformers builds from them, and the class's fills too: no
    rope_parameters (proportional RoPE over a quarter of the full layers' frequencies) and no layer_types (every
    sixth layer full, the last always)."""
    published = {"model_type": "gemma4_text", **SMALL, "num_hidden_layers": 8, "head_dim": 16, "global_head_dim": 32,
                 "num_global_key_value_heads": 1, "attention_k_eq_v": True, "hidden_size_per_layer_input": 0}
    built = transformers.AutoConfig.for_model(**published).to_dict()
    assert "per_layer_config" in built and "global_head_dim" not in built
    cfg = model_config_from_hf(published)
    assert cfg == model_config_from_hf(built)
    assert (cfg.full_head_dim, cfg.full_kv_heads, cfg.full_values_from_keys) == (32, 1, True)
    assert cfg.layer_types == ["sliding"] * 5 + ["full", "sliding", "full"] and cfg.sliding_window == 512
    assert cfg.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25}
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 10_000.0)


def test_flops_count_each_layer_at_its_width(hf_dir):
    """The scores and values of the full layers count at their 32-wide heads, the sliding layer's at 16."""
    cfg = model_config_from_hf(hf_dir("gemma4_text")[1].config.to_dict())
    assert flops_per_token(cfg, 24) - flops_per_token(cfg, 0) == 12.0 * cfg.num_heads * (16 + 32) * 24


def test_decoding_with_a_cache_gives_the_whole_forward(hf_dir):
    """Through a KV cache (a prompt of 12, one token, the rest) the logits are the whole sequence's: each layer's
    cache holds its own width and key/value heads, and the full layers' values (their keys' projection, normed)."""
    model = megatron_llm.load_model(hf_dir("gemma4_text-k_eq_v")[0])
    x = tokens()
    with torch.no_grad():
        cache = KVCache(x.shape[1])
        steps = [model(x[:, :12], cache=cache), model(x[:, 12:13], cache=cache), model(x[:, 13:], cache=cache)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(x), atol=1e-5, rtol=1e-5)
