"""Tensor and sequence parallelism (Megatron's split) as DTensor plans keyed by module name.

Inside a block, q/k/v and gate/up are column-parallel (each tp rank computes its own heads and its
slice of the MLP's inner width) and the attention output and down projections are row-parallel (each
rank's partial result is summed). Splitting wq/wk/wv by rows keeps whole heads on a rank, and since
num_kv_heads % tp == 0 (checked in config), query head j and its key/value head j // group land on the
same rank: heads are split by key/value group, no key/value head is replicated.

Multi-head latent attention (model/mla.py) splits its heads the same way: the projections that make heads
(wq, or wq_b after the low-rank wq_a and q_a_norm; wkv_b) are column-parallel and wo row-parallel. The
compressed projections (wq_a, wkv_a) and their norms are replicated plain modules: every rank computes the
whole latents, and their gradients are whole on every rank because ColwiseParallel sums its input gradient
over tp, and SharedRopeKey sums the gradient of the one RoPE key that all heads share.

The embedding and the output head are vocabulary-parallel: each rank holds vocab/tp rows, the head
returns logits as a DTensor sharded on the vocabulary, and the cross-entropy runs under DTensor's
`loss_parallel()`, which reduces max and sum-exp across ranks: no rank ever holds the full logits.

With sequence parallelism the residual stream between tensor-parallel regions is sharded along the
sequence ([b, s/tp, h] per rank): the norms run on their shard, the entry of attention and MLP
all-gathers the sequence, and their row-parallel exits reduce-scatter instead of all-reducing.

A MoE layer (Megatron's default expert tensor parallelism, expert_tensor_parallel_size = tp) routes the whole
sequence on every tp rank, gathered first under sp, and each rank runs the routed rows through its 1/tp slice
of every expert's inner width (expert_parallel.py splits the stacked weights); the shared experts are split
like the dense MLP.
The layer's output is then this rank's partial sum, weighted by the router, and one reduce-scatter (sp) or
all-reduce completes it. Routing the whole sequence, rather than each rank's sequence shard, keeps the router
statistics (the load and its auxiliary losses, the expert bias's update) those of the one process: every tp
rank sees the tokens it sees. Backward, a rank's partial output gives partial gradients for the router's
weights and the shared gate's output, and the experts' input rows: each is summed over tp (GradSummedOverTp),
so the layer's input gradient is whole on every rank, as the gather's backward expects.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

VOCAB_MULTIPLE = 128  # Megatron's make-vocab-size-divisible-by: the vocabulary is padded to 128 x tp


def block_plan(block: nn.Module, sp: bool) -> dict:
    """One transformer block, module name -> placement, for the slots this block has. `seq` is the
    residual stream's layout."""
    seq = Shard(1) if sp else Replicate()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq),
        "attention.wg": ColwiseParallel(),  # the output gate (AFMoE, Laguna, Qwen3-Next), rows by head like wq's
        "attention.sinks": ShardedWithHeads(),  # gpt-oss's per-head sink logits
        "attention.wq_b": ColwiseParallel(),  # mla
        "attention.wkv_b": ColwiseParallel(),  # mla
        **linear_attention_plan(seq),
        **mamba_plan(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        "feed_forward.w3": ColwiseParallel(),
    }
    if sp:
        # Norms on the sequence shard (the post-sublayer norms see the row-parallel exits' shards), returning
        # plain local shards like those exits, so every topology's residual adds match; attention and MLP
        # all-gather the sequence on entry. Attention's other input, the context, is a keyword: untouched.
        for norm in ("attention_norm", "attention_post_norm", "ffn_norm", "ffn_post_norm"):
            plan[norm] = SequenceParallel(use_local_output=True)
        plan["attention"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        if _has_params(block, "attention.wkv_a"):
            # MLA's replicated wq_a and wkv_a take plain tensors. Every part of the input's gradient is whole (see
            # the module docstring), so the backward of the gather only keeps this rank's sequence shard.
            plan["attention"] = PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True
            )
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
    if _has_params(block, "feed_forward.router"):
        plan.update(moe_plan(seq))
    # xIELU's learned scalars act on this rank's slice of the MLP's inner width ([b, s, ffn/tp]): as the
    # per-head norm below, treating that dim as sharded sums their gradient over tp.
    plan["feed_forward.act"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    # The per-head norm sees only this rank's heads ([b, s, heads/tp, d]): treating the heads dim as
    # sharded makes its weight a replicated DTensor whose gradient is summed over tp. A norm over the whole
    # projection (OLMo2) needs every head's statistic: see ProjectionNorm.
    per_head = getattr(block.attention, "qk_norm_per_head", True)
    for name in ("attention.q_norm", "attention.k_norm"):
        plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True) if per_head else ProjectionNorm()
    if _has_params(block, "attention.wkv_a"):
        plan["attention.wkv_a"] = SharedRopeKey(block.attention.rope_dim)
    weightless = (ProjectionNorm, GradSummedOverTp)  # placed whether or not the slot has weights
    return {name: style for name, style in plan.items() if _has_params(block, name, isinstance(style, weightless))}


