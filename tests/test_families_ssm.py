"""The state-space hybrid families (Mamba-2 or short-convolution mixers between attention layers: families/ssm.py)
against transformers' own models, tiny and random (fp32, CPU; norms incl. the gated one, biases, A_log, D and dt_bias
drawn away from their inits): logits and loss, the routers' choices, one training step's Mamba-2 gradients, the
Hugging Face round trip through native (bit exact), greedy generation token for token, and Megatron-LM refused by
name."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families import ssm
from megatron_llm.errors import UsageError
from tests.test_families import assert_greedy_generation_matches, assert_logits_and_loss_match
from tests.test_families_moe import assert_routes_match, random_hf_model, saved, sgd_step_beside_transformers

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch")]
VOCAB, SEQ = 128, 20  # SEQ: two and a half 8-token chunks of the Mamba-2 scan
# Mamba-2 with 8 heads of 16 channels in 2 groups (B, C and the gated norm per group), a state of 16, chunks of 8
MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
             mamba_proj_bias=True)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, **MAMBA)
GRANITE = dict(layer_types=["mamba", "attention", "mamba"], embedding_multiplier=2.0, residual_multiplier=0.5,
               attention_multiplier=0.2, logits_scaling=1.5, intermediate_size=32, shared_intermediate_size=48)
CASES = {
    "bamba": dict(attn_layer_indices=[1], attention_bias=True),
    # Granite 4.0: NoPE attention, routed experts beside the shared MLP; -h-micro's shape (no experts) and RoPE
    "granitemoehybrid": dict(**GRANITE, num_local_experts=4, num_experts_per_tok=2),
    "granitemoehybrid:dense-rope": dict(**GRANITE, num_local_experts=0, position_embedding_type="rope"),
    "lfm2": dict(full_attn_idxs=[1], conv_bias=True, conv_L_cache=3),  # gated short convolutions, not Mamba-2
    # a dense first layer, then a sigmoid router with the expert bias, top-2 of 4, routed scale
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, routed_scaling_factor=1.5),
}
# Blocks of one sublayer (model.single_sublayer), their configs whole: Nemotron-H's Mamba-2, MLP (relu2, biases),
# NoPE attention and MLP blocks; Mamba2ForCausalLM's mixer-only blocks
ONE_SUBLAYER = {
    "nemotron_h": dict(vocab_size=VOCAB, hidden_size=64, layers_block_type=["linear_attention", "mlp", "full_attention",
                                                                           "mlp"], num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=64,
                       mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=8, use_bias=True,
                       mlp_bias=True, time_step_min=0.02),
    # Nemotron 3 Nano's experts: relu2 without a gate, sigmoid router with the expert bias in 2 groups (1 chosen),
    # top-2 of 4 renormalised and scaled, a shared MLP (biases); the "-" layer dense
    "nemotron_h:moe": dict(vocab_size=VOCAB, hidden_size=64, layers_block_type=["linear_attention", "moe",
                                                                                "full_attention", "mlp"],
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                           max_position_embeddings=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                           ssm_state_size=16, chunk_size=8, mlp_bias=True, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1,
                           routed_scaling_factor=1.5),
    "mamba2": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=2,
                   state_size=16, chunk_size=8, use_bias=True),
}
CASES.update({case: {} for case in ONE_SUBLAYER})
LAYOUTS = {"nemotron_h": ["mamba", "mlp", "attention", "mlp"], "nemotron_h:moe": ["mamba", "mlp", "attention", "mlp"],
           "mamba2": ["mamba", "mamba"]}
SUBLAYERS = {"nemotron_h": ["mixer", "ffn", "mixer", "ffn"], "nemotron_h:moe": ["mixer", "ffn", "mixer", "ffn"],
             "mamba2": ["mixer", "mixer"]}  # both elsewhere
MIXERS = {"lfm2": "short_conv", "lfm2_moe": "short_conv"}  # the recurrent layers' kind where not mamba
FAMILIES_TESTED = {case.split(":")[0] for case in CASES}  # tests/test_family_coverage.py gathers these
MIXER_PARAMS = ("A_log", ".D", "dt_bias", "conv1d.bias")  # their constant inits would hide a mix-up


def tokens(rows: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(1))


def hf_model(case: str) -> torch.nn.Module:
    small = SMALL if case not in MIXERS else {k: v for k, v in SMALL.items() if not k.startswith("mamba_")}
    small = ONE_SUBLAYER.get(case, small)
    model = random_hf_model(case.split(":")[0], {**small, **CASES[case]}, routers=("router.weight", "mixer.gate.weight"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(MIXER_PARAMS):
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("feed_forward.expert_bias"):  # LFM2-MoE's: it changes the choice
                b.add_(torch.randn_like(b) * 0.01)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return functools.cache(lambda case: saved(hf_model(case), tmp_path_factory.mktemp(case)))


def mixers(model) -> list[str]:
    return [model.cfg.layer(i).mixer for i in range(model.cfg.num_layers)]


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_routes_match_transformers(hf_dir, case):
    path, hf = hf_dir(case)
    model = megatron_llm.load_model(path)
    kind, specs = MIXERS.get(case, "mamba"), [model.cfg.layer(i) for i in range(model.cfg.num_layers)]
    assert [s.mixer if s.sublayers != "ffn" else "mlp" for s in specs] == LAYOUTS.get(case, [kind, "attention", kind])
    assert [s.sublayers for s in specs] == SUBLAYERS.get(case, ["both"] * 3)
    assert_logits_and_loss_match(path, hf, tokens())
    if model.cfg.moe_experts:
        assert_routes_match(model, hf, tokens())


def test_training_step_mamba_gradients(hf_dir):
    """One SGD step (lr 1: the update is minus the gradient) of Bamba against transformers' backward (through its
    chunked torch_forward): the loss and the gradient of every Mamba-2 tensor, the fused ones through the table."""
    path, hf = hf_dir("bamba")
    x = tokens()
    cfg, result, grad, expected = sgd_step_beside_transformers(path, hf, x)
    assert result.loss == pytest.approx(expected.loss.item(), rel=1e-5)
    family, prefix = ssm.BAMBA, "model.layers.{i}.mamba"
    mixer = hf.model.layers[0].mamba
    for name, theirs in mixer.named_parameters():
        entry = family.tensors[f"{prefix}.{name}"]
        parts = entry.parts if hasattr(entry, "parts") else (entry,)
        ours = [grad[p.format(i=0)] for p in parts]
        ours = entry.to_hf(ours) if hasattr(entry, "to_hf") else ours[0]
        torch.testing.assert_close(ours, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    path, hf = hf_dir(case)
    hf_native_hf(path, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.model_type == case.split(":")[0] and back.config.layer_types == hf.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["bamba", "lfm2", "nemotron_h", "mamba2"])
def test_greedy_generation_equals_transformers(hf_dir, case):
    """Prompts of 20 tokens, 10 new ones: the Mamba-2 layers' fp32 state and convolution history (LFM2's short
    convolutions' history) cached beside the attention layer's keys and values, decoded one token per step."""
    assert_greedy_generation_matches(*hf_dir(case), tokens())


@pytest.mark.parametrize("case, words", [("bamba", "MambaModel"), ("lfm2", "no short-convolution layer")])
def test_megatron_refuses_mamba_and_short_conv_layers_by_name(hf_dir, tmp_path, case, words):
    """megatron-core 0.16.1 builds Mamba-2 layers in MambaModel, a model class of its own (not GPTModel, whose
    layer specs we write), and has no short convolution: refused on export, nothing written."""
    path, _ = hf_dir(case)
    with pytest.raises(UsageError, match=words):
        convert(str(path), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2))
    assert not (tmp_path / "mg").exists()


@pytest.mark.parametrize("model_type, config", [
    ("falcon_h1", dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128)),
])
def test_hybrids_the_menu_cannot_express_are_refused_by_name(model_type, config):
    """transformers' own config of each, refused in one line naming what the menu lacks."""
    hf = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, **config)
    with pytest.raises(UsageError, match=rf"^model_type '{model_type}' is not supported: [^\n]+ the model menu"):
        megatron_llm.checkpoint.hf.model_config_from_hf(hf.to_dict())


@pytest.mark.parametrize("change, words", [
    (dict(moe_latent_size=16), "moe_latent_size 16 is not supported: the experts work at hidden_size"),
    (dict(mamba_hidden_act="gelu"), "mamba_hidden_act 'gelu' is not supported: the Mamba-2 mixer's activation is silu"),
])
def test_nemotron_h_settings_the_menu_lacks_are_refused_by_name(change, words):
    hf = transformers.AutoConfig.for_model("nemotron_h", **{**ONE_SUBLAYER["nemotron_h:moe"], **change}).to_dict()
    with pytest.raises(UsageError, match=words):
        megatron_llm.checkpoint.hf.model_config_from_hf(hf)
