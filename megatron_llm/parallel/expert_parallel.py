"""The routed experts of every MoE layer split from outside: over the `ep` mesh dimension (E / ep experts per
rank) and over `tp` (a 1/tp slice of each expert's inner width per rank, Megatron's default expert tensor
parallelism).

The ep ranks are data-parallel ranks (ep divides dp; Megatron's and torchtitan's folding of experts into
data parallelism): each routes its own tokens, sends every row to the rank holding its expert and gets
the results back, by two all-to-alls per layer (functional collectives, so autograd runs them backwards).
The tp ranks of one ep rank route the same tokens (tensor_parallel.py's MoE plan) and hold slices of the same
experts: w1 and w3 column-split ([E / ep, ffn / tp, hidden]), w2 row-split ([E / ep, hidden, ffn / tp]), so each
returns a partial sum of every row's output, which the MoE plan completes after the router's weighting.
The rest of the model is unchanged; the MoE layer still sorts its rows by global expert and calls
`experts(rows, counts)`, and this module replaces that call on each MoE slot, keyed by the slot name
`feed_forward.experts` like the tensor-parallel plan. Each stacked weight becomes a DTensor over (ep, tp),
so checkpoints keep the full [E, ffn, hidden] tensors (a run at one layout resumes at another) and the
gradient norm counts each slice once.

Gradients: an expert's local gradient sums the contributions of the tokens of its whole ep group. Data
parallelism averages the other parameters over all dp ranks but the experts only over the dp / ep ranks
that hold the same experts (`edp`), so the expert gradient is divided by ep here: both are then the
gradient of the same global token mean. The rows' gradient from a slice is partial: the MoE plan sums it over
tp on the row sort's input (tensor_parallel.py), [T, hidden] rather than the [T * k, hidden] rows here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from megatron_llm.model.moe import EXPERT_PARAMS, expert_mlp
from megatron_llm.parallel.tensor_parallel import grad_summed_over

EXPERTS = "feed_forward.experts"  # the slot expert parallelism splits


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The stacked-expert modules of the blocks this model (or pipeline stage) holds, multi-token prediction's too."""
    found = []
    for block in model.blocks():
        try:
            found.append(block.get_submodule(EXPERTS))
        except AttributeError:  # a dense layer: its feed_forward has no experts
            continue
    return found


def split_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """Keeps this rank's slices of its E / ep experts of each MoE layer (the values every rank initialised
    alike, so no communication) and routes rows to them. `mesh` has the dims that split them, "ep", "tp" or
    both (ParallelDims.experts_mesh)."""
    names = mesh.mesh_dim_names
    ep_mesh = mesh["ep"] if "ep" in names else None
    for experts in expert_modules(model):
        # The biases (model.moe_ffn_bias, gpt-oss) split with their experts along E, w1's and w3's along the inner
        # width like their rows; w2's is whole on every tp rank (_sliced_forward adds it once in all).
        for name, ffn_dim in zip(EXPERT_PARAMS, (1, 2, 1, 1, None, 1)):
            weight = getattr(experts, name)
            if weight is not None:
                placements = [Shard(0) if dim == "ep" else Replicate() if ffn_dim is None else Shard(ffn_dim) for dim in names]
                local = distribute_tensor(weight.detach(), mesh, placements, src_data_rank=None)
                setattr(experts, name, nn.Parameter(local))  # [E/ep, ffn/tp, ...] here, [E, ffn, ...] saved
        experts.forward = _sliced_forward(experts, ep_mesh, mesh["tp"] if "tp" in names else None)


def _sliced_forward(experts: nn.Module, ep_mesh: Optional[DeviceMesh], tp_mesh: Optional[DeviceMesh]):
    ep = ep_mesh.size() if ep_mesh is not None else 1

    def forward(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, hidden] sorted by global expert, counts [E] -> their outputs [N, hidden], same order (this
        rank's partial sums under tp)."""
        weights = [_local_grad_over(getattr(experts, n), ep) for n in EXPERT_PARAMS]
        if tp_mesh is not None and weights[4] is not None:
            # w2's bias goes into each tp rank's partial sum: 1/tp of it in each adds it once. Its gradient there
            # is 1/tp of the whole (every rank gets the output's whole gradient), so the backward sums it over tp.
            weights[4] = grad_summed_over(weights[4], tp_mesh) / tp_mesh.size()
        if ep_mesh is None:
            return expert_mlp(rows, counts, weights, experts.act, experts.up_act)
        return _dispatch(rows, counts, weights, experts, ep_mesh.get_group(), ep)

    return forward


def _dispatch(rows: torch.Tensor, counts: torch.Tensor, weights: list, experts: nn.Module, group: dist.ProcessGroup,
              ep: int):
    """Each row to the ep rank holding its expert, through this rank's experts, and back."""
    local_experts = counts.numel() // ep
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # [ep * E/ep]: each source's rows per expert of mine
    received = received.view(ep, local_experts)  # [source, local expert]
    send = counts.view(ep, local_experts).sum(1).tolist()  # rows to each rank
    recv = received.sum(1).tolist()
    mine = all_to_all_single_autograd(rows, recv, send, group)  # [M, hidden]: by source, then expert
    expert_of_row = torch.arange(local_experts, device=rows.device).repeat(ep).repeat_interleave(received.flatten())
    order = expert_of_row.argsort(stable=True)  # by local expert, sources in rank order within one
    out = expert_mlp(mine[order], received.sum(0), weights, experts.act, experts.up_act)
    back = torch.empty_like(out).index_copy(0, order, out)  # by source again
    return all_to_all_single_autograd(back, send, recv, group)  # [N, hidden]


def _local_grad_over(weight, ep: int):
    """This rank's expert slices as a plain tensor whose gradient is divided by ep (see the module docstring)."""
    if weight is None:
        return None
    local = weight.to_local()
    if local.requires_grad and ep > 1:
        local.register_hook(lambda grad: grad / ep)
    return local