def linear_attention_plan(seq) -> dict:
    """A Gated DeltaNet mixer (model/linear_attention.py), split by heads as attention is: the projections column-
    parallel (rows of whole key heads, and of the value heads each serves, since both counts divide by tp), the
    convolution's channel rows and the per-head decay parameters sharded alike, out_proj row-parallel. The recurrence
    is per value head, so it runs on this rank's heads with no communication; the per-head norm over d_v takes the
    per-head QK-norm's placement (below)."""
    plan = {f"attention.{p}_proj": ColwiseParallel() for p in "qkvzba"}
    rows = ("conv_q", "conv_k", "conv_v", "a_log", "dt_bias")
    plan.update({f"attention.{name}": ShardedWithHeads() for name in rows})
    plan["attention.out_proj"] = RowwiseParallel(output_layouts=seq)
    plan["attention.norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def mamba_plan() -> dict:
    """A Mamba-2 mixer (model/mamba.py), split by heads: z, x and dt column-parallel by heads, B and C by groups (the
    group count divides by tp, so a rank's heads and the groups serving them stay together), the convolution's
    channel rows, A_log, D, dt_bias and the gated norm's weight sharded alike; out_proj row-parallel (in
    linear_attention_plan). The scan is per head and the gated norm per group: no communication inside."""
    plan = {f"attention.{p}_proj": ColwiseParallel() for p in ("x", "c", "dt")}  # z_proj, b_proj: as Gated DeltaNet's
    rows = ("conv_x", "conv_b", "conv_c", "d", "gate_norm", "conv")  # a_log, dt_bias: as Gated DeltaNet's; conv: LFM2's
    plan.update({f"attention.{name}": ShardedWithHeads() for name in rows})
    return plan


def moe_plan(seq) -> dict:
    """A MoE feed_forward slot (see the module docstring): plain tensors in, the whole sequence on every rank;
    out, this rank's partial sum, completed to the residual stream's layout."""
    return {
        "feed_forward": PrepareModuleInputOutput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Partial(),), desired_output_layouts=(seq,), use_local_output=True,
        ),
        "feed_forward.router": GradSummedOverTp(output_index=1),  # the top-k weights [T, k]
        "feed_forward.sort_rows": GradSummedOverTp(input_index=0),  # the rows [T, hidden] the experts' slices take
        "feed_forward.shared_experts.w1": ColwiseParallel(),
        "feed_forward.shared_experts.w3": ColwiseParallel(),
        "feed_forward.shared_experts.w2": RowwiseParallel(output_layouts=Partial()),  # summed with the routed part
        "feed_forward.shared_gate": GradSummedOverTp(),  # [T, 1]
    }


