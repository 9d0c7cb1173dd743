"""The mixture-of-experts families against transformers' own models, tiny and random (fp32, CPU): logits,
the router's choices in every MoE layer, the Hugging Face round trip through native (bit exact), and one
training step from the Hugging Face directory, whose loss including the load-balancing loss, and whose
gradients, equal transformers' with output_router_logits. Megatron-LM at tp 2, pp 2, ep 2 round-trips
them bit-exact or refuses them by name (tests/test_convert.py checks the MoE shards against megatron-core).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import megatron_llm
from conftest import hf_native_hf
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families import deepseek, family
from megatron_llm.checkpoint.native import save_weights
from megatron_llm.config import Config
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model_config import ModelConfig
from megatron_llm.model.moe import Router
from megatron_llm.parallel import ParallelDims
from megatron_llm.training.step import train_step
from tests.test_families import SMALL, WINDOW, tokens

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
EXPERTS = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
# case -> config keys over SMALL: 4 experts, top-2, each family's own options switched on. A case is a model_type, or
# a model_type, '-' and a variant name where one family needs several configs.
CASES = {
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True,
                      mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=24, decoder_sparse_step=2),
    "olmoe": dict(num_experts=4, pad_token_id=0, eos_token_id=1),
    "flex_olmo": dict(num_experts=4, norm_topk_prob=True, pad_token_id=0, eos_token_id=1),
    # MiniMax-M2: QK-norm over the whole projection, half of each head rotated, a sigmoid router with the expert bias
    # whose balance loss takes the softmax of its logits
    "minimax_m2": dict(num_local_experts=4, head_dim=16,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # DeepSeek-V2: latent attention, softmax scores never renormalised, groups ranked by their best score
    # (group_limited_greedy), a scaled shared expert with biases, a dense first layer
    "deepseek_v2": dict(n_routed_experts=8, moe_intermediate_size=32, topk_method="group_limited_greedy", n_group=4,
                        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                        mlp_bias=True, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=12, num_key_value_heads=4),
    # DeepSeek-V2-Lite's form: one query projection, greedy top-k, no biases, its published YaRN (mscale 0.707)
    "deepseek_v2-lite": dict(n_routed_experts=8, moe_intermediate_size=32, topk_method="greedy", n_shared_experts=2,
                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                             qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    # latent attention (compressed q and kv, decoupled interleaved RoPE dims) with DeepSeek-V3's published YaRN, 8
    # experts in 2 groups of which a token may use 1 (top-k / kept groups = 2, as DeepSeek-V3's 8 / 4: groups ranked
    # by their best two), the expert bias, a shared expert, a dense first layer, a routed scale
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4,
                        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    # DeepSeek-V3's router and experts after a dense layer in the families that copied them, each with its own
    # attention: GLM-4.7-Flash's latent attention (one q projection, RoPE dims by halves), its published block-norm
    # epsilon 1e-5 beside the latent norms' fixed 1e-6 (model.mla_norm_eps)
    "glm4_moe_lite": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=2,
                          mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4,
                          rope_interleave=False, rms_norm_eps=1e-5),
    # GLM-4.5: q/k/v biases, QK-norm, half of each (wider) head rotated; four layers, a dense first one
    "glm4_moe": dict(num_hidden_layers=4, n_routed_experts=8, moe_intermediate_size=32, n_group=4, topk_group=1,
                     n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True,
                     use_qk_norm=True, head_dim=24),
    # Sarvam-MoE: GLM-4.5 with q/k/v fused and its biases (use_qkv_bias), QK-norm by default; every layer sparse
    "sarvam_moe": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=4, topk_group=1, n_shared_experts=1,
                       first_k_dense_replace=0, use_qkv_bias=True, head_dim=16),
    # dots.llm1: biases on every projection, QK-norm, a sliding layer, renormalised top-k (its default is not)
    "dots1": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=4, topk_group=1, n_shared_experts=2,
                  first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
                  sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    # EXAONE-MoE: QK-norm, a sliding layer then a full one without positions
    "exaone_moe": dict(num_experts=8, moe_intermediate_size=32, n_group=4, topk_group=2, num_shared_experts=1,
                       first_k_dense_replace=1, sliding_window=WINDOW, sliding_window_pattern=2, pad_token_id=0,
                       eos_token_id=1, bos_token_id=2),
    # HunYuan-MoE: biases on every projection, QK-norm after RoPE, NTK-alpha RoPE, a shared MLP beside the experts,
    # top-k given per layer
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=[2, 2], attention_bias=True, head_dim=16, pad_token_id=0,
                           eos_token_id=1, bos_token_id=2,
                           rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}),
    # Cohere2-MoE: a dense first layer of its own width (rotated: force_rope), then sliding and full (NoPE) layers,
    # shared experts added, RMSNorm, biases, a sigmoid router renormalised
    "cohere2_moe": dict(num_hidden_layers=4, num_experts=4, num_shared_experts=1, shared_expert_combination_strategy="sum",
                        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], prefix_dense_intermediate_size=80,
                        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                        head_dim=16, sliding_window=WINDOW,
                        rms_norm_eps=1e-5, attention_bias=True, expert_selection_fn="sigmoid", logit_scale=0.5,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2),
    # Cohere2-MoE's defaults: the shared experts averaged with the routed ones ((routed + shared) / 2), a softmax
    # router, Cohere's LayerNorm without bias, no linear biases
    "cohere2_moe-average": dict(num_experts=4, num_shared_experts=1, head_dim=16, pad_token_id=0, eos_token_id=1,
                                bos_token_id=2),
    # Granite-MoE: Granite's multipliers, experts with gate and up fused; the shared variant's shared MLP
    "granitemoe": dict(num_local_experts=4, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=4.0),
    "granitemoeshared": dict(num_local_experts=4, shared_intermediate_size=48, embedding_multiplier=2.0,
                             residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    # Granite-MoE SWA: a sink per head, a full layer without positions (base 0) and a sliding one with a base of its
    # own, the experts under gate_up_proj / down_proj, a shared MLP
    "granitemoe_swa": dict(num_local_experts=4, shared_intermediate_size=48, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, sliding_window=WINDOW,
                           layer_types=["full_attention", "sliding_attention"], layer_rope_theta=[0, 500.0]),
    # ERNIE 4.5 MoE: a softmax router with the expert bias, biases on every projection and the head, a dense first
    # layer (moe_layer_start_index), shared experts
    "ernie4_5_moe": dict(num_experts=4, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
                         use_bias=True, tie_word_embeddings=False, head_dim=16),
    # DBRX: q/k/v fused and clipped (0.1 binds here), LayerNorms without bias, the top-k weights divided by their sum
    # (moe_normalize_expert_weights 1), experts flattened to [E ffn, hidden]; SMALL's shape under its own names (its
    # config copies d_model into ffn_config before transformers' attribute map would set it)
    "dbrx": dict(d_model=SMALL["hidden_size"], n_heads=SMALL["num_attention_heads"], n_layers=SMALL["num_hidden_layers"],
                 max_seq_len=SMALL["max_position_embeddings"], attn_config=dict(kv_n_heads=2, clip_qkv=0.1, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_loss_weight=0.05)),
    # Solar Open: GLM-4.5's router (8 experts in 2 groups, 1 kept; the expert bias) in every layer, Llama's attention
    # with q/k/v biases
    "solar_open": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=2,
                       routed_scaling_factor=2.5, attention_bias=True, head_dim=16),
    # HunYuan v3: Qwen3's per-head QK-norm, a dense first layer, a sigmoid router with the expert bias beside it,
    # renormalised and scaled, a shared expert (its class's initializer_range 0.006 would route every token alike)
    "hy_v3": dict(num_experts=4, moe_intermediate_size=32, num_shared_experts=1, head_dim=16, router_scaling_factor=2.0,
                  initializer_range=0.02),
    # HunYuan v3's biases on all four attention projections and on the dense and shared MLPs
    "hy_v3-bias": dict(num_experts=4, moe_intermediate_size=32, num_shared_experts=1, head_dim=16,
                       initializer_range=0.02, attention_bias=True, mlp_bias=True, num_experts_per_tok=3),
    # Mellum: Qwen3-MoE's block in a sliding layer (RoPE base 10000) and a full one (base 500000)
    "mellum": dict(num_experts=4, moe_intermediate_size=32, head_dim=16, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention"]),
    # Flint: a sink per head everywhere, RoPE in the sliding layer only, a sigmoid top-k without expert bias beside a
    # shared expert, every layer sparse here (its default keeps the first two dense)
    "flint": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, head_dim=16,
                  sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], mlp_only_layers=[]),
    # Kolibri-1: EXAONE 4's attention (the full layer without positions) in a sandwich block, a sigmoid router whose
    # expert bias moves the logits, renormalised, beside a shared expert
    "kolibri1": dict(num_local_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, head_dim=16,
                     sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], norm_topk_prob=True),
    # AFMoE: QK-norm, a sigmoid output gate, RoPE in the sliding layer only, a sandwich block, muP's embedding scale, a
    # sigmoid router with the expert bias, scaled, a shared expert; every layer sparse here (its default: one dense)
    "afmoe": dict(num_experts=4, moe_intermediate_size=32, num_shared_experts=1, num_dense_layers=0, route_scale=2.0,
                  mup_enabled=True, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    # Laguna: a softplus output gate per head, a sliding layer rotating whole heads (base 1e4) and a full one rotating
    # half of each (5e5: its class's blocks), a sigmoid router over soft-capped logits with the expert bias, scaled,
    # beside a shared expert; every layer sparse here (its default keeps the first dense)
    "laguna": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, head_dim=16,
                   sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                   mlp_layer_types=["sparse", "sparse"], moe_router_logit_softcapping=2.0, moe_routed_scaling_factor=2.0),
    # Aria's language model: the softmax of the top-k logits over experts stored [in, out], two shared experts
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2, intermediate_size=32, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2),
    # Sarvam-MLA: DeepSeek-V3's model with its defaults (one query projection, no groups, a dense first layer)
    "sarvam_mla": dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=16,
                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4),
    # A.X-K1: DeepSeek-V3 with a norm on each MoE layer's output; its dense first layer by mlp_layer_types
    "axk1": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=1,
                 mlp_layer_types=["dense", "sparse"], kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4, bos_token_id=0, eos_token_id=1),
}
# transformers computes no aux loss for these (DeepSeek's and the families that copied its router, HunYuan, Cohere2)
NO_AUX_LOSS = {"deepseek_v2", "deepseek_v3", "glm4_moe_lite", "glm4_moe", "sarvam_moe", "dots1", "exaone_moe",
               "hunyuan_v1_moe", "cohere2_moe", "sarvam_mla", "axk1",
               "solar_open", "hy_v3", "kolibri1", "aria_text", "afmoe"}


def model_type_of(case: str) -> str:
    return case.split("-")[0]


def random_hf_model(model_type: str, config: dict, seed: int = 0, routers: tuple[str, ...] = ("gate.weight",)
                    ) -> torch.nn.Module:
    """transformers' model of `model_type` from `config` (fp32, eager attention), its biases, norms, routers (the
    weights named ending in `routers`), attention sinks and expert biases drawn away from their constant inits, so a
    mapping mistake shows."""
    config = transformers.AutoConfig.for_model(model_type, **config)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # the size of the embeddings: larger, a constant would route every token alike
                p.add_(torch.randn_like(p) * 0.02)
            elif "norm" in name or name.endswith((*routers, "sinks")):
                p.add_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's expert bias: it changes the choice
                b.add_(torch.randn_like(b) * 0.01)
    return model


def hf_model(case: str) -> torch.nn.Module:
    return random_hf_model(model_type_of(case), {**SMALL, **EXPERTS, **CASES[case]})


FAMILIES_TESTED = {model_type_of(case) for case in CASES}  # tests/test_family_coverage.py gathers these


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """case -> (its saved directory, the transformers model), built once per module."""

    return functools.cache(lambda case: saved(hf_model(case), tmp_path_factory.mktemp(case)))


def saved(model: torch.nn.Module, path):
    """(path, model) once transformers has saved the model there."""
    model.save_pretrained(path)
    return path, model


def our_routes(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The expert indices [tokens, k] every router chose for x, in layer order, each row sorted."""
    chosen = []
    hooks = [m.register_forward_hook(lambda m, a, out: chosen.append(out[0].sort(-1).values))
             for m in model.modules() if isinstance(m, Router)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return chosen


def hf_routes(hf: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The same from transformers: its routers (gate, or Granite's router) return (logits, weights, indices), or
    (DeepSeek-V3, DBRX) the MoE block picks the indices in route_tokens_to_experts."""
    chosen = []
    for block in moe_blocks(hf).values():
        if hasattr(block, "route_tokens_to_experts"):
            route = block.route_tokens_to_experts
            block.route_tokens_to_experts = lambda logits, route=route: _kept(chosen, route(logits))
        else:
            router_of(block).register_forward_hook(lambda m, a, out: _kept(chosen, out))
    with torch.no_grad():
        hf(x)
    return chosen


def moe_blocks(hf: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> transformers' MoE block there (layer.mlp; Granite's layer.block_sparse_moe; DBRX's block.ffn):
    the child of the layer that holds experts."""
    layers = getattr(hf.base_model, "layers", None) or hf.base_model.blocks
    return {i: m for i, layer in enumerate(layers) for m in layer.children() if hasattr(m, "experts")}


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    return block.gate if hasattr(block, "gate") else block.router


def _kept(chosen: list, out: tuple, index: Optional[int] = None) -> tuple:
    """Keeps out[index], the expert indices among a router's outputs (None: its one integer tensor)."""
    indices = out[index] if index is not None else next(t for t in out if not t.is_floating_point())
    chosen.append(indices.sort(-1).values)
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_and_routes_match_transformers(hf_dir, case):
    path, hf = hf_dir(case)
    model = megatron_llm.load_model(path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert_routes_match(model, hf_model(case), x)
    assert all(len(r.unique()) == model.cfg.moe_experts for r in our_routes(model, x))  # the stacking order tested


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(hf_dir, tmp_path, case):
    path, hf = hf_dir(case)
    hf_native_hf(path, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.model_type == model_type_of(case)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=1e-5, rtol=1e-5)


def assert_routes_match(model: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor) -> None:
    """Every MoE layer of `model` chose for x the experts transformers' `hf` chose, layer by layer."""
    ours, theirs = our_routes(model, x), hf_routes(hf, x)
    assert len(ours) == len(theirs) == sum(model.cfg.layer(i).moe for i in range(model.cfg.num_layers)) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def our_sgd_step(path, x: torch.Tensor) -> tuple:
    """One training step of the model saved at `path` on x (SGD, lr 1, no clipping: the update is minus the
    gradient): (its config, the StepResult, each parameter's gradient by name)."""
    model = megatron_llm.load_model(path)
    labels = F.pad(x[:, 1:], (0, 1), value=-100)  # ours takes next-token labels, already shifted
    batch = dict(tokens=x, labels=labels, loss_mask=(labels >= 0).float(), channel=torch.zeros(2, dtype=torch.long))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [batch], ParallelDims(1, 0, 1, 1, 1),
                        z_loss=0.0, grad_clip=0.0, autocast=None)
    return model.cfg, result, {k: before[k] - v for k, v in model.state_dict().items()}


def sgd_step_beside_transformers(path, hf: torch.nn.Module, x: torch.Tensor, **hf_kwargs) -> tuple:
    """our_sgd_step on x, and transformers' loss on the same x with its backward run (`hf` left in train mode with its
    gradients): (our config, our StepResult, our gradients by name, transformers' output)."""
    cfg, result, grad = our_sgd_step(path, x)
    hf.train()
    expected = hf(x, labels=x, **hf_kwargs)
    expected.loss.backward()
    return cfg, result, grad, expected


@pytest.mark.parametrize("case", CASES)
def test_training_loss_and_gradients_include_the_aux_loss(hf_dir, case):
    """Our training step (SGD, lr 1, no clipping: the update is minus the gradient) against transformers'
    loss = cross-entropy + router_aux_loss_coef * load-balancing loss, and its gradients."""
    path, hf = hf_dir(case)
    x = tokens()
    cfg, result, grad, expected = sgd_step_beside_transformers(path, hf, x, output_router_logits=True)
    if model_type_of(case) in NO_AUX_LOSS:
        assert result.loss == pytest.approx(expected.loss.item(), rel=1e-5)
    else:
        coeff = hf.router_aux_loss_coef  # DBRX's from ffn_config.moe_loss_weight
        assert result.moe["moe_aux_loss"] == pytest.approx(expected.aux_loss.item(), rel=1e-5)
        assert result.loss + coeff * result.moe["moe_aux_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    blocks = moe_blocks(hf)
    assert sorted(blocks) == [i for i in range(cfg.num_layers) if cfg.layer(i).moe]
    for i, theirs in blocks.items():  # transformers' in-memory layout: experts.down_proj [E, hidden, ffn]
        torch.testing.assert_close(grad[f"layers.{i}.feed_forward.router.weight"], router_weight(router_of(theirs)).grad,
                                   atol=1e-6, rtol=1e-4)  # the router's gradient carries the aux loss's
        torch.testing.assert_close(grad[f"layers.{i}.feed_forward.experts.w2"], down_proj_grad(theirs.experts),
                                   atol=1e-6, rtol=1e-4)


def down_proj_grad(experts: torch.nn.Module) -> torch.Tensor:
    """The gradient of transformers' down projections as our w2's [E, hidden, ffn]: down_proj's (transposed where the
    experts hold [E, in, out]: Aria), or DBRX's w2 [E ffn, hidden] (h @ w2[e]) reshaped and transposed per expert."""
    if hasattr(experts, "down_proj"):
        return experts.down_proj.grad.transpose(1, 2) if getattr(experts, "is_transposed", False) else experts.down_proj.grad
    return experts.mlp.w2.grad.view(experts.num_experts, -1, experts.hidden_size).transpose(1, 2)


def router_weight(gate: torch.nn.Module) -> torch.Tensor:
    """transformers' router matrix [E, hidden], wherever its gate keeps it (gate.weight; HunYuan's gate.wg.weight)."""
    (weight,) = (p for name, p in gate.named_parameters() if name.endswith("weight"))
    return weight


# What Megatron-LM cannot hold, by the refusal's words: OLMoE's and MiniMax-M2's QK-norm over the whole projection; FlexOlmo's norms
# after each sublayer; EXAONE-MoE here ranks its groups by their top-1 score in Megatron (top_k / topk_groups = 1), by
# the top 2 in transformers; GLM-4.7-Flash's RoPE dims by halves (megatron-core's MLA pairs them interleaved);
# dots.llm1's, HunYuan's, Cohere2-MoE's and ERNIE's
# output-projection bias and DeepSeek-V2's MLP biases
# (Megatron's add_bias_linear would give the experts biases too); Granite's attention multiplier.
NOT_IN_MEGATRON = {"olmoe": r"model\.qk_norm_per_head", "minimax_m2": r"model\.qk_norm_per_head", "flex_olmo": r"model\.norm_placement",
                   "glm4_moe_lite": r"model\.rope_interleaved=False with latent attention",
                   "exaone_moe": r"model\.moe_groups",
                   "dots1": r"add_bias_linear also gives every expert biases",
                   "hunyuan_v1_moe": r"add_bias_linear also gives every expert biases",
                   "cohere2_moe": r"add_bias_linear also gives every expert biases",
                   "cohere2_moe-average": r"model\.norm_bias",  # Megatron's LayerNorm has a bias
                   "dbrx": r"model\.norm_bias",
                   "deepseek_v2": r"add_bias_linear also gives every expert biases",
                   "ernie4_5_moe": r"add_bias_linear also gives every expert biases",
                   "hy_v3-bias": r"add_bias_linear also gives every expert biases",
                   "mellum": r"model\.rope_local_theta",  # Megatron-LM has one RoPE base
                   "flint": r"model\.nope_layers",
                   "kolibri1": r"model\.norm_placement",
                   "afmoe": r"model\.norm_placement",
                   "laguna": r"model\.rope_local_theta",
                   "granitemoe": r"model\.attention_scale", "granitemoeshared": r"model\.attention_scale",
                   "granitemoe_swa": r"model\.nope_layers",
                   "axk1": r"model\.moe_post_norm"}  # megatron-core has no norm after the MoE layer


@pytest.mark.parametrize("case", CASES)
def test_megatron_round_trip_at_ep2_or_refusal_by_name(hf_dir, tmp_path, case):
    path, _ = hf_dir(case)
    opts = Options(tp=2, pp=2, ep=2)
    if case in NOT_IN_MEGATRON:
        with pytest.raises(UsageError, match=NOT_IN_MEGATRON[case]):
            convert(str(path), "hf", str(tmp_path / "mg"), "megatron", opts)
        assert not (tmp_path / "mg").exists()
        return
    convert(str(path), "hf", str(tmp_path / "mg"), "megatron", opts)
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "hf"), "hf")
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


# A config value the tables cannot reproduce, over each case's config: refused on read, naming the key.
REFUSED = {
    "mixtral": dict(router_jitter_noise=0.1),
    "hunyuan_v1_moe": dict(moe_topk=[2, 1]),  # top-k varying by layer
    "cohere2_moe": dict(shared_expert_combination_strategy="max"),
    "glm4_moe_lite": dict(partial_rotary_factor=0.5),
    "laguna": dict(num_attention_heads_per_layer=[4, 2]),  # heads varying by layer
    "ernie4_5_moe": dict(moe_norm_min=0.6),  # a floor on the top-2-of-4 sum (at least 0.5) that binds
    # the top-k weights divided by their 2-norm
    "dbrx": dict(ffn_config={**CASES["dbrx"]["ffn_config"], "moe_normalize_expert_weights": 2.0}),
}


def test_the_latent_norms_epsilon_exports_where_transformers_has_it():
    """transformers' latent norms keep 1e-6: a model whose latent epsilon is 1e-6 (model.mla_norm_eps, or norm_eps
    where that is null) exports whatever its block norms' epsilon; another is refused by name."""
    table = family("glm4_moe_lite")
    cfg = table.read_config(transformers.AutoConfig.for_model(
        "glm4_moe_lite", **{**SMALL, **EXPERTS, **CASES["glm4_moe_lite"]}).to_dict())
    assert (cfg.norm_eps, cfg.mla_norm_eps) == (1e-5, 1e-6)
    for norm_eps, mla_norm_eps in ((1e-6, None), (1e-5, 1e-6), (1e-4, 1e-6)):
        assert table.write_config(dataclasses.replace(cfg, norm_eps=norm_eps, mla_norm_eps=mla_norm_eps))[
            "rms_norm_eps"] == norm_eps
    with pytest.raises(UsageError, match=r"model\.mla_norm_eps=None"):  # latent norms at 1e-5
        table.write_config(dataclasses.replace(cfg, mla_norm_eps=None))


def test_minimax_m2_reads_its_published_rope_keys():
    """MiniMax-M2's published config.json gives the rotated dims as rotary_dim and its base as rope_theta (5e6, the
    config class's fill where absent); rope_parameters' own partial_rotary_factor wins where both are given."""
    config = transformers.AutoConfig.for_model("minimax_m2", **{**SMALL, **EXPERTS, **CASES["minimax_m2"]}).to_dict()
    published = {k: v for k, v in config.items() if k != "rope_parameters"}
    read = family("minimax_m2").read_config
    assert (read({**published, "rotary_dim": 8}).rope_fraction, read(published).rope_theta) == (0.5, 5000000.0)
    assert read({**config, "rotary_dim": 16}).rope_fraction == 0.5


def test_dbrx_reads_unnormalised_weights_and_the_older_rope_base():
    """moe_normalize_expert_weights null leaves the top-k softmax scores as they are (and writes back null); a
    config.json without rope_parameters takes its base from attn_config.rope_theta."""
    config = transformers.AutoConfig.for_model("dbrx", **{**SMALL, **EXPERTS, **CASES["dbrx"]}).to_dict()
    table = family("dbrx")
    cfg = table.read_config({**config, "ffn_config": {**config["ffn_config"], "moe_normalize_expert_weights": None}})
    assert not cfg.moe_renormalize and table.write_config(cfg)["ffn_config"]["moe_normalize_expert_weights"] is None
    older = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert table.read_config({**older, "attn_config": {**config["attn_config"], "rope_theta": 500000.0}}).rope_theta == 500000.0


@pytest.mark.parametrize("model_type", REFUSED)
def test_unsupported_config_value_is_one_line(model_type):
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **EXPERTS, **CASES[model_type]}).to_dict()
    config.update(REFUSED[model_type])
    (key,) = REFUSED[model_type]
    with pytest.raises(UsageError, match=rf"^config\.json {key}[.=].* is not supported: [^\n]+$"):
        megatron_llm.checkpoint.hf.model_config_from_hf(config)


