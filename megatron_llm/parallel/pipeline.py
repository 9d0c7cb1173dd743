"""Pipeline parallelism with torch.distributed.pipelining: stages, schedules, and this rank's view.

The model is split by layer count into pp x virtual_stages stages (evenly, or as parallel.stage_layers
says); the first stage also holds the embedding, the last the final norm and the head, and the loss is
computed there by the schedule. With multi-token prediction the last stage also holds the MTP depths and a
copy of the embedding, whose inputs are the micro-batch's tokens (megatron-core's MTP block and its embedding
group); PipelineModel keeps the copies equal. Each stage is a Transformer with the other modules deleted, so
every parameter keeps its full-model name. Which stages a rank runs depends on the schedule: one for GPipe
and 1F1B; stages r, r + pp, ... for the interleaved ones ("loop"); r and 2pp - 1 - r for ZBV ("v").

The training micro-batches are the schedule's micro-batches (training.grad_accum_steps of them).
Micro-batches with document masks (packed conversations, data.document_mask) send their positions and
document ids along with the hidden states from stage to stage (see `carry_documents`).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from megatron_llm.config import ParallelConfig
from megatron_llm.model import Transformer
from megatron_llm.model.attention_kernels import KeyMask
from megatron_llm.parallel.gradients import match_param_layouts

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
SINGLE_STAGE = ("gpipe", "1f1b")

# (micro-batch, per-token cross-entropy [b, s]) for each micro-batch, from the loss on the last stage
Records = list[tuple[dict, torch.Tensor]]
# (logits, micro-batch) -> (loss to backpropagate, per-token cross-entropy)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def document_inputs(mb: dict) -> dict:
    """The model's keyword inputs for a micro-batch with document masks (positions restarting at each
    document, no attention across documents), or none for plain causal sequences."""
    if "documents" not in mb:
        return {}
    return {"positions": mb["positions"], "keys": KeyMask(documents=mb["documents"])}


def carry_documents(part: nn.Module) -> None:
    """Makes a stage module take (tokens or hidden states, positions, documents) and, unless it holds the
    head, return the same three, so that every stage masks as the first does: the schedule splits all three
    into micro-batches and sends them between stages (the integer ones need no gradient). Forward hooks
    rather than a wrapper module, so that the schedule still drives the part itself (its FSDP2 or DDP
    gradient synchronisation) and parameter names stay those of the whole model."""

    def before(module, args, kwargs):
        x, positions, documents = args
        # The schedule infers each stage's output shapes once by running it on uninitialised inputs: keep
        # such positions inside the RoPE table (real ones always are; documents may hold anything).
        positions = positions.clamp(0, module.cfg.max_seq_len - 1)
        return (x,), {**kwargs, "positions": positions, "keys": KeyMask(documents=documents)}

    def after(module, args, kwargs, out):
        return out if module.output is not None else (out, kwargs["positions"], kwargs["keys"].documents)

    part.register_forward_pre_hook(before, with_kwargs=True)
    part.register_forward_hook(after, with_kwargs=True)


def stage_layers(num_layers: int, parallel: ParallelConfig) -> list[list[int]]:
    """Global layer indices of each stage, in order."""
    counts = parallel.stage_layers or [num_layers // parallel.num_stages] * parallel.num_stages
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(start, start + n)) for start, n in zip(starts, counts)]


def stages_of_rank(pp_rank: int, parallel: ParallelConfig) -> list[int]:
    """The stage indices this pp rank runs, in order."""
    pp, v = parallel.pp, parallel.virtual_stages
    if parallel.schedule == "zbv":  # a V: down the ranks and back up, so rank 0 holds the first and last stage
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(v)]


def split_stage(model: Transformer, layers: list[int], first: bool, last: bool) -> Transformer:
    """A copy of (meta) `model` holding only `layers`, plus the embeddings if first, norm and head if last; the
    last keeps the embeddings too when it holds the MTP depths, which embed the shifted tokens."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers):
        if int(key) not in layers:
            del stage.layers[key]
    embeds = first or (last and model.mtp is not None)
    for name in (() if embeds else Transformer.FIRST_STAGE) + (() if last else Transformer.LAST_STAGE):
        setattr(stage, name, None)
    return stage


