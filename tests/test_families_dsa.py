"""DeepSeek Sparse Attention families (DeepSeek-V3.2, GLM-5; model/sparse_attention.py) against transformers' own
models, tiny and random (fp32, CPU; norms, the indexer's LayerNorm included, biases and routers drawn away from their
inits), with a sequence (24) three times index_topk (8), so the selection bites: logits and expert choices, top-k off
moving them, the Hugging Face round trip, a training step's loss and gradients, greedy generation with the cache, and
the refusals by name (Megatron-LM, GLM-5's shared indexer layers, an untrained indexer in training, its loss
under tp or recomputation), and the indexer loss against megatron-core's.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

import megatron_llm
from conftest import ROOT, tiny_overrides, transformers_first_loss
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.hf import model_config_from_hf
from megatron_llm.checkpoint.native import save_weights
from megatron_llm.config import Config, ParallelConfig, load_config
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model.sparse_attention import Indexer
from megatron_llm.parallel import ParallelDims
from megatron_llm.training.step import train_step
from tests.test_families import SEQ, SMALL, assert_greedy_generation_matches, assert_hf_native_hf_round_trip, tokens
from tests.test_families_moe import (EXPERTS, assert_routes_match, moe_blocks, our_sgd_step, random_hf_model, router_of,
                                     router_weight, saved, sgd_step_beside_transformers)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TOPK = 8  # a third of SEQ: most queries choose among more keys than they keep
# latent attention with compressed queries (the indexer's come from that latent), 8 experts in 2 groups, a dense layer
DSA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
           num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1,
           n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=None, index_topk=TOPK, index_n_heads=8,
           index_head_dim=16, bos_token_id=0, eos_token_id=1)
CASES = {"deepseek_v32": {}, "glm_moe_dsa": {}}  # the indexer's RoPE by halves and in pairs
FAMILIES_TESTED = set(CASES)  # tests/test_family_coverage.py gathers these


def hf_model(case: str) -> torch.nn.Module:
    return random_hf_model(case, {**SMALL, **EXPERTS, **DSA, **CASES[case]}, routers=("gate.weight", "k_norm.weight"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """model_type -> (its saved directory, the transformers model), built once per module."""
    return functools.cache(lambda case: saved(hf_model(case), tmp_path_factory.mktemp(case)))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_routes_match_transformers_and_the_selection_bites(hf_dir, case):
    path, hf = hf_dir(case)
    model = megatron_llm.load_model(path)
    x = tokens()
    assert_routes_match(model, hf_model(case), x)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, hf(x).logits, atol=1e-5, rtol=1e-5)
        for m in model.modules():
            if isinstance(m, Indexer):
                m.topk = SEQ  # every key kept: dense latent attention
        dense = model(x)
    assert (dense - ours).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    assert_hf_native_hf_round_trip(*hf_dir(case), tmp_path, case)


def test_training_step_matches_transformers(hf_dir):
    """SGD lr 1 (the update is minus the gradient): transformers' loss, and the gradients of the attention that the
    selection masks and of the router; the indexer (behind a top-k: no gradient either side) unchanged."""
    path, hf = hf_dir("deepseek_v32")
    x = tokens()
    cfg, result, grad, expected = sgd_step_beside_transformers(path, hf, x)
    assert result.loss == pytest.approx(expected.loss.item(), rel=1e-5)
    layers = hf.model.layers
    for i in range(cfg.num_layers):
        torch.testing.assert_close(grad[f"layers.{i}.attention.wkv_b.weight"], layers[i].self_attn.kv_b_proj.weight.grad,
                                   atol=1e-6, rtol=1e-4)
        assert not grad[f"layers.{i}.attention.indexer.wk.weight"].any()
    for i, block in moe_blocks(hf).items():
        torch.testing.assert_close(grad[f"layers.{i}.feed_forward.router.weight"], router_weight(router_of(block)).grad,
                                   atol=1e-6, rtol=1e-4)
    hf.zero_grad()
    hf.eval()


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_equals_transformers(hf_dir, case):
    """Prompts of 24 tokens, 10 new ones, decoded one token per step: the indexer's keys cached beside the latent
    attention's, each new query choosing its top 8 of up to 34 keys."""
    assert_greedy_generation_matches(*hf_dir(case), tokens())


