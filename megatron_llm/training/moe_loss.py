"""The mixture-of-experts losses and statistics, from the router statistics each MoE layer leaves on
itself in its forward (model/moe.py): the model computes no loss; this module adds them to the step.

Load balancing (Switch Transformer, eqs. 4-6, as transformers' load_balancing_loss_func computes it, so a
family's training loss equals transformers' with output_router_logits): over the tokens of all MoE layers
of one forward together, with f_e the share of assignments to expert e (k per token) and P_e its mean
router probability,  aux = E * sum_e f_e * P_e  (1 when balanced, up to E). Router z-loss (ST-MoE): the
mean over those tokens of logsumexp(router logits)^2. Each micro-batch adds coefficient x loss / the
micro-batch count, so the gradient is the mean over micro-batches and (through data parallelism's
gradient average) over ranks.
"""

from __future__ import annotations

import re
import weakref
from typing import Optional

import torch
from torch import nn

from megatron_llm.model.moe import MoE, RouterStats
from megatron_llm.model_config import ModelConfig
from megatron_llm.parallel import ParallelDims, all_reduce_sum


class RouterCollector:
    """Forward hooks on a model's MoE layers (installed once per model): the statistics of each forward,
    kept until the micro-batch's loss takes them, and the step's assignments per expert per layer.
    A layer's forward run again in the backward (activation checkpointing) is not counted twice, and
    only the last m forwards of a layer in a step of m micro-batches count: a pipeline schedule runs one
    more first, on placeholder inputs, to infer its stages' shapes."""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        self.cfg = cfg
        self.moe_layers = [i for i in range(cfg.num_layers) if cfg.layer(i).moe]  # of the whole model
        self.device = next(model.parameters()).device
        self.reset()
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                module.register_forward_hook(self._hook(_layer_of(name)))

    def reset(self) -> None:
        """Forgets everything: called at the start and the end of each training step (evaluation's forwards
        and a pipeline's earlier stages, whose statistics no loss takes, leave theirs here)."""
        self.fresh: list[RouterStats] = []
        # per MoE layer, each forward's [assignments per expert..., dropped assignments], in order
        self.forwards: list[list[torch.Tensor]] = [[] for _ in self.moe_layers]
        self.sums = torch.zeros(3, device=self.device)  # [aux losses, z-losses, losses taken]

    def _hook(self, layer: int):
        row = self.moe_layers.index(layer)

        def hook(module: MoE, args, output) -> None:
            if torch._C._current_graph_task_id() != -1:  # a recomputation inside the backward
                return
            self.fresh.append(module.stats)
            self.forwards[row].append(torch.cat([module.stats.counts, module.stats.dropped.view(1).float()]))

        return hook

    def take_loss(self) -> Optional[torch.Tensor]:
        """coeff-weighted aux + z-loss of the forwards since the last call (one micro-batch through every
        MoE layer this rank holds), or None when there were none."""
        stats, self.fresh = self.fresh, []
        if not stats:
            return None
        aux, z = router_losses(stats, self.cfg.moe_experts)
        self.sums[:3] += torch.stack([aux.detach(), z.detach(), torch.ones_like(z)])
        return self.cfg.moe_aux_loss_coeff * aux + self.cfg.moe_z_loss_coeff * z

    def finish_step(self, model: nn.Module, dims: ParallelDims, micro_batches: int, updated: bool) -> dict[str, float]:
        """Sums the step's statistics over data-parallel ranks and pipeline stages, moves the expert biases
        (aux-loss-free balancing) when the optimizer `updated` the weights, and returns the scalars to log;
        resets for the next step."""
        counts = torch.zeros(len(self.moe_layers), self.cfg.moe_experts + 1, device=self.device)  # + dropped
        for row, forwards in enumerate(self.forwards):  # empty for the layers of other pipeline stages
            for c in forwards[-micro_batches:]:
                counts[row] += c
        counts = all_reduce_sum(counts, dims, over_stages=True).cpu()
        load, sums = counts[:, :-1], all_reduce_sum(self.sums, dims, over_stages=True).cpu()  # load [MoE layers, E]
        if self.cfg.moe_expert_bias and updated:
            update_expert_bias(model, self.moe_layers, load, self.cfg.moe_bias_update_rate)
        scalars = {"moe_dropped": counts[:, -1].sum().item()}
        if sums[2] > 0:
            scalars.update(moe_aux_loss=(sums[0] / sums[2]).item(), moe_z_loss=(sums[1] / sums[2]).item())
        for row, layer in enumerate(self.moe_layers):
            share = load[row] / load[row].sum().clamp(min=1)
            scalars.update({f"expert_load/layer{layer}/expert{e}": v for e, v in enumerate(share.tolist())})
        self.reset()
        return scalars


def router_losses(stats: list[RouterStats], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, router z-loss) over the tokens of these forwards taken together (see the
    module docstring)."""
    rows = sum(s.tokens for s in stats)
    counts = torch.stack([s.counts for s in stats]).sum(0)  # [E]
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)  # [E]
    aux = num_experts * ((counts / rows) * (probs / rows)).sum()
    z = torch.stack([s.z_sum for s in stats]).sum() / rows
    return aux, z


@torch.no_grad()
def update_expert_bias(model: nn.Module, moe_layers: list[int], load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: each expert's bias moves by `rate` towards balance, up when
    it got fewer assignments than the mean, down when more. `load` [MoE layers, E] is global, so every
    rank holding a layer moves its bias the same way."""
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.router.expert_bias is not None:
            row = load[moe_layers.index(_layer_of(name))]
            module.router.expert_bias += rate * torch.sign(row.mean() - row).to(module.router.expert_bias.device)


def _layer_of(name: str) -> int:
    """'layers.3.feed_forward' -> 3 (module names keep the global layer index in every layout)."""
    return int(re.search(r"layers\.(\d+)\.", name + ".").group(1))


_COLLECTORS: "weakref.WeakKeyDictionary[nn.Module, RouterCollector]" = weakref.WeakKeyDictionary()


def router_collector(model: nn.Module) -> Optional[RouterCollector]:
    """The model's collector (created on first use), or None for a model without MoE layers."""
    cfg = model.cfg
    if not any(cfg.layer(i).moe for i in range(cfg.num_layers)):
        return None
    if model not in _COLLECTORS:
        _COLLECTORS[model] = RouterCollector(model, cfg)
    return _COLLECTORS[model]
