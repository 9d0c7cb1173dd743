"""Expert parallelism: the E experts of every MoE layer split over the `ep` mesh dimension, E / ep per rank.

The ep ranks are data-parallel ranks (ep divides dp; Megatron's and torchtitan's folding of experts into
data parallelism): each routes its own tokens, sends every row to the rank holding its expert and gets
the results back, by two all-to-alls per layer (functional collectives, so autograd runs them backwards).
The rest of the model is unchanged; the MoE layer still sorts its rows by global expert and calls
`experts(rows, counts)`, and this module replaces that call on each MoE slot, keyed by the slot name
`feed_forward.experts` like the tensor-parallel plan. Each stacked weight becomes a DTensor sharded on
dim 0 over ep, so checkpoints keep the full [E, ...] tensors (a run at ep 2 resumes at ep 1) and the
gradient norm counts each expert once.

Gradients: an expert's local gradient sums the contributions of the tokens of its whole ep group. Data
parallelism averages the other parameters over all dp ranks but the experts only over the dp / ep ranks
that hold the same experts (`edp`), so the expert gradient is divided by ep here: both are then the
gradient of the same global token mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from megatron_llm.model.moe import expert_mlp

EXPERTS = "feed_forward.experts"  # the slot expert parallelism splits


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The stacked-expert modules of the blocks this model (or pipeline stage) holds."""
    found = []
    for block in model.layers.values():
        try:
            found.append(block.get_submodule(EXPERTS))
        except AttributeError:  # a dense layer: its feed_forward has no experts
            continue
    return found


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Keeps this rank's E / ep experts of each MoE layer (the values every rank initialised alike, so no
    communication) and routes rows to their experts' ranks."""
    group, ep = ep_mesh.get_group(), ep_mesh.size()
    for experts in expert_modules(model):
        for name in ("w1", "w2", "w3"):
            weight = getattr(experts, name)
            if weight is not None:
                local = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
                setattr(experts, name, nn.Parameter(local))  # [E / ep, ...] here, [E, ...] to checkpoints
        experts.forward = _dispatching_forward(experts, group, ep)


def _dispatching_forward(experts: nn.Module, group: dist.ProcessGroup, ep: int):
    def forward(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, hidden] sorted by global expert, counts [E] -> their outputs [N, hidden], same order."""
        local_experts = counts.numel() // ep
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)  # [ep * E/ep]: each source's rows per expert of mine
        received = received.view(ep, local_experts)  # [source, local expert]
        send = counts.view(ep, local_experts).sum(1).tolist()  # rows to each rank
        recv = received.sum(1).tolist()
        mine = all_to_all_single_autograd(rows, recv, send, group)  # [M, hidden]: by source, then expert
        expert_of_row = torch.arange(local_experts, device=rows.device).repeat(ep).repeat_interleave(received.flatten())
        order = expert_of_row.argsort(stable=True)  # by local expert, sources in rank order within one
        weights = [_local_grad_over(getattr(experts, n), ep) for n in ("w1", "w2", "w3")]
        out = expert_mlp(mine[order], received.sum(0), *weights, experts.act)
        back = torch.empty_like(out).index_copy(0, order, out)  # by source again
        return all_to_all_single_autograd(back, send, recv, group)  # [N, hidden]

    return forward


def _local_grad_over(weight, ep: int):
    """This rank's experts as a plain tensor whose gradient is divided by ep (see the module docstring)."""
    if weight is None:
        return None
    local = weight.to_local()
    if local.requires_grad:
        local.register_hook(lambda grad: grad / ep)
    return local
