"""The mixture-of-experts feed-forward: a router picks k of E experts per token, the tokens are sorted by
expert and each expert's rows go through its own MLP (one grouped matrix multiply per projection where
`torch._grouped_mm` runs, a loop of matmuls into whole outputs elsewhere), and the outputs are summed back per
token with the router's weights; optional shared experts see every token.

The experts are stacked weights, `experts.w1` [E, ffn, hidden] and so on, not E modules: one parameter
per projection, which expert parallelism (parallel/expert_parallel.py) splits along E from outside by
replacing `experts.forward`. The auxiliary losses are not computed here: each forward leaves its router
statistics on the module (`MoE.stats`) and the training step turns them into losses (training/moe_loss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.mlp import FeedForward, activations
from megatron_llm.model.moe_capacity import drop_over_capacity
from megatron_llm.model_config import ModelConfig


@dataclass
class RouterStats:
    """One forward's routing, for the losses and the logs (sums, so micro-batches and layers add up)."""

    counts: torch.Tensor  # [E] assignments per expert (k per token), before any dropping; no gradient
    # The load-balancing loss's f and P per balancing group [G, E]: the micro-batch (G = 1), or each sequence
    # (G = b, model.moe_aux_loss_scope sequence). f counts each token's k best unbiased scores over all
    # experts, as megatron-core and DeepSeek-V3's balance loss do: the expert bias and group limits move the
    # choice (counts), not the balance.
    balance_counts: torch.Tensor  # [G, E] no gradient
    prob_sum: torch.Tensor  # [G, E] sum over the group's tokens of each expert's normalised score; carries the gradient
    z_sum: torch.Tensor  # sum over tokens of logsumexp(router logits)^2; carries the gradient
    tokens: int  # tokens routed
    dropped: torch.Tensor  # assignments past an expert's capacity (0 when dropless)
    kept: torch.Tensor  # [E] assignments each expert kept (counts when dropless): what the expert bias balances


class Router(nn.Module):
    """x [T, hidden] -> (expert indices [T, k], their weights [T, k], stats). Scores are a softmax over the
    experts or a sigmoid per expert, of the logits (soft-capped where asked: Laguna); the choice may add the
    expert bias (DeepSeek-V3's aux-loss-free balancing, a buffer the training step moves, never a gradient) to the
    scores or (Kolibri-1) to the logits, and be limited to the best groups of experts; the weights are the
    unbiased scores of the chosen experts, renormalised or not, scaled."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.moe_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.moe_experts)) if cfg.moe_router_bias else None  # gpt-oss
        self.register_buffer("expert_bias", torch.empty(cfg.moe_experts) if cfg.moe_expert_bias else None)
        self.top_k, self.score = cfg.moe_top_k, cfg.moe_score
        self.groups, self.topk_groups, self.group_rank_top = cfg.moe_groups, cfg.moe_topk_groups, cfg.moe_group_rank_top
        self.renormalize, self.scale = cfg.moe_renormalize, cfg.moe_routed_scale
        self.bias_on_logits = cfg.moe_expert_bias_on == "logits"  # Kolibri-1: the bias moves the logits' order
        self.softcap = cfg.moe_router_softcap  # Laguna

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(indices [T, k], weights [T, k] in x's dtype, logits [T, E] and scores [T, E] in fp32)."""
        logits = F.linear(x, self.weight, self.bias).float()  # [T, E]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        if self.expert_bias is None:
            choice = scores
        else:
            choice = (logits if self.bias_on_logits else scores) + self.expert_bias
        if self.groups > 1:
            choice = self._best_groups_only(choice)
        indices = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return indices, (weights * self.scale).to(x.dtype), logits, scores

    def _best_groups_only(self, choice: torch.Tensor) -> torch.Tensor:
        """Scores outside the topk_groups groups with the largest sums of their group_rank_top best scores set
        to -inf (DeepSeek-V3's noaux_tc: top-2 sums; DeepSeek-V2's group_limited_greedy: the best score), so no
        token reaches more than topk_groups groups."""
        grouped = choice.view(choice.shape[0], self.groups, -1)  # [T, groups, E / groups]
        group_scores = grouped.topk(self.group_rank_top, dim=-1).values.sum(-1)  # [T, groups]
        best = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).flatten(1)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in], sorted by expert with counts[e] rows for expert e, times w[e]^T ([E, out, in])
    -> [N, out], as one `torch._grouped_mm` (its operands need 16-byte-aligned strides: `grouped_mm_runs`)."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))


