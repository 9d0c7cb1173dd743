"""The hybrid families (Gated DeltaNet linear-attention layers between full-attention ones: families/hybrid.py) against
transformers' own models, tiny and random (fp32, CPU): logits and loss, the routers' choices, one training step's loss
(the load-balancing loss included) and the linear layers' gradients, the Hugging Face round trip through native (bit
exact), greedy generation token for token, and Megatron-LM refused by name. The multimodal qwen3_5 / qwen3_5_moe:
tests/test_families_multimodal.py."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families import hybrid
from megatron_llm.errors import UsageError
from tests.test_families import assert_greedy_generation_matches, assert_logits_and_loss_match
from tests.test_families_moe import assert_routes_match, random_hf_model, saved, sgd_step_beside_transformers

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch")]
VOCAB, SEQ = 128, 20  # SEQ: past one 16-token chunk of the linear layers
# Three linear layers and a full one (the published 3 to 1), 2 query/key heads serving 2 value heads each, widths that
# differ; the routers drawn away from their zero init
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, router_aux_loss_coef=0.02)
MOE = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts_per_tok=2)
CASES = {
    # a dense layer among the MoE ones, top-k not renormalised
    "qwen3_next": dict(**MOE, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_5_text": dict(tie_word_embeddings=True, attention_bias=True),  # q_proj's bias split into wq's and wg's
    "qwen3_5_moe_text": MOE,
    # linear, sliding (RoPE, window 8 < SEQ), linear, full (no positions); an ungated shared expert
    "lara_mini": dict(MOE, sliding_window=8),
}
FAMILIES_TESTED = set(CASES)  # tests/test_family_coverage.py gathers these


def tokens(rows: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(1))


def hf_model(case: str) -> torch.nn.Module:
    config = {**SMALL, **CASES[case]}
    if "num_experts" not in config:
        del config["router_aux_loss_coef"]  # a dense config class refuses the key
    return random_hf_model(case, config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return functools.cache(lambda case: saved(hf_model(case), tmp_path_factory.mktemp(case)))


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_routes_match_transformers(hf_dir, case):
    path, hf = hf_dir(case)
    model = megatron_llm.load_model(path)
    assert [model.cfg.layer(i).linear for i in range(4)] == [t == "linear_attention" for t in hf.config.layer_types]
    assert sum(t == "linear_attention" for t in hf.config.layer_types) >= 2
    assert_logits_and_loss_match(path, hf, tokens())
    if model.cfg.moe_experts:
        assert_routes_match(model, hf, tokens())


def test_training_step_loss_and_linear_gradients(hf_dir):
    """One SGD step (lr 1: the update is minus the gradient) of Qwen3-Next against transformers' backward: the loss
    with the load-balancing term, and the gradient of every linear-layer tensor (autograd through the chunked form)."""
    path, hf = hf_dir("qwen3_next")
    x = tokens()
    cfg, result, grad, expected = sgd_step_beside_transformers(path, hf, x, output_router_logits=True)
    assert result.loss + hf.config.router_aux_loss_coef * result.moe["moe_aux_loss"] == pytest.approx(
        expected.loss.item(), rel=1e-5)
    mixer = hf.model.layers[0].linear_attn
    ours = {name: grad[f"layers.0.attention.{name}.weight"] for name in ("a_log", "dt_bias", "norm", "out_proj")}
    theirs = {"a_log": mixer.A_log.grad, "dt_bias": mixer.dt_bias.grad, "norm": mixer.norm.weight.grad,
              "out_proj": mixer.out_proj.weight.grad}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4)
    conv = torch.cat([grad[f"layers.0.attention.conv_{p}.weight"] for p in "qkv"])
    torch.testing.assert_close(conv, mixer.conv1d.weight.grad.squeeze(1), atol=1e-6, rtol=1e-4)
    qkvz = hybrid.QWEN3_NEXT.tensors["model.layers.{i}.linear_attn.in_proj_qkvz.weight"]
    parts = [grad[f"layers.0.attention.{p}_proj.weight"] for p in "qkvz"]
    torch.testing.assert_close(qkvz.to_hf(parts, cfg), mixer.in_proj_qkvz.weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    path, hf = hf_dir(case)
    hf_native_hf(path, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.model_type == case and back.config.layer_types == hf.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_5_text", "lara_mini"])
def test_greedy_generation_equals_transformers(hf_dir, case):
    """Prompts of 20 tokens, 10 new ones: the linear layers' recurrent state and convolution history cached beside
    the attention layers' keys and values, decoded one token per step (Lara-Mini: past its 8-token window)."""
    assert_greedy_generation_matches(*hf_dir(case), tokens())


def test_megatron_refuses_linear_layers_by_name(hf_dir, tmp_path):
    """megatron-core 0.16.1's GPTModel layer specs have no Gated DeltaNet: refused on export, nothing written."""
    path, _ = hf_dir("qwen3_5_text")
    with pytest.raises(UsageError, match=r"linear"):
        convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2))
    assert not (tmp_path / "mg").exists()


def test_olmo_hybrid_is_refused_by_name():
    """OLMo-Hybrid's Gated DeltaNet differs in beta's range, the gated norm's epsilon and its blocks' norm placement:
    refused on read, naming them (families.NOT_READ)."""
    config = transformers.AutoConfig.for_model("olmo_hybrid", **{k: v for k, v in SMALL.items()
                                                                 if k != "router_aux_loss_coef"}).to_dict()
    with pytest.raises(UsageError, match=r"^model_type 'olmo_hybrid' is not supported: .*linear_allow_neg_eigval"):
        megatron_llm.checkpoint.hf.model_config_from_hf(config)
