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

Where Megatron's dropping still differs: with sequence parallelism megatron-core routes each tp rank's
sequence shard, so its capacity and its "earliest" are per shard of s / tp positions; we route the whole
sequence on every tp rank. megatron-core's expert-bias update counts the assignments kept (with
`moe_pad_expert_input_to_capacity`, every expert at capacity), ours the assignments routed (RouterStats.counts):
with the expert bias and tokens dropped, the bias moves differently (the reader refuses padding with the bias).
Padding without the bias adds tokens at weight 0 to each expert: the outputs and gradients are ours.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(assignments: int, experts: int, factor: float) -> int:
    """megatron-core's get_capacity(num_tokens=T * k, ...): the assignments one expert keeps."""
    return math.ceil((assignments / experts) * factor)


def drop_over_capacity(order: torch.Tensor, counts: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor,
                       batch: int, factor: float, policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The assignments each expert keeps.

    flat [T * k]: the expert of each assignment, token t's at t * k ... (tokens batch-major, [b, s] flattened);
    order [T * k]: the assignments sorted by expert (stable); counts [E]: assignments per expert;
    weights [T, k]: their router weights; batch: the b of [b, s].
    Returns (the kept part of `order`, in its order [N], kept counts [E], the number dropped).
    """
    capacity = expert_capacity(flat.numel(), counts.numel(), factor)
    top_k = weights.shape[-1]
    token = torch.arange(flat.numel(), device=flat.device) // top_k  # [T * k] batch-major token of each
    seq = weights.shape[0] // batch
    ranked = ((token % seq) * batch + token // seq).argsort(stable=True)  # earliest first, sequence-major
    if policy == "probs":  # the largest weight first; equal weights keep the order above
        ranked = ranked[weights.flatten()[ranked].argsort(descending=True, stable=True)]
    ranked = ranked[flat[ranked].argsort(stable=True)]  # [T * k] by expert, each expert's preferred first
    starts = counts.cumsum(0) - counts  # [E] first sorted position of each expert
    rank = torch.empty_like(flat).index_put_((ranked,), torch.arange(flat.numel(), device=flat.device))
    keep = (rank - starts[flat])[order] < capacity  # [T * k] each sorted assignment's place in its expert's queue
    return order[keep], counts.clamp(max=capacity), (~keep).sum()