def grad_summed_over(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """x itself, whose gradient the backward sums over `mesh`: x is the same on every rank, and each rank's
    gradient is its part of the whole."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class GradSummedOverTp(ParallelStyle):
    """A replicated module whose output (or output[output_index]) feeds a computation split over tp: its
    gradient there is partial, and the backward sums it over tp. With `input_index`, the sum is taken on the
    module's input args[input_index] instead: right when the module's backward is linear and the same on
    every rank, and fewer bytes when its input is smaller than its output (the MoE row sort's, k times)."""

    def __init__(self, output_index: Optional[int] = None, input_index: Optional[int] = None):
        super().__init__()
        self.output_index, self.input_index = output_index, input_index

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.input_index is not None:
            def pre_hook(module: nn.Module, args: tuple):
                args = list(args)
                args[self.input_index] = grad_summed_over(args[self.input_index], device_mesh)
                return tuple(args)

            module.register_forward_pre_hook(pre_hook)
            return module

        def hook(module: nn.Module, args: tuple, out):
            if self.output_index is None:
                return grad_summed_over(out, device_mesh)
            out = list(out)
            out[self.output_index] = grad_summed_over(out[self.output_index], device_mesh)
            return tuple(out)

        module.register_forward_hook(hook)
        return module


class SharedRopeKey(ParallelStyle):
    """MLA's wkv_a, replicated: its output is [latent | rope], and the rope part is the one decoupled RoPE key every
    head shares. This rank's heads use it, so its gradient here is a partial sum over the heads; the backward sums
    it over tp. The latent's gradient is already whole (wkv_b's ColwiseParallel sums its input gradient)."""

    def __init__(self, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            latent, rope = out.split([out.shape[-1] - self.rope_dim, self.rope_dim], dim=-1)
            rope = grad_summed_over(rope, device_mesh)  # [b, s, rope]
            return torch.cat((latent, rope), dim=-1)  # [b, s, latent + rope]

        module.register_forward_hook(hook)
        return module


class ShardedWithHeads(ParallelStyle):
    """A module whose parameters are per query head ([heads], gpt-oss's sinks) and whose forward returns them:
    sharded like the heads ColwiseParallel leaves this rank (contiguous blocks), handed out as this rank's
    plain slice, whose gradient is then this rank's block of the whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _shard_rows, output_fn=lambda mod, out, mesh: out.to_local())


class ProjectionNorm(ParallelStyle):
    """A norm over a whole column-parallel projection (OLMo2's QK-norm over [b, s, heads * d]): this rank's
    [b, s, heads/tp * d] is the Shard(-1) of it, and the weight (and bias) are sharded like the heads. The
    norm then runs on DTensors: RMSNorm's mean of squares is all-reduced over tp ([b, s, 1]) and the rest stays
    local; DTensor's LayerNorm gathers the projection and computes it replicated. Either result goes back to
    this rank's plain slice."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _shard_rows, _as_last_dim_shard, _last_dim_shard_local)


def _shard_rows(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for key, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))


def _as_last_dim_shard(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return (DTensor.from_local(inputs[0], mesh, [Shard(-1)], run_check=False),)


def _last_dim_shard_local(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.redistribute(mesh, [Shard(-1)]).to_local()  # LayerNorm's result comes back replicated


class PositionsOnShard(ParallelStyle):
    """Absolute positions (a learned or a sinusoidal table) under sequence parallelism: the lookup takes every
    position of the sequence, replicated, and returns this rank's sequence shard, as the token embedding
    does. A learned table is a replicated DTensor: the backward of taking the shard all-gathers the
    positions' gradients, so every rank's table gets all of them."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, _as_replicated, _sequence_shard_local)


def _as_replicated(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False),)


def _sequence_shard_local(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.redistribute(mesh, [Shard(output.ndim - 2)]).to_local()  # [s/tp, h] or [b, s/tp, h]


def _has_params(block: nn.Module, name: str, weightless_too: bool = False) -> bool:
    """Whether the slot `name` is present in `block` with parameters: an absent slot, or a weightless norm
    over the hidden size (which works on whatever shard it is given), needs no placement; a norm over a
    whole projection always does (`weightless_too`), for its statistic."""
    try:
        module = block.get_submodule(name)
    except AttributeError:  # a None slot, or its parent is None
        return False
    return module is not None and (weightless_too or any(True for _ in module.parameters()))


def mtp_plan(sp: bool) -> dict:
    """One multi-token prediction depth around its block (block_plan). Its inputs, the shifted tokens' embeddings and
    the main model's normed hidden states, come in the residual stream's layout: under sp each rank projects its
    sequence shard with replicated enorm, hnorm and eh_proj (megatron-core splits eh_proj's rows, then gathers them
    and scatters the sequence: the same numbers), whose gradients sum over tp as the norms'; without sp every rank
    computes them whole, as the decoder's replicated norms. The final norm hands the head a sequence shard, as the
    main model's norm does."""
    if not sp:
        return {}
    plan = {name: SequenceParallel(use_local_output=True) for name in ("enorm", "hnorm", "eh_proj")}
    plan["norm"] = SequenceParallel()
    return plan


def outer_plan(sp: bool, score: bool = False) -> dict:
    """Embedding, final norm and head; the head keeps its logits a DTensor sharded on the vocabulary. A score
    head (one output) is row-parallel instead: each rank multiplies its slice of the hidden size and the
    partial scores are summed, so every rank holds the whole [b, s, 1]."""
    seq = Shard(1) if sp else Replicate()
    plan = {
        "tok_embeddings": VocabParallelEmbedding(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if score:
        plan["output"] = RowwiseParallel(input_layouts=seq, output_layouts=Replicate())
    if sp:
        plan["norm"] = SequenceParallel()
        plan["pos_embeddings"] = PositionsOnShard()
        plan["embedding_norm"] = SequenceParallel(use_local_output=True)  # on the shard, like the blocks' norms
    return plan


class VocabParallelEmbedding(RowwiseParallel):
    """RowwiseParallel for the embedding, whose all-reduce (or reduce-scatter under sp) completes before the
    lookup returns. torch's styles redistribute with async_op=True, so to_local() hands out an
    AsyncCollectiveTensor; inside a compiled block that is traced away, but the embedding runs eagerly and
    its output is the first compiled block's input. AOTAutograd takes that subclass input apart and its
    backward hands the redistribute's backward a plain tensor instead of a DTensor ("'Tensor' object has no
    attribute '_local_tensor'", training.compile with tp, torch 2.13). The first block's norm waits for the
    collective at once anyway, so nothing is lost by waiting here."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return math.ceil(vocab_size / multiple) * multiple


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> None:
    """Shards `model` (a Transformer or one pipeline stage of it) in place over `tp_mesh`; the routed experts'
    weights are expert_parallel.py's (split_experts)."""
    cfg = model.cfg
    pad_vocab(model, tp_mesh.size())
    mtp = model.mtp  # multi-token prediction (model/mtp.py), on the stage with the head
    for block in model.blocks():  # the decoder's and the MTP depths'
        parallelize_module(block, tp_mesh, block_plan(block, sp))
        _shard_alibi_slopes(block.attention, tp_mesh)
    for layer in mtp.layers.values() if mtp else ():
        parallelize_module(layer, tp_mesh, mtp_plan(sp))
    present = {name: style for name, style in outer_plan(sp, cfg.head == "score").items() if getattr(model, name) is not None}
    parallelize_module(model, tp_mesh, present)
    model.tie_weights()  # the head and the embedding were distributed one by one: share the DTensor again
    if model.output is not None and model.output.weight.shape[0] > cfg.head_vocab_size:
        _mask_padded_logits(model, tp_mesh)


def _shard_alibi_slopes(attention: nn.Module, tp_mesh: DeviceMesh) -> None:
    """ALiBi's per-head slopes follow the heads: this rank keeps the slopes of the query heads it owns."""
    if getattr(attention, "alibi_slopes", None) is not None:  # MLA has no ALiBi
        attention.alibi_slopes = attention.alibi_slopes.chunk(tp_mesh.size())[tp_mesh.get_local_rank()].clone()


def pad_vocab(model: nn.Module, tp: int) -> None:
    """Appends zero rows to the embedding and the head, each to a multiple of VOCAB_MULTIPLE x tp of its own rows (a
    pruned head, model.output_vocab_size, has fewer than the embedding). Pad tokens never occur as inputs, and their
    logits are -inf (see _mask_padded_logits), so those rows get zero gradients and stay zero: the loss, the
    gradient norm and the trained weights are those of the unpadded model. Checkpoints hold the unpadded
    rows (parallel/state.py), so a checkpoint does not depend on tp."""
    cfg = model.cfg
    head = model.output if cfg.head == "lm" else None  # a score head has no vocabulary
    for module, rows in ((model.tok_embeddings, cfg.vocab_size), (head, cfg.head_vocab_size)):
        padded = padded_vocab_size(rows, tp)
        if module is None or module.weight.shape[0] >= padded:
            continue
        for name in ("weight", "bias"):  # the head's bias (GPT-J, Phi) is padded like its rows
            rows = getattr(module, name, None)
            if rows is not None:
                pad = rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])
                setattr(module, name, nn.Parameter(torch.cat([rows.detach(), pad])))  # [padded, ...]
    model.tie_weights()


def _mask_padded_logits(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Adds -inf to the padded columns of the logits, after any soft-capping, so softmax gives them 0."""
    vocab, padded = model.cfg.head_vocab_size, model.output.weight.shape[0]
    bias = torch.zeros(padded, device=model.output.weight.device)
    bias[vocab:] = -math.inf
    bias = distribute_tensor(bias, tp_mesh, [Shard(0)], src_data_rank=None)  # [padded/tp] per rank, like the logits

    def hook(module, args, logits):
        return logits + bias  # [b, s, padded] sharded on the vocabulary

    def mtp_hook(module, args, output):  # the depths' logits, left on the module (model/mtp.py)
        module.logits = [logits + bias for logits in module.logits]

    model.register_forward_hook(hook)
    if getattr(model, "mtp", None) is not None:
        model.mtp.register_forward_hook(mtp_hook)
