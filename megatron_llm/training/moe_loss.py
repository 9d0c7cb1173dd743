"""The mixture-of-experts losses and statistics, from the router statistics each MoE layer leaves on
itself in its forward (model/moe.py): the model computes no loss; this module adds them to the step.

Load balancing (Switch Transformer, eqs. 4-6): with f_e the share of assignments to expert e and P_e its
mean router probability, aux = E * sum_e f_e * P_e. Router z-loss (ST-MoE): the mean of
logsumexp(router logits)^2. Three scopes (model.moe_aux_loss_scope):
- model: transformers' load_balancing_loss_func, so a family's training loss equals transformers' with
  output_router_logits: one loss over the tokens of all MoE layers of a forward together, f summing to
  top_k (k when balanced). It is added to the micro-batch's loss, so it needs every layer on one rank.
- layer: Megatron's, one loss per layer, f summing to 1 (1 when balanced), summed over the layers and
  logged as their mean. Each layer's loss reaches the gradients through an identity on the layer's output
  whose backward adds the loss's gradient (Megatron's MoEAuxLossAutoScaler), so no loss crosses a pipeline
  stage. Both losses are linear in the router's probability and z sums once f is fixed (f carries no
  gradient), so that gradient is a constant of the forward and nothing is saved for the backward: a
  recomputing (activation-checkpointed) block sees the same saved tensors as the first forward.
- sequence: Megatron's seq_aux_loss (DeepSeek-V3's complementary sequence-wise balance loss): the layer
  scope's loss per sequence, f and P over that sequence's tokens, averaged over the micro-batch's
  sequences (MoE leaves per-sequence sums); the z-loss stays per layer. With b sequences of s tokens the
  mean of E * sum_e f_be * prob_sum_be / s over b is E * sum f_be * prob_sum_be / (b s): the layer scope's
  gradient with f per sequence. At b = 1 it is the layer scope.
In every scope f counts each token's k best unbiased scores over all experts (RouterStats.balance_counts),
as megatron-core and transformers do: the expert bias and group limits move the choice, not f.
Each micro-batch adds coefficient x loss / the micro-batch count, so the gradient is the mean over
micro-batches and (through data parallelism's gradient average) over ranks.

f is over this rank's micro-batch, or with model.moe_aux_loss_global over the global micro-batch: the
assignment counts summed over the data-parallel ranks (the ranks that route different tokens; tensor-
parallel ranks route the same ones). P and z stay this rank's means, so, the ranks' token counts being
equal, the mean over ranks of each rank's loss is the loss of the union of their micro-batches: what one
process computes on that micro-batch.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megatron_llm.model.moe import MoE, RouterStats
from megatron_llm.model_config import ModelConfig
from megatron_llm.parallel import ParallelDims, all_reduce_sum


@dataclass
class Routed:
    """One MoE layer's forward as its losses see it."""

    stats: RouterStats
    counts: torch.Tensor  # [G, E] assignments per balancing group: this rank's, or the global micro-batch's
    tokens: int  # the tokens of one group those counts are over