def embedding_copies(part: Transformer, first: bool) -> list[nn.Parameter]:
    """The parameters of a first (`first`) or last stage that the other end also holds, in the same order at both
    ends: with MTP every embedding parameter (the token, position and embedding-norm weights the depths use), else
    with tied embeddings the embedding at the first and the head at the last."""
    if part.cfg.mtp_layers:
        return [p for name in Transformer.FIRST_STAGE if getattr(part, name) is not None
                for p in getattr(part, name).parameters()]
    if part.cfg.tie_embeddings:
        return [part.tok_embeddings.weight if first else part.output.weight]
    return []


class ScheduleLoss:
    """The schedule's loss_fn. The schedule calls it on the last stage with each micro-batch's logits and
    target; the target here is the micro-batch's index, so the loss sees the micro-batch itself (labels,
    loss mask, channel) and the per-token cross-entropy is kept for the caller.

    Records are keyed by that index: on its first step after a switch between training and evaluation,
    the schedule also calls the loss on placeholder logits to infer gradient shapes, before the real
    micro-batches, whose records then replace that one."""

    def __init__(self, count: int):
        self.count = count  # micro-batches per schedule step
        self.micro_batches: list[dict] = []
        self.fn: Optional[LossFn] = None
        self.records: dict[int, tuple[dict, torch.Tensor]] = {}

    def __call__(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        i = int(index[0])
        loss, token_ce = self.fn(logits, self.micro_batches[i])
        self.records[i] = (self.micro_batches[i], token_ce)
        return loss


class PipelineModel(nn.Module):
    """This rank's stages seen as one module whose parameter names are the full model's
    (tok_embeddings.*, layers.<i>.*, norm.*, output.*): the optimizer, checkpoints and the gradient norm
    work on it as on the whole model. `run` feeds micro-batches through the schedule.

    With tied embeddings the first stage's embedding and the last stage's head are two copies of one
    weight; with multi-token prediction the last stage holds a copy of every embedding parameter under the
    first stage's names (and, tied, its head is that copy's token embedding). Either way the copies start
    equal (init is per name; a checkpoint holds the one name both load), `run` sums their gradients over the
    two ends (Megatron's embedding group), and identical AdamW updates keep them equal.
    """

    def __init__(self, parts: list[Transformer], stages: list[PipelineStage], schedule, loss: ScheduleLoss, tie_group):
        super().__init__()
        self.cfg = parts[0].cfg
        self.layers = nn.ModuleDict()
        for part in parts:
            for name in Transformer.FIRST_STAGE + Transformer.LAST_STAGE:
                if getattr(part, name, None) is not None:
                    setattr(self, name, getattr(part, name))
            self.layers.update(part.layers)
        self.stages, self.schedule, self.loss, self.tie_group = stages, schedule, loss, tie_group
        self.carries_documents = False  # set by the first micro-batches with document masks (see run)
        self.is_first = any(s.is_first for s in stages)
        self.is_last = any(s.is_last for s in stages)
        # This rank's copies, the first stage's before the last's (both on one rank only under ZBV, MTP-free)
        ends = [(part, stage.is_first) for part, stage in zip(parts, stages) if stage.is_first or stage.is_last]
        self.copies = [p for part, first in ends for p in embedding_copies(part, first)]
        # the last stage's: left out of the gradient norm, which counts each weight once
        self.duplicates = [p for part, first in ends if not first for p in embedding_copies(part, first)]
        self.mtp_here = getattr(self, "mtp", None) is not None

    @property
    def tied_copy(self) -> Optional[nn.Parameter]:
        """The head's weight when it is a second copy of the embedding under its own name (not the MTP stage's
        embedding copy itself): saved and loaded under the embedding's optimizer state."""
        head, embedding = getattr(self, "output", None), getattr(self, "tok_embeddings", None)
        if not self.cfg.tie_embeddings or head is None or (embedding is not None and embedding.weight is head.weight):
            return None
        return head.weight

    def train(self, mode: bool = True) -> "PipelineModel":
        """Also the stage modules' own flags (they are not children of this module): the last stage runs the MTP
        depths in training only."""
        for stage in self.stages:
            stage.submod.train(mode)
        return super().train(mode)

    def run(self, micro_batches: list[dict], loss_fn: LossFn, train: bool) -> Records:
        """Forward (and backward when `train`) over the micro-batches, already on the device; returns the
        loss records on the last stage, [] elsewhere. Training passes exactly the schedule's micro-batch
        count; evaluation may pass any number: they run in groups of that count, the last group filled
        up with copies whose loss mask is zero (their records are dropped)."""
        m = self.loss.count
        if train and len(micro_batches) != m:
            raise ValueError(f"the schedule was built for {m} micro-batches, got {len(micro_batches)}")
        if "documents" in micro_batches[0] and not self.carries_documents:  # a run's batches all have them or none
            for stage in self.stages:
                carry_documents(stage.submod)
            self.carries_documents = True
        records: Records = []
        for start in range(0, len(micro_batches), m):
            group = micro_batches[start : start + m]
            real = len(group)
            group += [dict(group[-1], loss_mask=torch.zeros_like(group[-1]["loss_mask"]))] * (m - real)
            records += self._run_group(group, loss_fn, train)[:real]
        if train:
            self._sum_copies_grads()
        return records

    def _run_group(self, micro_batches: list[dict], loss_fn: LossFn, train: bool) -> Records:
        b = micro_batches[0]["tokens"].shape[0]
        keys = ("tokens", "positions", "documents") if self.carries_documents else ("tokens",)
        args = tuple(torch.cat([mb[k] for mb in micro_batches]) for k in keys) if self.is_first else ()  # [m * b, s]
        # The schedule splits the target along dim 0 into the micro-batches: each gets its index b times.
        target = torch.arange(len(micro_batches)).repeat_interleave(b) if self.is_last else None
        # The MTP depths embed the tokens on the last stage: the schedule splits keyword inputs into micro-batches
        # as it does the first stage's and hands them to every stage of this rank (Transformer.forward's token_ids).
        kwargs = {"token_ids": torch.cat([mb["tokens"] for mb in micro_batches])} if self.mtp_here else {}
        self.loss.micro_batches, self.loss.fn, self.loss.records = micro_batches, loss_fn, {}
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, return_outputs=False, **kwargs)
        records = [self.loss.records[i] for i in sorted(self.loss.records)]
        self.loss.records, self.loss.micro_batches = {}, []
        return records

    def _sum_copies_grads(self) -> None:
        match_param_layouts(self.copies)  # each rank's own vocabulary rows, as on the other stage
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in self.copies]
        if self.tie_group is not None:
            for grad in grads:
                dist.all_reduce(grad, group=self.tie_group)
        elif grads:  # both ends on this rank (ZBV, tied: embedding and head); their shards line up
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])

    def forward(self, *args):
        raise RuntimeError("a pipeline stage runs through PipelineModel.run, not forward()")


