"""The model against Hugging Face on CPU in fp32, plus the invariants the rest of the code relies on."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from conftest import perturb_norms_and_biases
from megatron_llm.checkpoint.hf import (
    hf_config_from_model_config,
    hf_to_native,
    model_config_from_hf,
    native_to_hf,
)
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model import Transformer, build_model, count_params, flops_per_token, rope_frequencies, token_cross_entropy

VOCAB, SEQ = 101, 24
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, rms_norm_eps=1e-6,
)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so every band (kept, smoothed, divided) occurs
}
CASES = {
    "llama-mha": ("Llama", dict(num_key_value_heads=4)),
    "llama-mha-tied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa": ("Llama", dict(num_key_value_heads=2)),
    "llama-gqa-tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa": ("Llama", dict(num_key_value_heads=1)),
    "llama-mqa-tied": ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope": ("Llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "llama-bias": ("Llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=None)),
}


def hf_model(name: str) -> nn.Module:
    prefix, extra = CASES[name]
    config = getattr(transformers, f"{prefix}Config")(**SMALL, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    perturb_norms_and_biases(model)
    return model


def converted(hf: nn.Module) -> Transformer:
    model = build_model(model_config_from_hf(hf.config.to_dict()), "cpu")
    model.load_state_dict(hf_to_native(hf.state_dict(), hf.config.to_dict()))
    return model.eval()


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CASES)
def test_logits_match_hugging_face(name):
    hf = hf_model(name)
    model = converted(hf)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert (model.output.weight is model.tok_embeddings.weight) == hf.config.tie_word_embeddings


def test_loss_matches_hugging_face():
    hf = hf_model("llama-gqa")
    model = converted(hf)
    x = tokens()
    labels = x.clone()
    labels[0, :5] = -100  # a masked prompt
    # HF shifts inside its loss; ours takes next-token labels already shifted.
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        token_ce = model(x, labels=shifted)
        expected = hf(x, labels=labels).loss
    torch.testing.assert_close(token_ce.sum() / (shifted >= 0).sum(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-gqa-tied"])
def test_gradients_match_hugging_face(name):
    """Every gradient, dense: a tied embedding takes a sparse lookup gradient into the head's dense one."""
    hf = hf_model(name).train()
    model = converted(hf).train()
    x = tokens()
    shifted = F.pad(x[:, 1:], (0, 1), value=-100)
    (model(x, labels=shifted).sum() / (shifted >= 0).sum()).backward()
    hf(x, labels=x).loss.backward()
    ours = native_to_hf({name: p.grad for name, p in model.named_parameters()}, model.cfg, hf.config.model_type)
    theirs = {name: p.grad for name, p in hf.named_parameters()}
    assert sorted(ours) == sorted(theirs)
    for key, grad in ours.items():
        assert grad.layout == torch.strided, key
        torch.testing.assert_close(grad, theirs[key], atol=1e-6, rtol=1e-4, msg=key)


def test_token_cross_entropy():
    logits = torch.randn(2, 7, 13).bfloat16()
    labels = torch.randint(0, 13, (2, 7))
    labels[0, 3], labels[1, 0] = -1, -100  # any negative label is ignored
    ce = token_cross_entropy(logits, labels)
    assert ce.shape == (2, 7) and ce.dtype == torch.float32
    expected = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    torch.testing.assert_close(ce, expected.masked_fill(labels < 0, 0.0))


