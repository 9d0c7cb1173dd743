"""Capacity dropping (model/moe_capacity.py) against megatron-core 0.16 itself: the assignments each expert
keeps equal apply_router_token_dropping's final_map and its TopKRouter's routing map (built from the args our
Megatron writer saves), for both drop policies; the MoE output equals a hand computation over megatron-core's
kept assignments; the policy is a checked config field. With model.moe_capacity_sequence_shards = tp the kept
assignments are those megatron-core keeps when each tp rank routes its own sequence shard (sequence parallelism)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.checkpoint.megatron import Layout, megatron_args
from megatron_llm.config import config_from_dict
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model.moe_capacity import drop_over_capacity
from megatron_llm.model_config import ModelConfig

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

E, B, S, HIDDEN = 8, 2, 16, 32
# (score, top_k, renormalise, routed scale, capacity factor): each router megatron-core expresses, dropping
CASES = [("softmax", 2, True, 1.0, 1.0), ("softmax", 1, False, 1.0, 0.5),
         ("sigmoid", 2, True, 2.5, 0.5), ("sigmoid", 1, False, 1.0, 1.0)]
IDS = ["softmax-top2-cf1", "pre-softmax-top1-cf0.5", "sigmoid-top2-scaled-cf0.5", "sigmoid-top1-cf1"]


def moe_layer(score: str, top_k: int, renormalize: bool, scale: float, factor: float, policy: str, shards: int = 1,
              expert_bias: bool = False):
    cfg = ModelConfig(vocab_size=64, hidden_size=HIDDEN, num_layers=1, num_heads=4, ffn_hidden_size=48, max_seq_len=S,
                      moe_experts=E, moe_top_k=top_k, moe_ffn_hidden_size=16, moe_score=score,
                      moe_renormalize=renormalize, moe_routed_scale=scale, moe_capacity_factor=factor,
                      moe_token_drop_policy=policy, moe_capacity_sequence_shards=shards, moe_expert_bias=expert_bias)
    cfg.validate()
    moe = build_model(cfg, "cpu", seed=0).layers["0"].feed_forward
    with torch.no_grad():
        moe.router.weight.normal_(generator=torch.Generator().manual_seed(1))  # spread routing: experts overflow
    return cfg, moe


def cuda_topk(input, k, dim=-1, largest=True, sorted=True):
    """torch.topk as CUDA breaks ties (gatherTopK keeps the equal values "first seen", by index); torch's CPU
    topk keeps an arbitrary set of equal values, so megatron-core's "position" policy needs this to be the
    policy Megatron runs on GPUs."""
    values, indices = input.sort(dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def with_cuda_ties(policy: str):
    return contextlib.nullcontext() if policy == "probs" else _patched_topk()


@contextlib.contextmanager
def _patched_topk():
    saved = torch.topk
    torch.topk = cuda_topk
    try:
        yield
    finally:
        torch.topk = saved


def sequence_major(t: torch.Tensor, tp: int = 1, rank: int = 0) -> torch.Tensor:
    """[B * S, ...] batch-major rows (ours) -> tp rank `rank`'s sequence shard, positions rank * S / tp ...,
    sequence-major (megatron-core's [s / tp, b] flattened under sequence parallelism; all of [s, b] at tp 1)."""
    s = S // tp
    return t.view(B, S, *t.shape[1:])[:, rank * s:(rank + 1) * s].transpose(0, 1).reshape(s * B, *t.shape[1:])


def back_to_batch_major(*shards: torch.Tensor) -> torch.Tensor:
    """The tp ranks' sequence-major shards [S / tp * B, ...] -> [B * S, ...] batch-major (the inverse of the above)."""
    t = torch.cat([shard.view(-1, B, *shard.shape[1:]) for shard in shards])  # [S, B, ...]
    return t.transpose(0, 1).reshape(B * S, *t.shape[2:])


def ours_kept(moe, x: torch.Tensor):
    """(routed map [T, E], router weights scattered [T, E], kept map [T, E], dropped count) of our layer."""
    indices, weights, _, _ = moe.router(x.view(-1, HIDDEN))
    flat = indices.flatten()
    order, counts = flat.argsort(stable=True), torch.bincount(flat, minlength=E)
    kept, kept_counts, dropped = drop_over_capacity(order, counts, flat, weights, B, moe.capacity_factor, moe.drop_policy,
                                                    moe.drop_shards)
    routed = torch.zeros(B * S, E, dtype=torch.bool).scatter_(1, indices, True)
    keep = torch.zeros_like(routed)
    keep[kept // indices.shape[1], flat[kept]] = True
    assert torch.equal(kept_counts, keep.sum(0)) and torch.equal(flat[kept].diff() >= 0, torch.ones(len(kept) - 1, dtype=torch.bool))
    return routed, torch.zeros(B * S, E).scatter_(1, indices, weights.detach()), keep, dropped


@pytest.mark.parametrize("pad", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kept_assignments_equal_megatron_core_token_dropping(case, policy, pad):
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    cfg, moe = moe_layer(*case, policy)
    x = torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        routed, probs, keep, dropped = ours_kept(moe, x)
    with with_cuda_ties(policy):
        _, final = apply_router_token_dropping(sequence_major(probs), sequence_major(routed), cfg.moe_top_k,
                                               cfg.moe_capacity_factor, drop_policy=policy, pad_to_capacity=pad)
    theirs = back_to_batch_major(final) & routed  # padding adds unrouted tokens at weight 0
    assert torch.equal(keep, theirs)
    assert dropped == routed.sum() - keep.sum() > 0


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sequence_shards_keep_what_megatron_core_keeps_on_each_tp_ranks_shard(case, policy, tp):
    """Under sequence parallelism each tp rank routes its own S / tp positions: megatron-core's
    apply_router_token_dropping on each rank's shard keeps what ours keeps at moe_capacity_sequence_shards = tp,
    with assignments dropped in every shard; over the whole sequence (shards 1) ours keeps another set."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    cfg, moe = moe_layer(*case, policy, shards=tp)
    x = torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        routed, probs, keep, dropped = ours_kept(moe, x)
        moe.drop_shards = 1
        whole = ours_kept(moe, x)[2]
    with with_cuda_ties(policy):
        finals = [apply_router_token_dropping(sequence_major(probs, tp, rank), sequence_major(routed, tp, rank),
                                              cfg.moe_top_k, cfg.moe_capacity_factor, drop_policy=policy)[1]
                  for rank in range(tp)]
    assert torch.equal(keep, back_to_batch_major(*finals))
    lost = (routed & ~keep).view(B, tp, S // tp, E).sum((0, 2, 3))  # [tp] assignments dropped per shard
    assert (lost > 0).all() and dropped == lost.sum()
    assert not torch.equal(whole, keep)


def test_a_sequence_the_shards_do_not_divide_drops_as_one_shard():
    """A forward of another length (a prompt, a one-token decode step) drops over its whole sequence."""
    _, moe = moe_layer(*CASES[0], "probs", shards=2)
    x = torch.randn(B, S - 1, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        split, dropped = moe(x), moe.stats.dropped
        moe.drop_shards = 1
        whole = moe(x)
    assert torch.equal(split, whole) and dropped == moe.stats.dropped > 0


@pytest.mark.parametrize("settings, message", [
    (dict(model__moe_capacity_sequence_shards=0), r"model\.moe_capacity_sequence_shards must be positive, got 0"),
    (dict(model__moe_capacity_sequence_shards=2, model__moe_capacity_factor=None),
     r"model\.moe_capacity_sequence_shards splits token dropping: set model\.moe_capacity_factor"),
    (dict(model__moe_capacity_sequence_shards=3),
     r"model\.moe_capacity_sequence_shards \(3\) .* must divide data\.seq_len \(32\)"),
])
def test_sequence_shards_are_checked_by_the_config(tiny_config, tmp_path, settings, message):
    with pytest.raises(UsageError, match=message):
        tiny_config(tmp_path, **{"model__moe_experts": 4, "model__moe_capacity_factor": 1.0, **settings})
    assert tiny_config(tmp_path, model__moe_experts=4, model__moe_capacity_factor=1.0,
                       model__moe_capacity_sequence_shards=4).model.moe_capacity_sequence_shards == 4


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_megatron_core_router_keeps_what_we_keep_and_the_output_is_their_kept_sum(mcore, case, policy, tp):
    """megatron-core's TopKRouter, configured by the args our Megatron writer saves (policy included), keeps
    our assignments with our weights; our MoE output is the sum over ITS kept assignments computed by hand.
    At tp 2 the router runs on each tp rank's sequence shard (sequence parallelism), ours with 2 shards."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    cfg, moe = moe_layer(*case, policy, shards=tp)
    args = megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")
    assert (args.moe_token_drop_policy, args.moe_expert_capacity_factor) == (policy, cfg.moe_capacity_factor)
    with mcore.patched([mcore.CPU_DEVICE]):
        router = TopKRouter(mcore.transformer_config_from_args(args), ProcessGroupCollection.use_mpu_process_groups())
    router.weight.data.copy_(moe.router.weight.data)
    x = torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(2))
    s = S // tp
    with torch.no_grad(), mcore.forward_on_cpu(), with_cuda_ties(policy):
        # megatron-core runs [s, b, hidden]: each tp rank its positions rank * s ...
        probs, final = zip(*(router(x[:, rank * s:(rank + 1) * s].transpose(0, 1).contiguous()) for rank in range(tp)))
        routed, weights, keep, dropped = ours_kept(moe, x)
        out = moe(x)
    final, probs = back_to_batch_major(*final), back_to_batch_major(*probs)
    assert torch.equal(keep, final) and dropped > 0
    torch.testing.assert_close(probs, weights * keep, atol=1e-6, rtol=1e-6)
    ex, tokens = moe.experts, x.view(-1, HIDDEN)
    by_hand = torch.stack([  # each token: its kept experts' MLPs weighted by their router weights
        sum((probs[t, e] * (ex.w2[e] @ (F.silu(ex.w1[e] @ tokens[t]) * (ex.w3[e] @ tokens[t])))
             for e in final[t].nonzero().flatten().tolist()), torch.zeros(HIDDEN)) for t in range(B * S)])
    torch.testing.assert_close(out.view(-1, HIDDEN), by_hand.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_expert_bias_counts_what_megatron_core_counts(mcore, policy):
    """megatron-core's TopKRouter moves its expert bias by its routing map after dropping (local_tokens_per_expert,
    while training): our RouterStats.kept, which the bias update takes; the routed counts differ from it."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    cfg, moe = moe_layer("sigmoid", 2, True, 2.5, 0.5, policy, expert_bias=True)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.1)
    args = megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")
    with mcore.patched([mcore.CPU_DEVICE]):
        router = TopKRouter(mcore.transformer_config_from_args(args), ProcessGroupCollection.use_mpu_process_groups())
    router.weight.data.copy_(moe.router.weight.data)
    router.expert_bias.copy_(moe.router.expert_bias)
    x = torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(2))
    with mcore.forward_on_cpu(), with_cuda_ties(policy):
        router(x.transpose(0, 1).contiguous())
        moe(x)
    assert torch.equal(moe.stats.kept, router.local_tokens_per_expert.float())
    assert moe.stats.dropped > 0 and not torch.equal(moe.stats.kept, moe.stats.counts)


def test_drop_policy_is_a_checked_config_field():
    with pytest.raises(UsageError, match=r"model\.moe_token_drop_policy: 'first' is not one of \{position,probs\}"):
        config_from_dict({"model": {"moe_token_drop_policy": "first"}})
