"""The Mamba-2 mixer (model/mamba.py): the chunked (SSD) scan equals the token-by-token recurrence at chunk sizes that
do and do not divide the sequence, from a zero and a carried state; a decode through the cache equals one forward;
the layer's refusals and the config's checks."""

from __future__ import annotations

import pytest
import torch

from megatron_llm.errors import UsageError
from megatron_llm.model.attention_kernels import KeyMask
from megatron_llm.model.kv_cache import KVCache
from megatron_llm.model.mamba import chunked_scan, recurrent_scan
from megatron_llm.model.transformer import build_model
from megatron_llm.model_config import ModelConfig

MAMBA = dict(mamba_num_heads=4, mamba_head_dim=8, mamba_groups=2, mamba_state_size=6, mamba_chunk_size=8)


def scan_inputs(s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, s, 4, 8, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(2, s, 4, generator=g))
    A = -torch.rand(4, generator=g) * 4 - 0.5
    B, C = torch.randn(2, s, 2, 6, generator=g), torch.randn(2, s, 2, 6, generator=g)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_scan_equals_recurrence(chunk):
    """37 tokens: chunks of 5 and 16 leave a partial last chunk, 64 is one padded chunk; from zeros and from a state."""
    x, dt, A, B, C = scan_inputs(37)
    state = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    outputs = []
    for initial in (None, state):
        expected, final = recurrent_scan(x, dt, A, B, C, initial)
        y, last = chunked_scan(x, dt, A, B, C, chunk, initial)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last, final, atol=1e-5, rtol=1e-5)
        outputs.append(expected)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the carried state matters


def hybrid_config(**extra) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=48,
                                 max_seq_len=64, mamba_proj_bias=True, layer_types=["mamba", "full", "mamba"]),
                          **MAMBA, **extra})


def test_decoding_through_the_cache_equals_one_forward():
    """A prompt of 11 tokens (one and a partial chunk), then 6 tokens one at a time: the convolution history and the
    fp32 state carried in the cache give the logits of one forward over all 17."""
    torch.manual_seed(0)
    model = build_model(hybrid_config(), "cpu", seed=1).eval()
    x = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        whole = model(x)
        cache = KVCache(64)
        steps = [model(x[:, :11], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(11, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_packed_documents_are_refused():
    model = build_model(hybrid_config(), "cpu", seed=1)
    documents = torch.zeros(1, 8, dtype=torch.long)
    documents[:, 4:] = 1
    with pytest.raises(ValueError, match="Mamba-2 layer carries one state per sequence"):
        model(torch.zeros(1, 8, dtype=torch.long), keys=KeyMask(documents=documents))


@pytest.mark.parametrize("bad, message", [
    (dict(mamba_groups=3), "mamba_num_heads .4. must be a multiple of model.mamba_groups"),
    (dict(mamba_state_size=0), "mamba_state_size must be positive"),
    (dict(mamba_dt_floor=0.5, mamba_dt_ceiling=0.1), "mamba_dt_floor"),
    (dict(layer_types=["mamba", "mlp", "full"]), "'mlp' is a block with a feed_forward alone: set model.single_sublayer"),
    (dict(layer_types=["mamba", "mlp", "full"], single_sublayer=True, parallel_residual=True),
     "single_sublayer blocks hold one sublayer, model.parallel_residual sums two"),
])
def test_config_checks(bad, message):
    with pytest.raises(UsageError, match=message):
        hybrid_config(**bad).validate()


MAMBA_LAYERS = dict(model__num_layers=4, model__layer_types="[mamba, full, mamba, full]", model__mamba_num_heads=4,
                    model__mamba_head_dim=16, model__mamba_groups=2, model__mamba_state_size=8)


@pytest.mark.parametrize("settings, message", [
    (dict(parallel__tp=4, model__num_kv_heads=4), r"model\.mamba_groups \(2\) is not divisible by parallel\.tp \(4\)"),
    (dict(data__document_mask=True), r"mamba layers.*set data\.document_mask false"),
])
def test_what_mamba_layers_cannot_do_is_refused_by_the_config(tiny_config, settings, message):
    """Before any process group. (tests/test_parallel.py's deepnorm chain trains a Mamba-2 layer at tp2-sp and pp2.)"""
    with pytest.raises(UsageError, match=message):
        tiny_config(**MAMBA_LAYERS, **settings)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "output"])
def test_blocks_of_one_sublayer_equal_the_two_sublayer_block_split_in_two(placement):
    """model.single_sublayer: a block of both sublayers is its mixer step then its feed-forward step, so blocks
    [mamba, mlp, full, mlp] holding the weights of blocks [mamba, full] give the same logits in every topology where
    a sublayer's step depends on nothing else (not deepnorm, whose alpha counts the blocks; parallel is refused)."""
    both = build_model(hybrid_config(num_layers=2, layer_types=["mamba", "full"], norm_placement=placement), "cpu", seed=1)
    one = build_model(hybrid_config(num_layers=4, layer_types=["mamba", "mlp", "full", "mlp"], single_sublayer=True,
                                    norm_placement=placement), "cpu", seed=2)
    weights = {}
    for name, tensor in both.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers":  # layer j's mixer slots -> block 2j, its feed-forward slots -> block 2j + 1
            parts[1] = str(2 * int(parts[1]) + (not parts[2].startswith("attention")))
        weights[".".join(parts)] = tensor
    one.load_state_dict(weights)  # strict: every slot of the one-sublayer blocks is filled, none is left over
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(one(x), both(x), atol=0, rtol=0)