class RouterCollector:
    """Forward hooks on a model's MoE layers (installed once per model): the statistics of each forward,
    kept until the micro-batch's loss takes them (model scope) or turned into the layer's loss at once
    (layer scope), and the step's assignments per expert per layer. A layer's forward run again in the
    backward (activation checkpointing) is not counted twice, and only the last m forwards of a layer in
    a step of m micro-batches count: a pipeline schedule runs one more first, on placeholder inputs, to
    infer its stages' shapes."""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        self.cfg = cfg
        self.moe_layers = moe_layers(cfg)  # of the whole model
        self.device = next(model.parameters()).device
        self.dims: Optional[ParallelDims] = None  # set by start_step: whom global counts are summed over
        self.micro_batches = 1
        self.reset()
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                module.register_forward_hook(self._hook(_layer_of(name, cfg)))

    def start_step(self, dims: ParallelDims, micro_batches: int) -> None:
        self.dims, self.micro_batches = dims, micro_batches
        self.reset()

    def reset(self) -> None:
        """Forgets everything: called at the start and the end of each training step (evaluation's forwards
        and a pipeline's earlier stages, whose statistics no loss takes, leave theirs here)."""
        self.fresh: list[Routed] = []
        # per MoE layer, each forward's [assignments per expert..., kept per expert..., dropped, aux, z], in order
        self.forwards: list[list[torch.Tensor]] = [[] for _ in self.moe_layers]
        self.sums = torch.zeros(3, device=self.device)  # [aux losses, z-losses, losses taken]

    def _hook(self, layer: int):
        row = self.moe_layers.index(layer)

        def hook(module: MoE, args, output) -> Optional[torch.Tensor]:
            if torch._C._current_graph_task_id() != -1:  # a recomputation inside the backward
                return None
            stats = module.stats
            record = [stats.counts, stats.kept, stats.dropped.view(1).float()]
            attached = None
            if torch.is_grad_enabled():  # training: evaluation needs no loss (nor a collective)
                routed = self._routed(stats)
                if self.cfg.moe_aux_loss_scope == "model":
                    self.fresh.append(routed)
                else:
                    aux, z, attached = self._layer_loss(routed, output)
                    record.append(torch.stack([aux, z]))
            self.forwards[row].append(torch.cat(record))
            return attached

        return hook

    def _routed(self, stats: RouterStats) -> Routed:
        """The forward's statistics with its balancing counts: summed over the data-parallel ranks (detached)
        under model.moe_aux_loss_global."""
        dims, counts = self.dims, stats.balance_counts
        tokens = stats.tokens // counts.shape[0]  # per sequence under the sequence scope (never global: config)
        if not self.cfg.moe_aux_loss_global or dims is None or dims.dp == 1:
            return Routed(stats, counts, tokens)
        return Routed(stats, all_reduce_sum(counts.clone(), dims), tokens * dims.dp)

    def _layer_loss(self, routed: Routed, output: torch.Tensor):
        """(aux, z) of one layer (layer and sequence scopes), and the layer's output carrying their gradient."""
        stats, cfg = routed.stats, self.cfg
        f = routed.counts / (routed.tokens * cfg.moe_top_k)  # [G, E], each group's summing to 1
        d_aux = cfg.moe_experts * f / stats.tokens  # d aux / d prob_sum (the module docstring)
        aux, z = (d_aux * stats.prob_sum.detach()).sum(), stats.z_sum.detach() / stats.tokens
        scale = 1.0 / self.micro_batches
        grads = (cfg.moe_aux_loss_coeff * scale * d_aux, torch.full_like(z, cfg.moe_z_loss_coeff * scale / stats.tokens))
        return aux, z, AddLossGradient.apply(output, stats.prob_sum, stats.z_sum, *grads)

    def take_loss(self) -> Optional[torch.Tensor]:
        """Model scope: coeff-weighted aux + z-loss of the forwards since the last call (one micro-batch
        through every MoE layer this rank holds), or None when there were none."""
        routed, self.fresh = self.fresh, []
        if not routed:
            return None
        aux, z = router_losses(routed, self.cfg.moe_experts)
        self.sums[:3] += torch.stack([aux.detach(), z.detach(), torch.ones_like(z)])
        return self.cfg.moe_aux_loss_coeff * aux + self.cfg.moe_z_loss_coeff * z

    def finish_step(self, model: nn.Module, dims: ParallelDims, micro_batches: int, updated: bool) -> dict[str, float]:
        """Sums the step's statistics over data-parallel ranks and pipeline stages, moves the expert biases
        (aux-loss-free balancing) when the optimizer `updated` the weights, and returns the scalars to log;
        resets for the next step."""
        e = self.cfg.moe_experts
        counts = torch.zeros(len(self.moe_layers), 2 * e + 1, device=self.device)  # routed, kept, dropped
        for row, forwards in enumerate(self.forwards):  # empty for the layers of other pipeline stages
            for c in forwards[-micro_batches:]:
                counts[row] += c[: 2 * e + 1]
                if c.numel() > 2 * e + 1:  # layer scope: the layer's (aux, z) of this micro-batch
                    self.sums += torch.cat([c[2 * e + 1 :], c.new_ones(1)])
        counts = all_reduce_sum(counts, dims, over_stages=True).cpu()
        load, kept = counts[:, :e], counts[:, e : 2 * e]  # [MoE layers, E] each
        sums = all_reduce_sum(self.sums, dims, over_stages=True).cpu()
        if self.cfg.moe_expert_bias and updated:
            # By the assignments kept, as megatron-core's TopKRouter counts them (after its token dropping).
            update_expert_bias(model, self.moe_layers, kept, self.cfg.moe_bias_update_rate)
        scalars = {"moe_dropped": counts[:, -1].sum().item()}
        if sums[2] > 0:  # means over micro-batches, ranks and (layer scope) layers
            scalars.update(moe_aux_loss=(sums[0] / sums[2]).item(), moe_z_loss=(sums[1] / sums[2]).item())
        for row, layer in enumerate(self.moe_layers):
            share = load[row] / load[row].sum().clamp(min=1)
            scalars.update({f"expert_load/layer{layer}/expert{e}": v for e, v in enumerate(share.tolist())})
        self.reset()
        return scalars