def test_megatron_refuses_sparse_attention_by_name(hf_dir, tmp_path):
    """megatron-core 0.16.1's DSA is an experimental variant built by a Transformer Engine spec: refused on export."""
    with pytest.raises(UsageError, match=r"model\.dsa_index_topk"):
        convert(str(hf_dir("deepseek_v32")[0]), "hf", str(tmp_path / "mg"), "megatron", Options(tp=1, pp=1))
    assert not (tmp_path / "mg").exists()


def test_glm5_shared_indexer_layers_are_refused_by_name():
    config = hf_model("glm_moe_dsa").config.to_dict()
    for keys in (dict(indexer_types=["full", "shared"]), dict(indexer_types=None, index_topk_freq=2,
                                                             index_skip_topk_offset=0)):
        with pytest.raises(UsageError, match="indexer_types"):
            model_config_from_hf({**config, **keys})


def test_training_refuses_an_untrained_indexer_and_its_loss_under_tp(hf_dir):
    """The indexer learns only from megatron-core's KL loss: training needs its coefficient or the indexer frozen, by
    name (not both); the loss's target sums every head, which tp splits: tp 1 with the loss (a frozen indexer runs
    under tp: test_expert_parallel's chain)."""
    cfg = model_config_from_hf(hf_dir("deepseek_v32")[1].config.to_dict())
    with pytest.raises(UsageError, match=r"model\.dsa_indexer_frozen"):
        ParallelConfig().validate(cfg, SEQ, 1, False)
    ParallelConfig().validate(dataclasses.replace(cfg, dsa_indexer_loss_coeff=0.1), SEQ, 1, False)
    with pytest.raises(UsageError, match=r"model\.dsa_indexer_loss_coeff >= 0, 0 with model\.dsa_indexer_frozen"):
        dataclasses.replace(cfg, dsa_indexer_loss_coeff=0.1, dsa_indexer_frozen=True).validate()
    frozen = dataclasses.replace(cfg, dsa_indexer_frozen=True)
    ParallelConfig().validate(frozen, SEQ, 1, False)
    ParallelConfig(tp=2).validate(frozen, SEQ, 1, False)
    with pytest.raises(UsageError, match=r"model\.dsa_indexer_loss_coeff: .* every head, which parallel\.tp splits"):
        ParallelConfig(tp=2).validate(dataclasses.replace(cfg, dsa_indexer_loss_coeff=0.1), SEQ, 1, False)


@pytest.mark.parametrize("model_type", ["axk2", "dots3_note_text", "hy_v4", "minimax_m3_vl_text", "qwen4_exp_text"])
def test_relatives_beyond_the_menu_are_refused_by_name(model_type):
    """Sparse-attention relatives whose other pieces the menu lacks: refused by model_type, with the missing piece."""
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    with pytest.raises(UsageError, match=f"model_type '{model_type}' is not supported: .*the model menu|ranks keys"):
        model_config_from_hf(config)


