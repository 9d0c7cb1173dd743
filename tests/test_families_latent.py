"""The dense latent-attention families (families/latent.py) against transformers' own models, tiny and random (fp32,
CPU; norms, the latent norms included, and biases drawn away from their inits): logits and loss of
`megatron_llm.load_model(hf_dir)`, the Hugging Face round trip through native (bit exact, config kept, transformers
loads it with the same logits), and the Megatron round trip at tp 2 x pp 2 or its refusal by name, through
tests/test_families.py's checks. Also the config classes' fills, and the published spellings and layouts of Sarvam-MLA
and A.X-K1 (whose models tests/test_families_moe.py runs), and LongCat-Flash's refusal.
"""

from __future__ import annotations

import functools
import math
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import megatron_llm
from megatron_llm.checkpoint.convert import convert
from megatron_llm.checkpoint.hf import hf_config_from_model_config, model_config_from_hf
from megatron_llm.checkpoint.megatron_io import safe_load
from megatron_llm.errors import UsageError
from tests.test_families import (SMALL, assert_hf_native_hf_round_trip, assert_logits_and_loss_match,
                                  assert_megatron_round_trip_or_refusal, tokens)
from tests.test_families_moe import CASES as MOE_CASES
from tests.test_families_moe import EXPERTS, random_hf_model, saved

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# latent attention's shape (every head its own key and value: as many kv heads as heads), token ids in the vocabulary
LATENT = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4,
              bos_token_id=0, eos_token_id=1)
# model_type -> (config keys over SMALL and LATENT, the Megatron refusal's words or None where it round-trips)
CASES = {
    # Youtu-LLM: one query projection (q_lora_rank null, where its class fills 1536), RoPE dims interleaved, tied head
    "youtu": (dict(q_lora_rank=None), None),
    # MiniCPM3: compressed queries, RoPE dims by halves with its published LongRoPE (SEQ past the original length:
    # the long factors), biases on the attention and MLP, muP's embedding, residual and logit scales
    "minicpm3": (dict(q_lora_rank=24, attention_bias=True, mlp_bias=True, scale_emb=3.0, scale_depth=1.4,
                      dim_model_base=16, original_max_position_embeddings=16,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "long_factor": [1.0, 2.5, 4.0, 7.0], "short_factor": [1.0, 1.2, 1.5, 2.0]}),
                 r"model\.rope_interleaved=False with latent attention"),  # megatron-core's MLA rotates pairs
}
FAMILIES_TESTED = set(CASES)  # tests/test_family_coverage.py gathers these


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """model_type -> (its saved directory, the transformers model), built once per module."""
    return functools.cache(lambda case: saved(random_hf_model(case, {**SMALL, **LATENT, **CASES[case][0]}),
                                              tmp_path_factory.mktemp(case)))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_transformers(hf_dir, case):
    assert_logits_and_loss_match(*hf_dir(case))


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    assert_hf_native_hf_round_trip(*hf_dir(case), tmp_path, case)


@pytest.mark.parametrize("case", CASES)
def test_megatron_round_trip_or_refusal(hf_dir, tmp_path, case):
    assert_megatron_round_trip_or_refusal(hf_dir(case)[0], tmp_path, CASES[case][1])