def test_llama3_frequencies_match_transformers():
    """At Llama-3.1's real settings, where the parity models above are too small to look."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(LLAMA3_SCALING, original_max_position_embeddings=8192)
    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours, _ = rope_frequencies(128, 500000.0, scaling, max_seq_len=8192)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                  max_seq_len=32)
    return ModelConfig(**{**values, **overrides})


def test_logit_softcap():
    capped = build_model(tiny_cfg(logit_softcap=2.0, init_std=0.5), "cpu", seed=0)
    plain = build_model(tiny_cfg(init_std=0.5), "cpu", seed=0)
    x = tokens()
    raw = plain(x)
    assert raw.abs().max() > 2.0  # the cap has something to do
    torch.testing.assert_close(capped(x), 2.0 * torch.tanh(raw / 2.0))


def test_state_dict_round_trip():
    hf = hf_model("qwen3")
    sd = hf.state_dict()
    back = native_to_hf(hf_to_native(sd, hf.config.to_dict()), model_config_from_hf(hf.config.to_dict()), "qwen3")
    assert sorted(back) == sorted(sd) and all(back[k].data_ptr() == sd[k].data_ptr() for k in sd)  # no copies


def test_tied_checkpoint_without_lm_head_loads():
    hf = hf_model("llama-gqa-tied")
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model = build_model(model_config_from_hf(hf.config.to_dict()), "cpu")
    model.load_state_dict(hf_to_native(sd, hf.config.to_dict()))  # strict
    torch.testing.assert_close(model.output.weight, hf.lm_head.weight)


@pytest.mark.parametrize("name", ["llama3-rope", "llama-bias", "qwen2", "qwen3", "mistral"])
def test_hf_config_round_trip(name):
    prefix, _ = CASES[name]
    cfg = model_config_from_hf(hf_model(name).config.to_dict())
    out = hf_config_from_model_config(cfg, prefix.lower())
    assert model_config_from_hf(out) == cfg
    assert model_config_from_hf(getattr(transformers, f"{prefix}Config")(**out).to_dict()) == cfg


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(norm="layernorm")), ("llama", dict(qk_norm=True)), ("llama", dict(mlp="relu")),
    ("qwen2", dict(qkv_bias=False)), ("mistral", dict(logit_softcap=30.0)),
])
def test_hf_config_refuses_what_the_family_cannot_express(family, overrides):
    with pytest.raises(UsageError):
        hf_config_from_model_config(tiny_cfg(**overrides), family)


def test_meta_build_is_fully_materialised_seeded_and_tied():
    cfg = tiny_cfg(tie_embeddings=True, qk_norm=True, qkv_bias=True, linear_bias=True)
    model = build_model(cfg, "cpu", seed=3)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.output.weight is model.tok_embeddings.weight
    again = build_model(cfg, "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    block = model.layers["0"]
    assert block.attention.wo.weight.std() < 0.6 * block.attention.wq.weight.std()  # 1/sqrt(2*4) = 0.35
    assert torch.equal(block.attention.q_norm.weight, torch.ones(cfg.head_dim))
    assert not block.attention.wq.bias.any() and not block.feed_forward.w2.bias.any()
    assert "rope_cos" not in model.state_dict()


@pytest.mark.parametrize("overrides", [
    dict(), dict(mlp="gelu"), dict(mlp="relu"), dict(mlp="geglu"), dict(norm="layernorm"),
    dict(qk_norm=True, qkv_bias=True, linear_bias=True, tie_embeddings=True, logit_softcap=10.0),
    dict(norm_placement="sandwich", norm_unit_offset=True, attn_softcap=5.0, sliding_window=4,
         layer_types=["sliding", "full", "sliding", "full"], rope_local_theta=100.0, mlp="geglu_tanh"),
    dict(norm_placement="output", qk_norm=True, qk_norm_per_head=False, mlp="reglu"),
    dict(norm_placement="deepnorm", norm="layernorm", position="learned", mlp="relu2"),
    dict(norm_placement="post", position="sinusoidal", norm_affine=False, norm="layernorm", mlp="silu"),
    dict(mlp="xielu", qk_norm=True, qk_norm_after_rope=True),
    dict(parallel_residual=True, parallel_shared_norm=False, position="alibi", output_bias=True, embedding_norm=True),
    dict(parallel_residual=True, rope_interleaved=True, rope_fraction=0.5, norm_head=True, nope_layers=[1],
         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
])
def test_variants_train(overrides):
    cfg = tiny_cfg(**overrides)
    cfg.validate()
    model = build_model(cfg, "cpu", seed=0)
    assert hasattr(model.layers["0"].feed_forward.w3, "weight") == cfg.gated
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():  # every parameter initialised: finite, and weights drawn
        assert torch.isfinite(p).all(), name
        if p.ndim == 2:
            assert p.std() > 0, name
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()
    model(x, labels=x).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_and_flops_match_the_model(tied):
    cfg = tiny_cfg(tie_embeddings=tied, qk_norm=True, qkv_bias=True, linear_bias=True)
    model = build_model(cfg, "cpu")
    params = dict(model.named_parameters())  # a tied head appears once, as tok_embeddings.weight
    assert cfg.num_params() == sum(p.numel() for p in params.values())
    matmul_params = sum(p.numel() for k, p in params.items() if k != "tok_embeddings.weight")
    matmul_params += VOCAB * cfg.hidden_size if tied else 0  # the tied head is still a matmul
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * SEQ
    assert flops_per_token(cfg, SEQ) == 6 * matmul_params + attention


def test_a_mixture_of_experts_counts_the_flops_of_the_experts_a_token_passes():
    """MFU counts the top_k experts a token passes through, as Megatron's does, not all E: a MoE's FLOPs per
    token are those of its dense twin (every MoE feed-forward one MLP k experts wide) plus its routers'
    matmuls. MLA's attention FLOPs take its value width, not the query-key one."""
    moe = tiny_cfg(moe_experts=4, moe_top_k=2, moe_ffn_hidden_size=48)
    dense = dataclasses.replace(moe, moe_experts=0, ffn_hidden_size=96)
    routers = moe.num_layers * moe.moe_experts * moe.hidden_size
    assert count_params(moe, active=True) == dense.num_params() + routers < moe.num_params()
    assert flops_per_token(moe, SEQ) == flops_per_token(dense, SEQ) + 6 * routers
    mla = tiny_cfg(attention="mla", head_dim=24, mla_rope_head_dim=8, mla_v_head_dim=12, mla_kv_lora_rank=32)
    matmuls = sum(p.numel() for k, p in build_model(mla, "cpu").named_parameters() if k != "tok_embeddings.weight")
    assert flops_per_token(mla, SEQ) == 6 * matmuls + 6 * mla.num_layers * mla.num_heads * (24 + 12) * SEQ