def grouped_mm_runs(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the experts take `torch._grouped_mm`: where it runs, on CPU or on CUDA in bf16, with
    16-byte-aligned strides, and not inside a compiled block in fp32 (the compiler's shape kernel for it
    takes bf16 only, torch 2.13). Elsewhere ExpertMLP, which saves one [N, ffn] tensor per layer fewer than
    autograd around the grouped matmuls but made a CPU training step 1.05x slower (fp32, one thread, paired)."""
    aligned = all(n * x.element_size() % 16 == 0 for w in weights for n in w.shape[1:])
    bf16 = x.dtype == torch.bfloat16
    runs = x.device.type == "cpu" or (x.is_cuda and bf16)
    return hasattr(torch, "_grouped_mm") and aligned and runs and (bf16 or not torch.compiler.is_compiling())


# The stacked parameters of the experts, in expert_mlp's order: weights [E, out, in], then the optional biases
# [E, out] (model.moe_ffn_bias, gpt-oss).
EXPERT_PARAMS = ("w1", "w2", "w3", "w1_bias", "w2_bias", "w3_bias")


class GroupedExperts(nn.Module):
    """E MLPs of the config's kind as stacked weights: gated w2(act(w1 x) * w3 x) or plain w2(act(w1 x)), each
    projection with a bias per expert where model.moe_ffn_bias asks. x [N, hidden] is sorted by expert, counts [E]
    rows each; the result is [N, hidden] in the same order."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, dim, hidden, bias = cfg.moe_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.moe_ffn_bias
        self.act, self.up_act = activations(cfg)
        self.w1 = nn.Parameter(torch.empty(e, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(e, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(e, hidden, dim)) if cfg.gated else None
        self.w1_bias = nn.Parameter(torch.empty(e, hidden)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(e, dim)) if bias else None
        self.w3_bias = nn.Parameter(torch.empty(e, hidden)) if bias and cfg.gated else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, counts, [getattr(self, n) for n in EXPERT_PARAMS], self.act, self.up_act)


def expert_mlp(x: torch.Tensor, counts: torch.Tensor, params, act, up_act=None) -> torch.Tensor:
    """The experts' MLPs over rows sorted by expert (counts [E'] rows each, E' = w1.shape[0]); `params` are
    w1, w2, w3 and their biases (EXPERT_PARAMS, None where absent), `up_act` what w3 x passes through before
    the product (None: nothing). A function of the weights, so that expert parallelism can call it with the
    experts a rank holds."""
    w1, w2, w3, b1, b2, b3 = params
    if grouped_mm_runs(x, w1, w2):
        n = x.shape[0]
        h = act(_biased(grouped_mm(x, w1, counts), b1, counts, n))  # [N, moe_ffn_hidden]
        if w3 is not None:
            up = _biased(grouped_mm(x, w3, counts), b3, counts, n)
            h = h * (up if up_act is None else up_act(up))
        return _biased(grouped_mm(h, w2, counts), b2, counts, n)  # [N, hidden]
    if torch.is_autocast_enabled(x.device.type):  # autocast leaves torch.mm(out=) alone: cast as it casts a linear
        dtype = torch.get_autocast_dtype(x.device.type)
        x, *params = (t if t is None else t.to(dtype) for t in (x, *params))
    return _expert_mlp_eager(x, counts, *params, act, up_act)


def _biased(rows: torch.Tensor, bias: Optional[torch.Tensor], counts: torch.Tensor, n: int) -> torch.Tensor:
    """rows [N, out] sorted by expert plus each row's expert bias (bias [E, out]), or rows as they are without
    one. output_size spares repeat_interleave a read of the counts on the host."""
    return rows if bias is None else rows + bias.repeat_interleave(counts, dim=0, output_size=n)


class ExpertMLP(torch.autograd.Function):
    """expert_mlp where torch._grouped_mm does not run: a loop of per-expert matmuls written into whole [N, ...]
    outputs (no concatenation), with a backward that writes each expert's weight gradient into its row of the stacked gradient and adds
    the two input gradients of a gated MLP in one addmm. Saves x, w1 x, w3 x and the product that w2 takes;
    the activations run again in the backward, where autograd differentiates them (act on w1 x, and up_act on
    w3 x where there is one: any activations() pair)."""

    @staticmethod
    def forward(ctx, x, counts, w1, w2, w3, b1, b2, b3, act, up_act):
        spans = _spans(counts)
        h1 = _per_expert(x, w1, spans, bias=b1)  # [N, ffn]
        h3 = _per_expert(x, w3, spans, bias=b3) if w3 is not None else None
        h = act(h1)  # a new tensor (every activation is out of place): the gate multiplies into it
        if h3 is not None:
            h.mul_(h3 if up_act is None else up_act(h3))
        ctx.save_for_backward(x, w1, w2, w3, h1, h3, h)
        ctx.spans, ctx.act, ctx.up_act = spans, act, up_act
        return _per_expert(h, w2, spans, bias=b2)  # [N, hidden]

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, w3, h1, h3, h = ctx.saved_tensors
        spans, grad = ctx.spans, grad.contiguous()
        need = ctx.needs_input_grad
        dh = _per_expert(grad, w2, spans, transpose=False)  # [N, ffn]: d loss / d h
        dw2 = _weight_grads(grad, h, spans, w2) if need[3] else None
        with torch.enable_grad():
            leaf = h1.detach().requires_grad_()
            a = ctx.act(leaf)
            if h3 is not None and ctx.up_act is not None:
                leaf3 = h3.detach().requires_grad_()
                u = ctx.up_act(leaf3)
        dh3 = dh * a.detach() if h3 is not None else None  # d loss / d up_act(w3 x)
        if h3 is not None and ctx.up_act is not None:
            (dh3,) = torch.autograd.grad(u, leaf3, dh3)  # d loss / d (w3 x)
            h3 = u.detach()
        da = dh.mul_(h3) if h3 is not None else dh
        (dh1,) = torch.autograd.grad(a, leaf, da)  # [N, ffn]: d loss / d (w1 x)
        dx = _per_expert(dh1, w1, spans, transpose=False)  # [N, hidden]
        for e, (start, end) in enumerate(spans):
            if dh3 is not None and end > start:
                dx[start:end].addmm_(dh3[start:end], w3[e])
        dw1 = _weight_grads(dh1, x, spans, w1) if need[2] else None
        dw3 = _weight_grads(dh3, x, spans, w3) if dh3 is not None and need[4] else None
        db1, db2, db3 = (_bias_grads(g, spans) if g is not None and need[i] else None
                         for i, g in ((5, dh1), (6, grad), (7, dh3)))
        return dx, None, dw1, dw2, dw3, db1, db2, db3, None, None


def _expert_mlp_eager(x, counts, w1, w2, w3, b1, b2, b3, act, up_act) -> torch.Tensor:
    """ExpertMLP, which inside a compiled block runs eagerly: its spans are read from `counts` on the host.
    Disabled at the call, not at import: torch.compiler.disable imports torch._dynamo (~1 s), which inference
    never needs; dynamo does not recompile for the new wrapper."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(ExpertMLP.apply)(x, counts, w1, w2, w3, b1, b2, b3, act, up_act)
    return ExpertMLP.apply(x, counts, w1, w2, w3, b1, b2, b3, act, up_act)


def _spans(counts: torch.Tensor) -> list[tuple[int, int]]:
    """[(first row, one past the last)] of each expert's rows: one read of counts on the host."""
    ends = counts.cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def _per_expert(x: torch.Tensor, w: torch.Tensor, spans, transpose: bool = True,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each expert's rows of x times w[e]^T ([E, out, in]; w[e] itself with transpose=False) -> [N, out], plus
    the expert's bias [E, out] where given (one addmm)."""
    out = x.new_empty(x.shape[0], w.shape[1] if transpose else w.shape[2])
    for e, (start, end) in enumerate(spans):
        weight = w[e].T if transpose else w[e]
        if bias is None:
            torch.mm(x[start:end], weight, out=out[start:end])
        else:
            torch.addmm(bias[e], x[start:end], weight, out=out[start:end])
    return out


def _bias_grads(grad: torch.Tensor, spans) -> torch.Tensor:
    """d loss / d bias [E, out] of rows + bias[e]: each expert's rows of grad [N, out] summed (zero without rows)."""
    out = grad.new_empty(len(spans), grad.shape[1])
    for e, (start, end) in enumerate(spans):
        torch.sum(grad[start:end], dim=0, out=out[e])
    return out


def _weight_grads(grad: torch.Tensor, inputs: torch.Tensor, spans, w: torch.Tensor) -> torch.Tensor:
    """d loss / d w [E, out, in] of rows = inputs @ w[e]^T: each expert's grad^T @ inputs (zero for an expert
    that got no rows)."""
    out = torch.empty_like(w)
    for e, (start, end) in enumerate(spans):
        torch.mm(grad[start:end].T, inputs[start:end], out=out[e])
    return out


# Moving rows between token order and expert order by gathers both ways: the plain x[token] and index_add_
# are gathers one way and scatter-adds the other, which on CPU cost several times a gather (index_put_ with
# accumulate, its backward, ~20 ms for 2048 x 512 rows where a gather takes 0.5 ms) and stall two threads
# under load. A sorted row is one assignment, so its way back is one gather by `position`.


class SortRows(torch.autograd.Function):
    """x [T, hidden] -> the row of each kept assignment's token, in expert order [N, hidden]. Backward: each
    assignment's gradient gathered back by `position` (a zero row for a dropped one) and summed per token."""

    @staticmethod
    def forward(ctx, x, order, position, top_k: int):
        ctx.save_for_backward(position)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (position,) = ctx.saved_tensors
        per_assignment = _rows_at(grad, position)  # [T * k, hidden]
        return per_assignment.view(-1, ctx.top_k, grad.shape[-1]).sum(1), None, None, None


class RowSort(nn.Module):
    """The MoE slot that sorts rows by expert (SortRows), parameter-free: its input's gradient is a linear
    function of the sorted rows' one, the same on every rank, so tensor parallelism sums the partial
    gradient there ([T, hidden]) rather than on the k times longer sorted rows (parallel/tensor_parallel.py)."""

    def forward(self, x: torch.Tensor, order: torch.Tensor, position: torch.Tensor, top_k: int) -> torch.Tensor:
        return SortRows.apply(x, order, position, top_k)


class UnsortRows(torch.autograd.Function):
    """y [N, hidden] in expert order -> [T * k, hidden] in assignment order (zeros for dropped assignments).
    Backward: the gather by `order`."""

    @staticmethod
    def forward(ctx, y, order, position):
        ctx.save_for_backward(order)
        return _rows_at(y, position)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def _rows_at(rows: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """rows [N, hidden] gathered at `position` [T * k], where N (only when assignments were dropped, N < T * k)
    stands for a zero row."""
    if rows.shape[0] < position.numel():
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    return rows.index_select(0, position)


class MoE(nn.Module):
    """The feed_forward slot of a MoE layer: x [b, s, hidden] -> [b, s, hidden]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.balance_softmax = cfg.moe_aux_loss_probs == "softmax"
        self.average_shared = cfg.moe_shared_combine == "average"
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg)
        shared = cfg.moe_shared_ffn_hidden_size
        self.sort_rows = RowSort()
        self.shared_experts = FeedForward(cfg, shared) if shared else None
        self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.moe_shared_gate else None
        self.num_experts, self.top_k, self.capacity_factor = cfg.moe_experts, cfg.moe_top_k, cfg.moe_capacity_factor
        self.drop_policy, self.drop_shards = cfg.moe_token_drop_policy, cfg.moe_capacity_sequence_shards
        self.balance_per_sequence = cfg.moe_aux_loss_scope == "sequence"
        self.weight_input = cfg.moe_weight_input
        self.stats: Optional[RouterStats] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, hidden]
        indices, weights, logits, scores = self.router(x)  # [T, k], [T, k], [T, E], [T, E]
        flat = indices.flatten()  # [T * k], token t's slots at t * k ...
        order = flat.argsort(stable=True)  # assignments sorted by expert, tokens in order within one
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        self._record(logits, scores, indices, counts, shape)
        if self.capacity_factor is not None:
            order, counts = self._drop_over_capacity(order, counts, flat, weights, shape)
        # Where each assignment went in the sorted rows; N (one past them, a zero row) for a dropped one.
        position = torch.full_like(flat, order.numel()).index_put_((order,), torch.arange(order.numel(), device=x.device))
        rows = self.sort_rows(x, order, position, self.top_k)  # [N, hidden], sorted by expert
        if self.weight_input:  # Llama 4: each sorted row scaled by its assignment's weight, the outputs summed as they are
            rows = rows * weights.flatten().index_select(0, order).unsqueeze(-1).to(rows.dtype)
        y = self.experts(rows, counts)  # [N, hidden], sorted by expert
        y = UnsortRows.apply(y, order, position).view(*weights.shape, -1)  # [T, k, hidden], by token and choice
        # [T, hidden]: the k outputs summed per token by the router's weights, as one batched [1, k] x [k, hidden]
        # product (forward and backward 2.3x faster than multiplying and summing, on CPU at 1024 x 2 x 512); the
        # inputs carry the weights already where model.moe_weight_input
        out = y.sum(1) if self.weight_input else torch.bmm(weights.unsqueeze(1).to(y.dtype), y).squeeze(1)
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
            if self.average_shared:  # Cohere2-MoE's average: (routed + shared) / 2
                out = out / 2
        return out.view(shape)

    def _drop_over_capacity(self, order, counts, flat, weights, shape):
        """Keeps each expert's `capacity` assignments chosen by the drop policy, as megatron-core does
        (model/moe_capacity.py), in each of `drop_shards` pieces of the sequence (one when they do not divide
        it, e.g. a decode step); x was [b, s, hidden] (shape) or one sequence [s, hidden]."""
        batch = shape[0] if len(shape) == 3 else 1
        order, counts, self.stats.dropped = drop_over_capacity(
            order, counts, flat, weights, batch, self.capacity_factor, self.drop_policy, self.drop_shards)
        self.stats.kept = counts.float()
        return order, counts

    def _record(self, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                shape: torch.Size) -> None:
        """The router statistics of this forward (see RouterStats); the losses are the training step's.
        Softmax routers balance their probabilities (transformers' load_balancing_loss_func); sigmoid
        ones their scores normalised per token (DeepSeek-V3's balance loss), or the softmax of their logits
        (model.moe_aux_loss_probs softmax: transformers' MiniMax-M2). x was [b, s, hidden] (shape)
        or one sequence: the balancing groups are its sequences only when the sequence scope asks."""
        tokens, e = logits.shape
        if self.balance_softmax:
            probs = logits.softmax(-1)
        else:
            probs = scores if self.router.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        z = torch.logsumexp(logits, dim=-1)
        groups = shape[0] if self.balance_per_sequence and len(shape) == 3 else 1
        biased = self.router.expert_bias is not None or self.router.groups > 1
        if groups == 1 and not biased:  # the balance counts the choice itself: the forward's counts
            balance = counts.view(1, e)
        else:
            if biased:
                indices = scores.topk(self.top_k, dim=-1).indices  # [T, k]: the unbiased, unlimited choice
            group = torch.arange(tokens, device=logits.device) // (tokens // groups)  # [T]: the rows are batch-major
            balance = torch.bincount((indices + e * group[:, None]).flatten(), minlength=groups * e).view(groups, e)
        routed = counts.detach().float()
        self.stats = RouterStats(routed, balance.float(), probs.view(groups, -1, e).sum(1), z.square().sum(), tokens,
                                 counts.new_zeros(()), routed)
