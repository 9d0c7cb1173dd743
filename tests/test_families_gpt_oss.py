"""gpt-oss against transformers' own model, tiny and random (fp32, CPU), with its sinks, biases, norms and router
bias drawn away from their inits so a mapping mistake shows: logits and the router's choices, the Hugging Face
round trip through native (bit exact), one training step's loss (with the load-balancing loss) and gradients, and
Megatron-LM's refusal by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families.gpt_oss import interleave_gate_up, transposed_experts
from megatron_llm.errors import UsageError
from tests.test_families import SMALL, WINDOW, tokens
from tests.test_families_moe import _kept, our_routes, our_sgd_step, random_hf_model, saved

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# Sliding then full layers, YaRN (its x4 over 16 positions stretches the 24 of the test), 4 experts, top-2; the
# SwiGLU's limit lowered from 7 to 0.2, so its clamps bite at this scale (on ~13% of the gate and up values).
CONFIG = dict(SMALL, head_dim=16, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
              sliding_window=WINDOW, swiglu_limit=0.2, swiglu_alpha=1.5,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})


def hf_model() -> torch.nn.Module:
    # seed 1: a draw whose routers use every expert in both layers (seed 0's second uses two)
    return random_hf_model("gpt_oss", CONFIG, seed=1, routers=("router.weight",))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return saved(hf_model(), tmp_path_factory.mktemp("gpt_oss"))


def test_logits_and_routes_match_transformers(hf_dir):
    path, hf = hf_dir
    model = megatron_llm.load_model(path)
    assert model.cfg.mlp == "swiglu_clamped" and model.cfg.layer_types == ["sliding", "full"]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    theirs = []  # GptOssTopKRouter returns (logits, weights, indices)
    hooks = [layer.mlp.router.register_forward_hook(lambda m, a, out: _kept(theirs, out, 2)) for layer in hf.model.layers]
    with torch.no_grad():
        hf(x)
    for h in hooks:
        h.remove()
    ours = our_routes(model, x)
    assert len(ours) == len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(len(r.unique()) == 4 for r in ours)  # every expert used: the stacking order tested


def test_hf_native_hf_round_trip(hf_dir, tmp_path):
    path, hf = hf_dir
    back = transformers.AutoModelForCausalLM.from_pretrained(hf_native_hf(path, tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=0, rtol=0)


def test_training_loss_and_gradients_include_the_aux_loss(hf_dir):
    """Our training step (SGD, lr 1, no clipping: the update is minus the gradient) against transformers'
    loss = cross-entropy + router_aux_loss_coef * load-balancing loss, and the gradients of every new parameter."""
    path, _ = hf_dir
    hf = hf_model().train()  # its own copy: the module fixture's stays without gradients
    x = tokens()
    _, result, grad = our_sgd_step(path, x)
    expected = hf(x, labels=x, output_router_logits=True)
    expected.loss.backward()
    assert result.moe["moe_aux_loss"] == pytest.approx(expected.aux_loss.item(), rel=1e-5)
    assert result.loss + 0.02 * result.moe["moe_aux_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    for i, layer in enumerate(hf.model.layers):
        ours = f"layers.{i}.feed_forward."
        experts, router = layer.mlp.experts, layer.mlp.router
        pairs = [(grad[f"layers.{i}.attention.sinks.weight"], layer.self_attn.sinks.grad),
                 (grad[ours + "router.weight"], router.weight.grad), (grad[ours + "router.bias"], router.bias.grad),
                 (interleave_gate_up([grad[ours + "experts.w1"], grad[ours + "experts.w3"]]), experts.gate_up_proj.grad),
                 (interleave_gate_up([grad[ours + "experts.w1_bias"], grad[ours + "experts.w3_bias"]]),
                  experts.gate_up_proj_bias.grad),
                 (transposed_experts([grad[ours + "experts.w2"]]), experts.down_proj.grad),
                 (grad[ours + "experts.w2_bias"], experts.down_proj_bias.grad)]
        for a, b in pairs:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_quantized_checkpoint_is_one_line():
    """OpenAI's published gpt-oss stores its experts in MXFP4 (blocks and scales): refused on read, saying how to
    dequantize (hf.refuse_quantized, as DeepSeek-V3's fp8)."""
    config = transformers.AutoConfig.for_model("gpt_oss", **CONFIG).to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with pytest.raises(UsageError, match=r"^config\.json has quantization_config \(quant_method 'mxfp4'\).*Mxfp4Config"):
        megatron_llm.checkpoint.hf.model_config_from_hf(config)


def test_megatron_output_is_refused_by_name(hf_dir, tmp_path):
    path, _ = hf_dir
    with pytest.raises(UsageError, match=r"^Megatron-LM cannot express model\.attention_sinks"):
        convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=1, pp=1, ep=1))
    assert not (tmp_path / "mg").exists()