def test_pipeline_stages_pass_hidden_states_through():
    model = build_model(tiny_cfg(), "cpu", seed=0)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"], first.layers["3"], last.layers["0"], last.layers["1"]
    first.norm = first.output = None
    last.tok_embeddings = None
    seen = {}
    model.layers["1"].register_forward_hook(lambda mod, args, out: seen.update(h=out))
    x = tokens()
    with torch.no_grad():
        full = model(x)
        hidden = first(x)
        assert hidden.shape == (2, SEQ, 64)
        torch.testing.assert_close(hidden, seen["h"], atol=0, rtol=0)
        torch.testing.assert_close(last(hidden), full, atol=0, rtol=0)


def test_attention_shards_by_heads_without_model_change():
    """What a colwise wq/wk/wv and rowwise wo plan does: each shard keeps whole heads (here 2 query
    heads and their 1 kv head), and the shards' outputs sum to the full attention's."""
    model = build_model(tiny_cfg(qk_norm=True), "cpu", seed=0)
    attn = model.layers["0"].attention
    x = torch.randn(2, SEQ, 64)
    ctx = model.attention_context()
    full = attn(x, ctx=ctx)
    total = torch.zeros_like(full)
    for rank in range(2):
        shard = copy.deepcopy(attn)
        for proj in (shard.wq, shard.wk, shard.wv):  # rows are heads: keep this rank's half
            proj.weight = nn.Parameter(proj.weight.chunk(2, dim=0)[rank])
        shard.wo.weight = nn.Parameter(shard.wo.weight.chunk(2, dim=1)[rank])
        total += shard(x, ctx=ctx)
    torch.testing.assert_close(total, full)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("rules", [
    dict(window=5), dict(alibi=True), dict(softcap=2.0), dict(window=5, alibi=True, softcap=2.0),
], ids=["window", "alibi", "softcap", "all"])
def test_attention_kernels_agree_with_the_dense_oracle(rules):
    """Each rule is written once: the CPU kernel attend() picks, and FlexAttention (its eager reference:
    torch 2.13 runs FlexAttention's forward on CPU), equal softmax(rules(q k^T)) v computed densely."""
    from megatron_llm.model.attention_kernels import ScoreRules, alibi_slopes, attend, attention_probs, flex_attention

    rules = ScoreRules(**rules)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8, generator=gen), torch.randn(2, 2, 16, 8, generator=gen), torch.randn(2, 2, 16, 8, generator=gen)
    slopes = alibi_slopes(4)
    expected = attention_probs(q, k, rules, 0.5, slopes) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(attend(q, k, v, rules, 0.5, slopes), expected)
    torch.testing.assert_close(flex_attention(q, k, v, rules, 0.5, slopes, compiled=False), expected)


