"""gpt-oss against transformers' own model, tiny and random (fp32, CPU), with its sinks, biases, norms and router
bias drawn away from their inits so a mapping mistake shows: logits and the router's choices, the Hugging Face
round trip through native (bit exact), one training step's loss (with the load-balancing loss) and gradients; and
Megatron-LM: the round trip through tp2 x pp2 x ep2 (bit exact), megatron-core's GPTModel strict-loading every file
and, at tp=pp=ep=1, giving transformers' logits, and what it cannot hold refused by name."""

from __future__ import annotations

import argparse

import pytest
import torch
import transformers

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families.gpt_oss import interleave_gate_up, transposed_experts
from megatron_llm.checkpoint.megatron_io import safe_load
from megatron_llm.errors import UsageError
from tests.test_families import SMALL, VOCAB, WINDOW, tokens
from tests.test_families_moe import _kept, our_routes, our_sgd_step, random_hf_model, saved

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# Sliding then full layers, YaRN (its x4 over 16 positions stretches the 24 of the test), 4 experts, top-2; the
# SwiGLU's limit lowered from 7 to 0.2, so its clamps bite at this scale (on ~13% of the gate and up values).
CONFIG = dict(SMALL, head_dim=16, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
              sliding_window=WINDOW, swiglu_limit=0.2, swiglu_alpha=1.5,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})
FAMILIES_TESTED = {"gpt_oss"}  # tests/test_family_coverage.py gathers these


# megatron-core's quick_gelu fixes the clamped SwiGLU's alpha at gpt-oss's 1.702; YaRN over 64 original positions,
# where truncate False moves the ramp's top end (2.0 -> 3 rounded) and so the logits
MEGATRON_CONFIG = {**CONFIG, "swiglu_alpha": 1.702,
                   "rope_parameters": {**CONFIG["rope_parameters"], "original_max_position_embeddings": 64}}


def hf_model(config: dict = CONFIG) -> torch.nn.Module:
    # seed 1: a draw whose routers use every expert in both layers (seed 0's second uses two)
    return random_hf_model("gpt_oss", config, seed=1, routers=("router.weight",))


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


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory):
    """(hf directory, the transformers model, the same written as Megatron-LM at tp2 x pp2 x ep2)."""
    path, hf = saved(hf_model(MEGATRON_CONFIG), tmp_path_factory.mktemp("gpt_oss_megatron") / "hf")
    convert(str(path), "hf", str(path.parent / "mg"), "megatron", Options(tp=2, pp=2, ep=2))
    return path, hf, path.parent / "mg"


def test_megatron_round_trip_at_tp2_pp2_ep2_is_bit_exact(megatron_dir, tmp_path):
    """Sinks, every bias (router and experts' included), the clamped SwiGLU, alternating windows and YaRN written as
    the args Megatron-LM reads; biased experts are whole on each rank (megatron-core: expert tensor parallelism 1), so
    tp2 x ep2 is parallel folding: 2 files per stage."""
    from safetensors.torch import load_file

    path, hf, mg = megatron_dir
    files = sorted(p.parent.name for p in (mg / "release").glob("*/model_optim_rng.pt"))
    assert files == ["mp_rank_00_000_000", "mp_rank_00_001_000", "mp_rank_01_000_001", "mp_rank_01_001_001"]
    args = vars(safe_load(mg / "release" / files[0] / "model_optim_rng.pt")["args"])
    assert {k: args[k] for k in ("add_bias_linear", "softmax_type", "swiglu", "quick_geglu", "glu_linear_offset",
                                 "activation_func_clamp_value", "window_size", "window_attn_skip_freq",
                                 "position_embedding_type", "yarn_rotary_scaling_factor", "yarn_correction_range_round_to_int",
                                 "expert_tensor_parallel_size")} == dict(
        add_bias_linear=True, softmax_type="learnable", swiglu=False, quick_geglu=True, glu_linear_offset=1.0,
        activation_func_clamp_value=0.2, window_size=(WINDOW - 1, 0), window_attn_skip_freq=2,
        position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_correction_range_round_to_int=False,
        expert_tensor_parallel_size=1)
    with torch.no_grad():  # read as the model it is: sinks, windows, YaRN, the clamp, every bias
        torch.testing.assert_close(megatron_llm.load_model(mg)(tokens()), hf(tokens()).logits, atol=1e-5, rtol=1e-5)
    convert(str(mg), "megatron", str(tmp_path / "hf"), "hf")
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


