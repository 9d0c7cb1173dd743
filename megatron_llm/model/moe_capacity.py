"""Token dropping at an expert's capacity, as megatron-core 0.16's `apply_router_token_dropping` drops.

capacity = ceil((T * k / E) * factor) assignments per expert (`get_capacity`, the same float expression),
for T tokens routed to k of E experts each. Past it an expert keeps, by `model.moe_token_drop_policy`:
- "probs" (megatron-core's default): the assignments with the largest router weights, the weights the
  expert outputs are summed with (after renormalisation and the routed scale: megatron-core's routing_probs);
- "position": the earliest tokens.

Ties and token order. megatron-core routes [s, b] activations flattened sequence-first, and picks each
expert's kept tokens by `torch.topk(..., dim=0, sorted=False)`: over router weights ("probs") or over the
0/1 routing map ("position", where every candidate ties). On CUDA, where Megatron runs, torch's topk keeps
the equal values it needs "first seen", by index (aten/src/ATen/native/cuda/TensorTopK.cu, gatherTopK): the
earliest tokens in that sequence-first order. So both policies here break ties by (position in the sequence,
then sequence in the batch). On CPU torch's topk keeps no such set: over a 0/1 column it returned e.g. tokens
[7, 8, 9] of [0, 1, 2, 3, 6, 7, ...] for capacity 3 (torch 2.13, introselect), so megatron-core's "position"
on CPU drops arbitrary (deterministic) tokens; its "probs" agrees with us wherever the weights are distinct.

Sequence parallelism. megatron-core routes each tp rank's sequence shard ([s / tp, b, h]) on its own
(TopKRouter.routing on the local tokens; it warns without sequence parallelism at tp > 1 with ep > 1), so a
Megatron run at tp > 1 with sp drops per shard: capacity expert_capacity(s / tp * b * k, E, factor) and
"earliest" within the shard. `model.moe_capacity_sequence_shards` (n) reproduces it as a property of the
model, not of our layout (our MoE routes the whole sequence on every tp rank): n equal contiguous pieces of
the sequence, each with its own capacity and its own queue per expert, so one process at n equals our
tp2 + sp at n; a forward whose sequence n does not divide (a prompt, a decode step) is one piece. The
Megatron reader sets n to the checkpoint's tp when it has a capacity factor and sequence_parallel; the writer
writes sequence_parallel when n is the tp written, and otherwise prints a one-line note, since a Megatron run
continued at that tp drops per tp shard with sp and over the whole sequence without.

The expert bias moves by the assignments each expert kept (RouterStats.kept), as megatron-core's TopKRouter
counts its routing map after dropping; its load-balancing loss, like ours, counts the assignments routed.
`moe_pad_expert_input_to_capacity` adds to each expert's input, up to its capacity, tokens at weight 0: the
outputs and gradients are ours, but megatron-core's bias then counts every expert at capacity, which we do not
model (the Megatron reader refuses padding with the bias).
"""

from __future__ import annotations

import math

import torch


def expert_capacity(assignments: int, experts: int, factor: float) -> int:
    """megatron-core's get_capacity(num_tokens=T * k, ...): the assignments one expert keeps."""
    return math.ceil((assignments / experts) * factor)


def drop_over_capacity(order: torch.Tensor, counts: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor,
                       batch: int, factor: float, policy: str,
                       shards: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The assignments each expert keeps, decided in each of `shards` equal contiguous pieces of the sequence.

    flat [T * k]: the expert of each assignment, token t's at t * k ... (tokens batch-major, [b, s] flattened);
    order [T * k]: the assignments sorted by expert (stable); counts [E]: assignments per expert;
    weights [T, k]: their router weights; batch: the b of [b, s].
    Returns (the kept part of `order`, in its order [N], kept counts [E], the number dropped).
    """
    top_k, experts = weights.shape[-1], counts.numel()
    seq = weights.shape[0] // batch
    # A sequence the shards do not divide (an inference prompt, a one-token decode step) is one shard: only the
    # training sequence (data.seq_len, checked by the config) is the one Megatron's tp ranks split.
    shards = shards if seq % shards == 0 else 1
    capacity = expert_capacity(flat.numel() // shards, experts, factor)
    token = torch.arange(flat.numel(), device=flat.device) // top_k  # [T * k] batch-major token of each
    position = token % seq
    ranked = (position * batch + token // seq).argsort(stable=True)  # earliest first, sequence-major
    if policy == "probs":  # the largest weight first; equal weights keep the order above
        ranked = ranked[weights.flatten()[ranked].argsort(descending=True, stable=True)]
    if shards == 1:  # one queue per expert
        queue, sizes = flat, counts
    else:  # [T * k] each assignment's (expert, shard) queue, [E * shards] their sizes
        queue = flat * shards + position // (seq // shards)
        sizes = torch.bincount(queue, minlength=experts * shards)
    ranked = ranked[queue[ranked].argsort(stable=True)]  # [T * k] by queue, each queue's preferred first
    starts = sizes.cumsum(0) - sizes  # first sorted position of each queue
    rank = torch.empty_like(flat).index_put_((ranked,), torch.arange(flat.numel(), device=flat.device))
    keep = (rank - starts[queue])[order] < capacity  # [T * k] each sorted assignment's place in its queue
    return order[keep], sizes.clamp(max=capacity).view(experts, shards).sum(1), (~keep).sum()