@pytest.mark.parametrize("widths", [(12, 8), (8, 12)], ids=["mla-narrow-values", "wide-values"])
@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window-mask"])
def test_values_of_another_width_than_the_queries_take_the_fused_kernel(widths, window):
    """MLA's values are narrower than its queries: attend() zero-pads the narrower so that SDPA keeps its fused
    kernel (the math fallback keeps the [s, s] probabilities for the backward); output and gradients equal
    the dense softmax(q k^T) v at the true widths."""
    from megatron_llm.model.attention_kernels import ScoreRules, attend, attention_probs

    (dq, dv), rules = widths, ScoreRules(window=window)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 16, dq, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 16, dv, generator=gen, requires_grad=True)
    out = attend(q, k, v, rules, 0.3)
    expected = attention_probs(q, k, rules, 0.3) @ v
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g))
    if window is None:  # the plain causal path: CPU flash attention, where the unpadded call falls back to math
        assert "Flash" in type(out.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("window,cached", [(None, 0), (5, 0), (5, 10)], ids=["causal", "window", "window-decode"])
def test_attention_sinks_are_an_extra_softmax_column(window, cached):
    """gpt-oss's sinks: each head's logit joins every row's softmax and its weight is dropped, so rows sum to less
    than 1. attend() against a softmax written out over [scores | sink] (grouped-query, with and without a window,
    and queries after a KV cache's keys), outputs and the gradients of q, k, v and the sinks."""
    from megatron_llm.model.attention_kernels import ScoreRules, attend

    gen = torch.Generator().manual_seed(0)
    s_q, s_kv = 16 - cached, 16
    q = torch.randn(2, 4, s_q, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, s_kv, 8, generator=gen, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, generator=gen, requires_grad=True)
    out = attend(q, k, v, ScoreRules(window=window, sinks=True), 0.3, sinks=sinks)

    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3  # [b, heads, s_q, s_kv]
    query, key = torch.arange(cached, s_kv)[:, None], torch.arange(s_kv)[None, :]
    keep = (key <= query) & ((query - key < window) if window else True)
    scores = scores.masked_fill(~keep, float("-inf"))
    column = sinks[None, :, None, None].expand(2, 4, s_q, 1)
    probs = torch.cat((scores, column), dim=-1).softmax(-1)[..., :-1]
    expected = probs @ v.repeat_interleave(2, dim=1)
    assert (probs.sum(-1) < 1).all()
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(expected)
    inputs = (q, k, v, sinks)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g))


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from megatron_llm.model.attention_kernels import alibi_slopes

    for heads in (4, 6, 12):
        alibi = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # [heads, 1, 3]: slope * position
        torch.testing.assert_close(alibi_slopes(heads), alibi[:, 0, 1], atol=0, rtol=0)


def test_input_longer_than_the_context_is_one_line():
    model = build_model(tiny_cfg(sliding_window=4), "cpu", seed=0)  # a window is not the context: 32 positions
    model(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="an input of 33 positions exceeds the model's context of 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("cached,documents", [(0, False), (10, False), (0, True)],
                         ids=["chunks", "chunks-decode", "chunks-documents"])
def test_chunked_attention_is_a_mask_of_absolute_chunks(cached, documents):
    """Llama 4's chunked layers: a query sees keys of its own chunk of 5 key indices, causally. attend() (SDPA with
    the dense mask; with documents too, which must not cut the row) and FlexAttention's eager reference against a
    softmax under that mask written out, after a KV cache's keys too; and the mask itself."""
    from megatron_llm.model.attention_kernels import KeyMask, ScoreRules, attend, dense_bias, flex_attention

    gen = torch.Generator().manual_seed(0)
    s_q, s_kv, chunk = 16 - cached, 16, 5
    q = torch.randn(2, 4, s_q, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, s_kv, 8, generator=gen, requires_grad=True) for _ in range(2))
    query, key = torch.arange(cached, s_kv)[:, None], torch.arange(s_kv)[None, :]
    keep = (key <= query) & (query // chunk == key // chunk)
    keys = KeyMask(documents=(torch.arange(s_kv) >= 7).long().expand(2, s_kv)) if documents else KeyMask()
    if documents:
        keep = keep & ((query >= 7) == (key >= 7))
    rules = ScoreRules(chunk=chunk)
    assert torch.equal(dense_bias(rules, None, s_q, s_kv, "cpu", keys)[0, 0] == 0, keep)
    out = attend(q, k, v, rules, 0.3, keys=keys)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
    expected = scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g))
    if not documents:
        with torch.no_grad():
            flex = flex_attention(*(t.detach() for t in (q, k, v)), rules, 0.3, compiled=False)
            torch.testing.assert_close(flex, expected)


def test_llama4_query_temperature_and_l2_norm():
    """The temperature 1 + scale * log1p(floor((p + 1) / floor_scale)) at each position, from the context's positions
    (a cache's continuation, per row) or 0..s-1; the weightless norm against torch's rms_norm."""
    import math

    from megatron_llm.model.attention import l2_norm, query_temperature

    expected = [1 + 0.5 * math.log1p(math.floor((p + 1) / 4)) for p in range(10)]
    torch.testing.assert_close(query_temperature(None, 10, 4.0, 0.5).flatten(), torch.tensor(expected))
    rows = torch.tensor([[3, 4, 5], [7, 8, 9]])
    torch.testing.assert_close(query_temperature(rows, 3, 4.0, 0.5)[..., 0, 0], torch.tensor(expected)[rows])
    x = torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(l2_norm(x, 1e-5), F.rms_norm(x, (16,), eps=1e-5))
