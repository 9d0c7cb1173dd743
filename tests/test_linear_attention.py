"""The Gated DeltaNet mixer (model/linear_attention.py): its chunked form equals the token-by-token recurrence (outputs,
final state and gradients, any chunk size, from a given state), the recurrence equals transformers' reference
kernel, a hybrid model decoded one token at a time through the cache gives the logits of one forward, and what a
linear layer cannot do is refused by name. The families built on it: tests/test_families_hybrid.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_llm.model import build_model
from megatron_llm.model.attention_kernels import KeyMask
from megatron_llm.model.kv_cache import KVCache
from megatron_llm.model.linear_attention import chunked_delta_rule, recurrent_delta_rule
from megatron_llm.model_config import ModelConfig
from megatron_llm.errors import UsageError

# 2 query/key heads serving 2 value heads each, widths that differ, a decay strong enough to matter
B, S, HK, HV, DK, DV = 2, 37, 2, 4, 8, 6
HYBRID = ModelConfig(vocab_size=97, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                     ffn_hidden_size=96, max_seq_len=64, layer_types=["linear", "linear", "full", "linear"],
                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                     linear_chunk_size=8, attention_gate="sigmoid", qk_norm=True, norm_unit_offset=True,
                     rope_fraction=0.25)


def inputs(seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, S, HK, DK, generator=g), torch.randn(B, S, HK, DK, generator=g)
    v = torch.randn(B, S, HV, DV, generator=g)
    decay, beta = -3 * torch.rand(B, S, HV, generator=g), torch.rand(B, S, HV, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, decay, beta)]


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])  # 5 and 16 do not divide 37; 64 is one padded chunk
def test_chunked_equals_recurrent(chunk):
    x = inputs()
    state = torch.randn(B, HV, DK, DV, generator=torch.Generator().manual_seed(3))
    for initial in (None, state):
        out, final = recurrent_delta_rule(*x, initial)
        chunked, chunked_final = chunked_delta_rule(*x, chunk, initial)
        torch.testing.assert_close(chunked, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked_final, final, atol=1e-5, rtol=1e-5)


def test_gradients_of_both_forms_agree():
    x, y = inputs(requires_grad=True), inputs(requires_grad=True)
    weight = torch.randn(B, S, HV, DV, generator=torch.Generator().manual_seed(4))
    (recurrent_delta_rule(*x)[0] * weight).sum().backward()
    (chunked_delta_rule(*y, 16)[0] * weight).sum().backward()
    for a, b in zip(x, y):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)


def test_recurrence_equals_transformers_kernel():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    x = inputs(seed=5)
    out, final = recurrent_delta_rule(*x)
    theirs, their_final = torch_recurrent_gated_delta_rule(*x[:3], g=x[3], beta=x[4], output_final_state=True,
                                                           use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(final, their_final, atol=1e-6, rtol=1e-5)


def test_cached_decoding_equals_one_forward():
    """A prompt of 11 then 6 tokens one at a time through the cache: the linear layers' state and convolution
    history carried, the full layer's keys and values cached, the same logits as the whole sequence at once."""
    model = build_model(HYBRID, "cpu", seed=0).eval()
    x = torch.randint(0, HYBRID.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x)
        cache = KVCache(32)
        steps = [model(x[:, :11], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(11, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_a_row_as_alone():
    """Left padding zeroes a linear layer's input there, so the state starts at the row's first token."""
    model = build_model(HYBRID, "cpu", seed=1).eval()
    x = torch.randint(0, HYBRID.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), x), dim=1)
    valid = torch.cat((torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)), dim=1)
    with torch.no_grad():
        alone = model(x)
        together = model(padded, positions=(valid.cumsum(-1) - 1).clamp(min=0), keys=KeyMask(valid=valid))
    torch.testing.assert_close(together[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_packed_documents_are_refused_by_name():
    model = build_model(HYBRID, "cpu", seed=0)
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="linear-attention .* packed documents"):
        model(x, keys=KeyMask(documents=torch.zeros(1, 8, dtype=torch.long)))


@pytest.mark.parametrize("change,words", [
    (dict(linear_num_value_heads=3), r"model\.linear_num_value_heads \(3\) must be a multiple"),
    (dict(linear_key_head_dim=0), r"model\.linear_key_head_dim must be positive"),
])
def test_bad_linear_sizes_are_one_line(change, words):
    with pytest.raises(UsageError, match=words):
        dataclasses.replace(HYBRID, **change).validate()


LINEAR_LAYERS = dict(model__num_layers=4, model__layer_types="[linear, full, linear, full]",
                     model__linear_num_key_heads=2, model__linear_num_value_heads=4, model__linear_key_head_dim=16,
                     model__linear_value_head_dim=8)


@pytest.mark.parametrize("settings, message", [
    (dict(model__num_kv_heads=4, parallel__tp=4),
     r"model\.linear_num_key_heads \(2\) is not divisible by parallel\.tp \(4\)"),
    (dict(data__document_mask=True), r"linear-attention layers.*set data\.document_mask false"),
])
def test_what_linear_layers_cannot_do_is_refused_by_the_config(tiny_config, settings, message):
    """Before any process group. (tests/test_parallel.py's deepnorm chain trains linear layers at tp2-sp and pp2.)"""
    with pytest.raises(UsageError, match=message):
        tiny_config(**LINEAR_LAYERS, **settings)