# Each piece written off, one at a time: megatron-core's forward must then move away from transformers' logits.
PIECES = {"sinks": dict(softmax_type="vanilla"), "windows": dict(window_size=None),
          # megatron-core's window (left, 0) sees left + 1 keys: (WINDOW, 0), as Megatron-LM's gpt-oss example writes
          # 128 for gpt-oss's 128, is one key too wide
          "window one key wider": dict(window_size=(WINDOW, 0)),
          "clamp": dict(activation_func_clamp_value=None), "YaRN truncate": dict(yarn_correction_range_round_to_int=True),
          "YaRN": dict(position_embedding_type="rope")}


def test_megatron_core_loads_every_file_and_its_forward_equals_transformers(mcore, megatron_dir, tmp_path):
    """Every file strict-loads into the GPTModel megatron-core builds for its (tp, pp, ep) rank, each rank's sinks
    being its heads' (softmax_offset); at tp=pp=ep=1 megatron-core's forward (learnable softmax offset, quick_gelu
    with glu_linear_offset 1 and the clamp, window_attn_skip_freq 2, YarnRotaryEmbedding, biased router and experts)
    gives transformers' logits (fp32, 1e-5) with the same experts chosen, and loses them with any piece written off."""
    from tests.test_convert_moe import routing_of_megatron_core

    path, hf, mg = megatron_dir
    sinks = megatron_llm.load_model(path).state_dict()["layers.1.attention.sinks.weight"]
    for file in sorted((mg / "release").glob("*/model_optim_rng.pt")):
        t, p, e = map(int, file.parent.name.split("_")[2:])
        shard = safe_load(file)
        mcore.gpt_model(shard["args"], t, p, e).load_state_dict(shard["model"], strict=True)
        if p == 1:
            assert torch.equal(shard["model"]["decoder.layers.0.self_attention.core_attention.softmax_offset"],
                               sinks.chunk(2)[t])
    convert(str(path), "hf", str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = mcore.gpt_model(shard["args"], 0, 0).eval()
    model.load_state_dict(shard["model"], strict=True)
    theirs = routing_of_megatron_core(model)
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
    torch.testing.assert_close(mcore.logits(model, x)[..., :VOCAB], expected, atol=1e-5, rtol=1e-5)
    ours = our_routes(megatron_llm.load_model(path), x)
    assert len(theirs) == len(ours) == 2  # [tokens, E] maps against [tokens, k] sorted indices
    assert all(torch.equal(m.nonzero()[:, 1].view(-1, 2), r) for m, r in zip(theirs, ours))
    for piece, values in PIECES.items():
        args = argparse.Namespace(**{**vars(shard["args"]), **values})
        off = mcore.gpt_model(args, 0, 0).eval()
        off.load_state_dict(shard["model"], strict=False)
        assert (mcore.logits(off, x)[..., :VOCAB] - expected).abs().max() > 1e-3, piece


def test_megatron_refuses_what_megatron_core_cannot_hold_by_name(hf_dir, megatron_dir, tmp_path):
    """Another alpha than quick_gelu's 1.702, and biased experts split by tensor parallelism: one line each, nothing
    written."""
    with pytest.raises(UsageError, match=r"^Megatron-LM cannot express model\.swiglu_alpha=1\.5: its clamped SwiGLU is "
                                         r"quick_gelu"):
        convert(str(hf_dir[0]), "hf", str(tmp_path / "mg"), "megatron", Options(tp=1, pp=1, ep=1))
    with pytest.raises(UsageError, match=r"^--etp 2: megatron-core gives experts biases only at expert tensor "
                                         r"parallelism 1"):
        convert(str(megatron_dir[0]), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, etp=2))
    assert not (tmp_path / "mg").exists()


def test_megatron_lm_enable_gpt_oss_reads_as_the_yarn_its_model_builder_sets(megatron_dir):
    """Megatron-LM's post-training --enable-gpt-oss sets YaRN on the config whatever position_embedding_type says (its
    default learned_absolute included): read as that model, original 131072 positions and truncate False."""
    from megatron_llm.checkpoint.megatron import model_config_from_args
    from megatron_llm.checkpoint.megatron_attention import YARN_ARGS

    args = vars(safe_load(next((megatron_dir[2] / "release").glob("*/model_optim_rng.pt")))["args"])
    args = argparse.Namespace(**{**{k: v for k, v in args.items() if k not in YARN_ARGS},
                                 "position_embedding_type": "learned_absolute", "enable_gpt_oss": True})
    assert model_config_from_args(args).rope_scaling == {"rope_type": "yarn", "factor": 32.0, "truncate": False,
                                                         "original_max_position_embeddings": 131072}