def tie_group(mesh, schedule: str) -> Optional[dist.ProcessGroup]:
    """For each (dp, tp) position, the group of the ranks holding the first and the last stage; every rank
    takes part in creating every group. None when one rank holds both (ZBV)."""
    if schedule == "zbv":
        return None
    ranks = mesh.mesh  # [pp, dp, tp] global ranks
    mine = None
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    return mine


def whole_backward(part: nn.Module) -> Optional[Callable]:
    """For the MTP stage, a dw_builder whose weight step does nothing, so that the zero-bubble schedules' input step
    computes the stage's whole backward. torch 2.13 splits a stage's backward by grouping its parameters where
    their paths meet the input's (pipelining/_backward.py get_param_groups); its merge can leave one parameter in
    two groups, and the second group's weight step then backpropagates through a graph the first freed ("Trying to
    backward through the graph a second time"). The MTP stage's embedding copy, depth norms and head meet the
    hidden states at several places and do this (1 or 2 depths, tied or not, measured); the decoder's stages
    have not (tests/test_parallel.py's interleaved_zb links)."""
    return (lambda: lambda: None) if part.mtp is not None else None


def build_schedule(
    parts: list[nn.Module], stage_ids: list[int], parallel: ParallelConfig, pp_group, device, micro_batches: int
):
    """(this rank's PipelineStages, the configured schedule, its loss) over `parts` (possibly wrapped for
    data parallelism). Gradients are not rescaled: the loss is already divided by the step's tokens."""
    stages = [PipelineStage(part, i, parallel.num_stages, device, group=pp_group, dw_builder=whole_backward(part))
              for part, i in zip(parts, stage_ids)]
    loss = ScheduleLoss(micro_batches)
    owner = stages[0] if parallel.schedule in SINGLE_STAGE else stages
    schedule = SCHEDULES[parallel.schedule](owner, n_microbatches=micro_batches, loss_fn=loss, scale_grads=False)
    return stages, schedule, loss
