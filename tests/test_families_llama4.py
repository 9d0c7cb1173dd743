"""Llama 4's text model (llama4_text) against transformers' own, tiny and random (fp32, CPU), with norms, biases and
routers drawn away from their inits so a mapping mistake shows, chunks of 8 in sequences of 24 and a temperature
floor of 4 (every piece bites): logits and the router's choices, the Hugging Face round trip through native (bit
exact), a training step's loss and gradients, Megatron-LM's refusal by name; and the input-weighted experts
against a per-token loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.megatron import Layout, megatron_args
from megatron_llm.checkpoint.families.llama4 import concat_gate_up
from megatron_llm.checkpoint.families.gpt_oss import transposed_experts
from megatron_llm.config import ParallelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model.moe import MoE
from megatron_llm.model_config import ModelConfig
from tests.test_families import SMALL, WINDOW, tokens
from tests.test_families_moe import our_routes, our_sgd_step, random_hf_model, saved

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# Four layers: chunked RoPE layers 0-2 with the L2 norm, a full NoPE layer 3 with the temperature; layers 1 and 3
# MoE (4 experts, top-2), 0 and 2 dense at a width of their own.
CONFIG = dict(SMALL, num_hidden_layers=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
              num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2, attention_bias=True,
              attention_chunk_size=WINDOW, floor_scale=4, attn_scale=0.5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
FAMILIES_TESTED = {"llama4_text"}  # tests/test_family_coverage.py gathers these


def hf_model() -> torch.nn.Module:
    # seed 2: a draw whose routers use every expert in both MoE layers (seed 0's second uses three)
    return random_hf_model("llama4_text", CONFIG, seed=2, routers=("router.weight",))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return saved(hf_model(), tmp_path_factory.mktemp("llama4"))


def test_logits_and_routes_match_transformers(hf_dir):
    path, hf = hf_dir
    model = megatron_llm.load_model(path)
    cfg = model.cfg
    assert cfg.layer_types == ["chunked"] * 3 + ["full"] and cfg.nope_layers == [3] and cfg.moe_layer_freq == 2
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    theirs = []  # Llama4Router returns (sigmoid scores [T, E], logits [T, E]): its choice is the top-k logits
    hooks = [layer.feed_forward.router.register_forward_hook(
        lambda m, a, out: theirs.append(out[1].topk(2, dim=-1).indices.sort(-1).values))
        for layer in hf.model.layers if layer.is_moe_layer]
    with torch.no_grad():
        hf(x)
    for h in hooks:
        h.remove()
    ours = our_routes(model, x)
    assert len(ours) == len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(len(r.unique()) == 4 for r in ours)  # every expert used: the stacking order tested


def test_each_piece_bites(hf_dir):
    """The logits move when any one Llama 4 piece is switched off: the test above checks each of them."""
    path, _ = hf_dir
    x = tokens()
    off = {"chunks": lambda a, f: setattr(a, "rules", dataclasses.replace(a.rules, chunk=None)),
           "l2 norm": lambda a, f: setattr(a, "l2_eps", None),
           "temperature": lambda a, f: setattr(a, "temperature", None),
           "weighted inputs": lambda a, f: setattr(f, "weight_input", False)}
    model = megatron_llm.load_model(path)
    with torch.no_grad():
        reference = model(x)
        for piece, switch in off.items():
            model = megatron_llm.load_model(path)
            for block in model.layers.values():
                switch(block.attention, block.feed_forward)
            assert (model(x) - reference).abs().max() > 1e-3, piece


def test_kv_cache_decoding_equals_the_whole_forward(hf_dir):
    """Prefill 10 tokens, then decode the other 14 one at a time: chunks by key index and the temperature by the
    cache's positions give the logits of one forward over all 24 (chunks of 8 cut inside both parts)."""
    from megatron_llm.model.kv_cache import KVCache

    model = megatron_llm.load_model(hf_dir[0])
    x = tokens()
    cache = KVCache(x.shape[1])
    with torch.no_grad():
        whole = model(x)
        steps = [model(x[:, :10], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(10, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_hf_native_hf_round_trip(hf_dir, tmp_path):
    path, hf = hf_dir
    back = transformers.AutoModelForCausalLM.from_pretrained(hf_native_hf(path, tmp_path), attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=0, rtol=0)


def test_training_loss_and_gradients(hf_dir):
    """Our training step (SGD, lr 1, no clipping: the update is minus the gradient) against transformers' loss
    (Llama4ForCausalLM adds no router loss) and the gradients of the router, experts and shared expert."""
    path, _ = hf_dir
    hf = hf_model().train()  # its own copy: the module fixture's stays without gradients
    x = tokens()
    _, result, grad = our_sgd_step(path, x)
    expected = hf(x, labels=x)
    expected.loss.backward()
    assert result.loss == pytest.approx(expected.loss.item(), rel=1e-5)
    for i in (1, 3):
        ours, theirs = f"layers.{i}.", hf.model.layers[i]
        ff = theirs.feed_forward
        pairs = [(grad[ours + "feed_forward.router.weight"], ff.router.weight.grad),
                 (concat_gate_up([grad[ours + "feed_forward.experts.w1"], grad[ours + "feed_forward.experts.w3"]]),
                  ff.experts.gate_up_proj.grad),
                 (transposed_experts([grad[ours + "feed_forward.experts.w2"]]), ff.experts.down_proj.grad),
                 (grad[ours + "feed_forward.shared_experts.w1.weight"], ff.shared_expert.gate_proj.weight.grad),
                 (grad[ours + "attention.wq.weight"], theirs.self_attn.q_proj.weight.grad)]
        for a, b in pairs:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_megatron_output_is_refused_by_name(hf_dir, tmp_path):
    """Refused by the first thing Megatron-LM lacks: this model's linear biases on MoE layers, and without them
    a Llama 4 menu piece."""
    path, _ = hf_dir
    with pytest.raises(UsageError, match=r"^Megatron-LM's add_bias_linear also gives every expert biases"):
        convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=1, pp=1, ep=1))
    assert not (tmp_path / "mg").exists()
    cfg = dataclasses.replace(megatron_llm.load_model(path).cfg, qkv_bias=False, out_bias=False, linear_bias=False)
    pieces = "attention_chunk_size|layer_types|qk_l2_norm|attn_temperature_floor|moe_weight_input|moe_renormalize"
    with pytest.raises(UsageError, match=rf"^Megatron-LM cannot express model\.({pieces})="):
        megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")


def test_input_weighted_experts_equal_a_per_token_loop():
    """moe_weight_input: out_t = shared(x_t) + sum over t's chosen experts e of expert_e(w_te * x_t)."""
    cfg = ModelConfig(hidden_size=16, moe_experts=4, moe_top_k=2, moe_ffn_hidden_size=8, moe_score="sigmoid",
                      moe_renormalize=False, moe_weight_input=True, moe_shared_ffn_hidden_size=8)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    indices, weights, *_ = moe.router(x.view(-1, 16))
    e = moe.experts
    expected = []
    for t, row in enumerate(x.view(-1, 16)):
        out = moe.shared_experts(row)
        for j in range(2):
            k, inp = indices[t, j], weights[t, j] * row
            out = out + e.w2[k] @ (F.silu(e.w1[k] @ inp) * (e.w3[k] @ inp))
        expected.append(out)
    torch.testing.assert_close(moe(x), torch.stack(expected).view(2, 5, 16), atol=1e-6, rtol=1e-5)


def test_weight_input_refused_under_tensor_parallelism():
    cfg = ModelConfig(num_heads=4, ffn_hidden_size=64, moe_experts=4, moe_ffn_hidden_size=32, moe_weight_input=True)
    with pytest.raises(UsageError, match=r"^model\.moe_weight_input .* use tp 1$"):
        ParallelConfig(tp=2).validate(cfg, seq_len=16, micro_batches=1, evaluates=False)


@pytest.mark.parametrize("fields,message", [
    (dict(layer_types=["chunked", "full"]), r"^model\.layer_types has chunked layers: set model\.attention_chunk_size$"),
    (dict(attention_chunk_size=0), r"^model\.attention_chunk_size must be positive or null, got 0$"),
    (dict(attn_temperature_floor=-1.0), r"^model\.attn_temperature_floor must be a positive finite number or null"),
    (dict(attention="mla", mla_kv_lora_rank=8, mla_v_head_dim=8, mla_rope_head_dim=8, qk_l2_norm=True),
     r"^model\.attention mla .* \(nor qk_l2_norm, attn_temperature_floor or chunked layers\)$"),
], ids=["chunked-without-size", "chunk-size-0", "floor-negative", "mla"])
def test_bad_llama4_options_are_one_line(fields, message):
    with pytest.raises(UsageError, match=message):
        ModelConfig(num_layers=2, **fields).validate()


def test_fractional_temperature_floor_is_refused_on_export():
    from megatron_llm.checkpoint.families import family

    cfg = family("llama4_text").read_config(transformers.AutoConfig.for_model("llama4_text", **CONFIG).to_dict())
    with pytest.raises(UsageError, match=r"^llama4_text stores floor_scale as an integer"):
        family("llama4_text").write_config(dataclasses.replace(cfg, attn_temperature_floor=4.5))