# Keys a config class fills where a published config.json leaves them out (layer and MLP patterns, RoPE blocks, windows,
# widths): our tables fill them the same way.
FILLED = ("layer_types", "mlp_layer_types", "rope_parameters", "sliding_window", "mlp_only_layers", "num_dense_layers",
          "num_attention_heads_per_layer", "shared_expert_intermediate_size", "num_shared_experts", "n_shared_experts",
          "head_dim", "num_key_value_heads", "router_scaling_factor", "route_scale", "norm_topk_prob")


@pytest.mark.parametrize("model_type", ["solar_open", "hy_v3", "mellum", "flint", "kolibri1", "afmoe", "laguna",
                                        "granitemoe_swa", "aria_text"])
def test_a_config_json_without_the_class_fills_reads_the_same(model_type):
    shape = {k: v for k, v in SMALL.items() if k not in FILLED}
    full = transformers.AutoConfig.for_model(model_type, **{**shape, "num_hidden_layers": 10}).to_dict()
    published = {k: v for k, v in full.items() if k not in FILLED}
    table = family(model_type)
    assert table.read_config(published) == table.read_config(full)


def test_laguna_gates_per_head_or_per_element_as_its_gating_key_says():
    """gating true or "per-head": one softplus gate per head (g_proj [heads, hidden]); false: one per output element,
    written back as such."""
    config = transformers.AutoConfig.for_model("laguna", **{**SMALL, **EXPERTS, **CASES["laguna"]}).to_dict()
    table = family("laguna")
    for gating, per_head in ((True, True), ("per-head", True), (False, False)):
        cfg = table.read_config({**config, "gating": gating})
        assert (cfg.attention_gate, cfg.attention_gate_per_head) == ("softplus", per_head)
        assert table.write_config(cfg)["gating"] is per_head