class AddLossGradient(torch.autograd.Function):
    """output -> output; the backward also returns the given gradients of a loss linear in (prob_sum,
    z_sum), as if that loss had been added to the training loss (Megatron's MoEAuxLossAutoScaler, with the
    gradient fixed in the forward). Kept on ctx, not saved: see the module docstring."""

    @staticmethod
    def forward(ctx, output, prob_sum, z_sum, d_prob_sum, d_z_sum):
        ctx.grads = d_prob_sum, d_z_sum
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, *ctx.grads, None, None


def router_losses(routed: list[Routed], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model scope's (load-balancing loss, router z-loss) over the tokens of these forwards taken together
    (see the module docstring)."""
    rows = sum(r.stats.tokens for r in routed)
    f = torch.stack([r.counts for r in routed]).sum(0) / sum(r.tokens for r in routed)  # [1, E], summing to top_k
    probs = torch.stack([r.stats.prob_sum for r in routed]).sum(0)  # [1, E]
    aux = num_experts * (f * (probs / rows)).sum()
    z = torch.stack([r.stats.z_sum for r in routed]).sum() / rows
    return aux, z


@torch.no_grad()
def update_expert_bias(model: nn.Module, moe_layers: list[int], load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing: each expert's bias moves by `rate` towards balance, up when
    it kept fewer assignments than the mean, down when more. `load` [MoE layers, E] is global, so every
    rank holding a layer moves its bias the same way."""
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.router.expert_bias is not None:
            row = load[moe_layers.index(_layer_of(name, model.cfg))]
            module.router.expert_bias += rate * torch.sign(row.mean() - row).to(module.router.expert_bias.device)


def moe_layers(cfg: ModelConfig) -> list[int]:
    """The MoE layers' indices: decoder layers, then the multi-token prediction depths as num_layers + k
    (megatron-core's MTP layer numbers; their routers' losses count as a layer's)."""
    mtp = range(cfg.num_layers, cfg.num_layers + cfg.mtp_layers) if cfg.layer(cfg.num_layers - 1).moe else ()
    return [i for i in range(cfg.num_layers) if cfg.layer(i).moe] + list(mtp)


def _layer_of(name: str, cfg: ModelConfig) -> int:
    """'layers.3.feed_forward' -> 3, 'mtp.layers.0.block.feed_forward' -> num_layers (module names keep the
    global layer index in every layout)."""
    index = int(re.search(r"layers\.(\d+)\.", name + ".").group(1))
    return cfg.num_layers + index if name.startswith("mtp.") else index


_COLLECTORS: "weakref.WeakKeyDictionary[nn.Module, RouterCollector]" = weakref.WeakKeyDictionary()


def router_collector(model: nn.Module) -> Optional[RouterCollector]:
    """The model's collector (created on first use), or None for a model without MoE layers."""
    cfg = model.cfg
    if not moe_layers(cfg):
        return None
    if model not in _COLLECTORS:
        _COLLECTORS[model] = RouterCollector(model, cfg)
    return _COLLECTORS[model]