def test_fine_tune_from_the_command_line_with_the_indexer_frozen(corpus_dir, tmp_path):
    """--checkpoint.init_from a DeepSeek-V3.2 directory trains with --model.dsa_indexer_frozen true (refused without it
    or the indexer loss, and the loss refused with recomputation): the first step's loss is transformers' on the
    trainer's batch (32 tokens, top 8), a step moves the attention but leaves the indexer as loaded, and the tuned
    model exports to Hugging Face."""
    from megatron_llm.training.trainer import train

    hf = random_hf_model("deepseek_v32", {**SMALL, **EXPERTS, **DSA, "vocab_size": 257, "intermediate_size": 128})
    hf.save_pretrained(tmp_path / "v32")
    init = dict(checkpoint__init_from=str(tmp_path / "v32"), training__steps=1, training__eval_interval=0,
                model__num_kv_heads=4)  # latent attention: a key per head
    with pytest.raises(UsageError, match=r"model\.dsa_indexer_loss_coeff > 0 .* or model\.dsa_indexer_frozen"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(corpus_dir, tmp_path / "refused", **init))
    with pytest.raises(UsageError, match=r"training\.activation_checkpointing none"):  # the loss's graph is kept
        load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(
            corpus_dir, tmp_path / "refused", model__dsa_indexer_loss_coeff=0.1, training__activation_checkpointing="full",
            **init))
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      tiny_overrides(corpus_dir, tmp_path / "run", model__dsa_indexer_frozen=True, **init))
    expected, _ = transformers_first_loss(hf, cfg)
    assert train(cfg).losses[0] == pytest.approx(expected, abs=1e-5)
    tuned = megatron_llm.load_model(cfg.checkpoint.dir).state_dict()
    theirs = hf.state_dict()
    assert torch.equal(tuned["layers.1.attention.indexer.wk.weight"], theirs["model.layers.1.self_attn.indexer.wk.weight"])
    assert not torch.equal(tuned["layers.1.attention.wkv_b.weight"], theirs["model.layers.1.self_attn.kv_b_proj.weight"])
    # and back to Hugging Face (how the indexer trained is no config.json key): transformers gives the tuned logits
    convert(cfg.checkpoint.dir, "native", str(tmp_path / "tuned"), "hf", Options(hf_family="deepseek_v32"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", attn_implementation="eager").eval()
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, megatron_llm.load_model(cfg.checkpoint.dir)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_mtp_depth_with_its_indexer_round_trips_as_published(hf_dir, tmp_path, case):
    """A published directory keeps its multi-token prediction layer (DeepSeek-V3.2's 61, GLM-5's 78) with an indexer
    in its block: written as layer num_layers, read back with the depth (bit-exact); transformers skips it."""
    read = megatron_llm.load_model(hf_dir(case)[0])
    cfg = dataclasses.replace(read.cfg, mtp_layers=1)
    model = build_model(cfg, "cpu", seed=2)
    model.load_state_dict(read.state_dict(), strict=False)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "out"), "hf", Options(hf_family=case))
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written[f"model.layers.{cfg.num_layers}.self_attn.indexer.wk.weight"],
                       model.mtp.layers["0"].block.attention.indexer.wk.weight)
    back = megatron_llm.load_model(tmp_path / "out")
    assert back.cfg == cfg
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in back.state_dict().items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, read(tokens()), atol=1e-5, rtol=1e-5)


def test_indexer_loss_matches_megatron_core(hf_dir):
    """model.dsa_indexer_loss_coeff 1, one training step: the logged loss is
    megatron-core's compute_dsa_indexer_loss (dense) on each layer's index scores and the attention's queries and
    keys, mean over layers; the indexer's gradient is autograd's through megatron-core's formula; the rest of the
    model gets the language-model loss's gradients alone."""
    from megatron.core.transformer.experimental_attention_variant.dsa import compute_dsa_indexer_loss

    path, _ = hf_dir("deepseek_v32")
    x, coeff = tokens(), 1.0
    read = megatron_llm.load_model(path)
    cfg = dataclasses.replace(read.cfg, dsa_indexer_loss_coeff=coeff)
    model, reference = (build_model(cfg, "cpu", seed=0) for _ in range(2))
    for m in (model, reference):
        m.load_state_dict(read.state_dict())
    labels = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
    batch = dict(tokens=x, labels=labels, loss_mask=(labels >= 0).float(), channel=torch.zeros(2, dtype=torch.long))
    ours = {}  # each parameter's gradient as the step accumulates it (the step clears them)
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: ours.__setitem__(name, p.grad.clone()))
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [batch], ParallelDims(1, 0, 1, 1, 1),
                        z_loss=0.0, grad_clip=0.0, autocast=None)

    reference.train()
    reference(x)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    losses = []
    for m in reference.modules():
        if isinstance(m, Indexer):
            index, q, k, scale = m.loss_inputs  # [b, s, s], the attention's [b, heads, s, d]
            chosen = index.topk(TOPK, dim=-1).indices  # used by its sparse form only
            losses.append(compute_dsa_indexer_loss(index, chosen, q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3), scale,
                                                   coeff, False, one_rank))
    assert len(losses) == cfg.num_layers
    assert result.moe["dsa_indexer_loss"] == pytest.approx(sum(losses).item() / len(losses), rel=1e-5)
    names = [n for n, _ in reference.named_parameters() if ".indexer." in n]
    grads = torch.autograd.grad(sum(losses), [reference.get_parameter(n) for n in names])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(ours[name], grad, atol=1e-9, rtol=1e-5)
    assert ours["layers.1.attention.indexer.wk.weight"].abs().max() > 1e-4
    _, _, lm_only = our_sgd_step(path, x)  # minus the update: the gradient (SGD, lr 1)
    for name in ("layers.1.attention.wkv_b.weight", "layers.1.attention.wq_a.weight", "tok_embeddings.weight"):
        torch.testing.assert_close(ours[name], lm_only[name], atol=1e-7, rtol=1e-5)