# Families transformers builds that the menu cannot express (mixture-of-experts ones and, from the second line, the
# other decoder-only causal LMs; ZAYA1 routes to one expert only): refused on read, naming what they do.
NOT_READ = {"mimo_v2_flash": dict(n_routed_experts=4, moe_intermediate_size=32), "beam": dict(num_experts=4),
            "phimoe": dict(num_local_experts=4),
            **{t: {} for t in ("diffllama", "bitnet", "doge", "jetmoe", "dory", "hrm_text", "inkling_text", "inkling2_text",
                               "inkling2_loop_text", "gpt_neox_japanese", "blt", "recurrent_gemma", "mllama",
                               "mllama_text_model", "bailing_hybrid", "kimi_linear", "minimax", "xlstm", "rwkv", "cpmant",
                               "reformer")},
            "zaya": dict(num_experts_per_tok=1)}


@pytest.mark.parametrize("model_type", NOT_READ)
def test_unexpressible_family_is_refused_by_name(model_type):
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **EXPERTS, **NOT_READ[model_type]}).to_dict()
    with pytest.raises(UsageError, match=rf"^model_type '{model_type}' is not supported: [^\n]+ the (router|model) menu "):
        megatron_llm.checkpoint.hf.model_config_from_hf(config)


@pytest.mark.parametrize("case", CASES)
def test_a_dense_model_is_refused_by_name(case):
    """Export of a dense model to a mixture-of-experts family: a UsageError naming the field, not a writer's
    arithmetic failing on the missing experts (which also kept infer_family from trying the families after it)."""
    with pytest.raises(UsageError, match=r"experts"):
        family(model_type_of(case)).write_config(ModelConfig())