def test_megatron_core_computes_youtu_from_its_megatron_checkpoint(mcore, hf_dir, tmp_path):
    """Dense latent attention through Megatron-LM's args: megatron-core's GPTModel with the MLA spec, built from the
    converted checkpoint's args and strict-loading its weights, gives transformers' logits."""
    path, hf = hf_dir("youtu")
    convert(str(path), "hf", str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = mcore.gpt_model(shard["args"], 0, 0).eval()
    model.load_state_dict(shard["model"], strict=True)
    with torch.no_grad():
        expected = hf(tokens()).logits
    torch.testing.assert_close(mcore.logits(model, tokens())[..., :SMALL["vocab_size"]], expected, atol=1e-5, rtol=1e-5)


def test_config_class_fills_are_read():
    """Keys a config.json leaves out read as the config classes fill them: Youtu's compressed queries (1536; a
    null is one projection), MiniCPM3's scales (12, 1.4 / sqrt(layers), 256 / hidden; nulls: no scaling) and value
    width (hidden / heads)."""
    youtu = transformers.AutoConfig.for_model("youtu", **{**SMALL, **LATENT}, q_lora_rank=None).to_dict()
    assert model_config_from_hf(youtu).mla_q_lora_rank is None
    assert model_config_from_hf({k: v for k, v in youtu.items() if k != "q_lora_rank"}).mla_q_lora_rank == 1536
    minicpm3 = transformers.AutoConfig.for_model("minicpm3", **{**SMALL, **LATENT}).to_dict()
    absent = {k: v for k, v in minicpm3.items() if k not in ("scale_emb", "scale_depth", "dim_model_base", "v_head_dim")}
    cfg = model_config_from_hf(absent)
    layers, hidden = SMALL["num_hidden_layers"], SMALL["hidden_size"]
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logit_multiplier, cfg.mla_v_head_dim) == (
        12.0, 1.4 / math.sqrt(layers), 256 / hidden, hidden // SMALL["num_attention_heads"])
    nulls = model_config_from_hf({**minicpm3, "scale_depth": None, "dim_model_base": None})
    assert (nulls.residual_multiplier, nulls.logit_multiplier) == (1.0, 1.0)
    # 6 layers: 1.4 / sqrt(6) * sqrt(6) is 1.4000000000000001, which reads back the same; written as published
    six = model_config_from_hf({**minicpm3, "num_hidden_layers": 6})
    assert hf_config_from_model_config(six, "minicpm3")["scale_depth"] == 1.4


def test_sarvam_mla_reads_its_published_spellings():
    """sarvamai/sarvam-105b's config.json as its remote code wrote it (num_experts, num_shared_experts, YaRN named
    deepseek_yarn under rope_scaling, head_dim for vLLM) reads as transformers' conversion of it does."""
    yarn = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    converted = transformers.AutoConfig.for_model(
        "sarvam_mla", **{**SMALL, **LATENT}, n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=32,
        num_experts_per_tok=2, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn}).to_dict()
    published = {k: v for k, v in converted.items() if k not in ("n_routed_experts", "n_shared_experts", "rope_parameters")}
    published.update(num_experts=8, num_shared_experts=2, head_dim=16 + 8, rope_theta=10000.0,
                     rope_scaling={"type": "deepseek_yarn", **yarn})
    cfg = model_config_from_hf(published)
    assert cfg == model_config_from_hf(converted)
    assert (cfg.moe_experts, cfg.moe_shared_ffn_hidden_size, cfg.rope_scaling["rope_type"]) == (8, 64, "yarn")


def test_axk1_reads_its_released_layout(tmp_path):
    """A.X-K1's released files hold post_mlp_layernorm on the dense layers too (unused) and no router expert bias:
    read as transformers loads them (the bias its zero fill), with its logits; written back as transformers saves,
    the unused norm dropped and every other tensor bit for bit."""
    path, _ = saved(random_hf_model("axk1", {**SMALL, **EXPERTS, **MOE_CASES["axk1"]}), tmp_path / "saved")
    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if "e_score_correction_bias" not in k}
    unused = "model.layers.0.post_mlp_layernorm.weight"  # layer 0 is dense
    released = tmp_path / "released"
    released.mkdir()
    save_file({**tensors, unused: torch.randn(SMALL["hidden_size"])}, released / "model.safetensors")
    shutil.copy(path / "config.json", released)
    hf = transformers.AutoModelForCausalLM.from_pretrained(released, attn_implementation="eager").eval()
    model = megatron_llm.load_model(released)
    assert not model.cfg.moe_expert_bias
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), hf(tokens()).logits, atol=1e-5, rtol=1e-5)
    convert(str(released), "hf", str(tmp_path / "native"), "native")
    convert(str(tmp_path / "native"), "native", str(tmp_path / "out"), "hf")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(written) == sorted(tensors) and all(torch.equal(written[k], tensors[k]) for k in tensors)


def test_axk1_reads_the_legacy_dense_layers():
    """Without mlp_layer_types, A.X-K1's config class makes layer i sparse where i >= first_k_dense_replace and
    i % moe_layer_freq == 0: the same layers read sparse here."""
    legacy = dict(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    converted = transformers.AutoConfig.for_model("axk1", **{**SMALL, **EXPERTS, **MOE_CASES["axk1"], **legacy,
                                                             "mlp_layer_types": None}).to_dict()
    published = {**{k: v for k, v in converted.items() if k != "mlp_layer_types"}, **legacy}
    cfg = model_config_from_hf(published)
    assert [cfg.layer(i).moe for i in range(5)] == [kind == "sparse" for kind in converted["mlp_layer_types"]]
    assert converted["mlp_layer_types"] == ["dense", "dense", "sparse", "dense", "sparse"]


def test_longcat_flash_is_refused_by_name():
    """LongCat-Flash is not read: its config.json is refused with the reason, before any tensor."""
    config = transformers.AutoConfig.for_model("longcat_flash", num_layers=2, hidden_size=64).to_dict()
    with pytest.raises(UsageError, match=r"^model_type 'longcat_flash' is not supported: LongCat-Flash's block holds two "
                                         r"attention and two MLP sublayers .*zero-computation"):
        model_config_from_hf(config)