@pytest.mark.parametrize("case", [f.model_type for f in deepseek.FAMILIES if f.mtp is not None and f.model_type in CASES])
def test_mtp_depths_written_as_published_load_in_transformers(hf_dir, tmp_path, case):
    """A model with one multi-token prediction depth exports it as layer num_layers (vLLM's deepseek_mtp /
    glm4_moe_mtp names, with the embedding and head copies); transformers skips that layer and gives its own model's
    logits; hf -> native -> hf is bit-exact, the depth included."""
    path, hf = hf_dir(case)
    read = megatron_llm.load_model(path)
    assert read.cfg.mtp_layers == 0  # transformers saved no depth, whatever num_nextn_predict_layers says
    cfg = dataclasses.replace(read.cfg, mtp_layers=1)
    model = build_model(cfg, "cpu", seed=2)
    assert not model.load_state_dict(read.state_dict(), strict=False).unexpected_keys  # the depth stays random
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "out"), "hf", Options(hf_family=case))
    written = load_file(tmp_path / "out" / "model.safetensors")
    depth = f"model.layers.{cfg.num_layers}."
    assert torch.equal(written[depth + "eh_proj.weight"], model.mtp.layers["0"].eh_proj.weight)
    assert torch.equal(written[depth + "shared_head.norm.weight"], model.mtp.layers["0"].norm.weight)
    assert torch.equal(written[depth + "shared_head.head.weight"], written["lm_head.weight"])
    assert torch.equal(written[depth + "post_attention_layernorm.weight"], model.mtp.layers["0"].block.ffn_norm.weight)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.num_nextn_predict_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(back(tokens()).logits, hf(tokens()).logits, atol=1e-5, rtol=1e-5)
    assert megatron_llm.load_model(tmp_path / "out").cfg.mtp_layers == 1
    hf_native_hf(tmp_path / "out", tmp_path / "again")
