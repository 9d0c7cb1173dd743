#!/usr/bin/env python
"""Memory per GPU of a config at a layout: parameters, gradients, AdamW state and activations.

    python tools/estimate_memory.py --config configs/llama3_8b.yaml --dp 8 --parallel.tp 2 --parallel.pp 4 \\
        --training.micro_batch_size 1 --data.seq_len 8192
    python tools/estimate_memory.py --config configs/tiny.yaml --dp 2 --parallel.tp 2 --measure

Every pipeline stage is estimated (the first holds the embedding and the most micro-batches in flight,
the last the head and the logits); the largest is what a GPU must hold. With --measure the layout runs
on this machine's CPU (gloo, fp32, random tokens, three steps) and each rank's peak resident memory
above its state before the model was built is printed next to the estimate of its stage.

The model counts what this code keeps, measured with saved-tensor hooks on the tiny config:
  - parameters fp32 (4 B), gradients fp32 (4 B), AdamW exp_avg + exp_avg_sq (8 B); the fused AdamW
    step updates them in place, without temporaries;
  - FSDP2 shards all of them over dp, DDP none. Under a pipeline FSDP keeps the stage unsharded through
    the step (reshard_after_forward off) and accumulates unsharded gradients until the last micro-batch;
    DDP (FSDP2's replicate) computes with a second copy of the weights;
  - activations per token and layer, in elements: norms 4h (4h/tp + 2h gathered with sp); attention
    3 x heads x d + 2 x kv_heads x d (q and k after RoPE, v, SDPA output and its reshaped copy; MLA:
    attention_activations); MLP 3f;
    all but the norms divided by tp; plus one layer of one micro-batch more, for the gradients of the
    layer in its backward. With training.activation_checkpointing full a block keeps only its input
    (h; h/tp with sp), and the block in its backward its recomputed activations and their gradients
    (measured: about 1.5 layers of one micro-batch at the peak).
    Outside the blocks: the last stage keeps 3h + 3 x vocab/tp (final norm; logits, log-probabilities
    and, in the backward, their gradient; one more vocab/tp under loss_parallel, measured, and one more
    under a pipeline, whose last stage keeps its output);
  - micro-batches in flight on stage i of pp (Megatron's counting): 1 without a pipeline, m for GPipe,
    min(m, pp - i) for 1F1B and the zero-bubble schedules, pp x (1 + (pp - 1) / (pp x v)) for interleaved
    1F1B on the first rank.
  - a MoE layer: E / ep routed experts per rank, each a 1/tp slice of its inner width, and the shared
    experts split over tp like the dense MLP; FSDP shards the experts over the dp / ep ranks that hold the
    same ones; activations per token k x (2h + 3 x expert width / tp) + 3 x shared width / tp + E router
    scores (every tp rank routes the whole sequence) (configs/mixtral_tiny.yaml, micro-batch 2 x 256, CPU
    fp32: one process 1.37 GiB estimated, 1.24 measured; ep 2 over dp 2 with DDP 0.74 estimated, 0.77 measured;
    tp 2 0.72 estimated, 0.65 measured, where whole experts on each tp rank had 1.32 and 1.21).
  - multi-token prediction (model.mtp_layers, last stage): each depth's block counted as a decoder layer of
    the last layer's kind, its enorm, hnorm, eh_proj and norm whole on every tp rank; activations per depth
    the block's (its input under recompute), 8h around it and the head's 3-4 x vocab/tp logits, all depths
    alive together until the loss (configs/tiny.yaml, 2 depths, micro-batch 16 x 256, CPU fp32: 0.62 GiB
    estimated, 0.63 measured; with activation_checkpointing full 0.30 and 0.27).
Activations take 4 bytes per element in fp32 and about 2 under bf16 autocast (matmul inputs are saved
in bf16; the norms' fp32 internals make this a slight underestimate).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.config import Config, ModelConfig, ParallelConfig, load_config  # noqa: E402
from megatron_llm.model_config import LayerSpec  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.logging.progress import Progress  # noqa: E402
from megatron_llm.model import meta_model  # noqa: E402
from megatron_llm.parallel.pipeline import stage_layers, stages_of_rank  # noqa: E402
from megatron_llm.parallel.tensor_parallel import (  # noqa: E402
    ProjectionNorm,
    ShardedWithHeads,
    block_plan,
    padded_vocab_size,
)

GIB = 2**30
MEASURE_MAX_RANKS = 8  # --measure runs every rank as a process on this machine's CPUs
RANK_BASE_BYTES = 400 * 2**20  # a rank's resident memory before the model: Python, torch, gloo (~300 MiB measured)


@dataclass
class StageMemory:
    rank: int  # pp rank
    params: int  # parameters held by one GPU of this pp rank (after tp and FSDP sharding)
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    unsharded_bytes: float  # FSDP's gathered parameters and gradients, alongside the activations

    @property
    def total(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.unsharded_bytes


def layer_params(block: nn.Module, tp: int, ep: int) -> tuple[int, int]:
    """(routed experts, everything else) parameters one rank holds of a block, counted on the meta model with
    the tensor-parallel plan the run applies (parallel/tensor_parallel.py): column-parallel weights and biases,
    row-parallel weights and a norm over a whole projection 1/tp; the routed experts E / ep experts of 1/tp
    inner width each (parallel/expert_parallel.py); everything else (norms, router, MLA's compressed
    projections) whole."""
    plan = block_plan(block, sp=False)
    routed = rest = 0
    for name, param in block.named_parameters():
        module, kind = name.rsplit(".", 1)
        style = plan.get(module)
        split = isinstance(style, (ColwiseParallel, ProjectionNorm, ShardedWithHeads))
        split |= isinstance(style, RowwiseParallel) and kind == "weight"  # its bias is added once, whole
        if module.endswith("feed_forward.experts"):  # w2's bias is whole over tp (expert_parallel.py)
            routed += param.numel() // (ep * (1 if kind == "w2_bias" else tp))
        elif split:
            rest += param.numel() // tp
        else:
            rest += param.numel()
    return routed, rest


def outer_params(model: nn.Module, m: ModelConfig, tp: int, vocab: int) -> tuple[int, int, int]:
    """Parameters per rank outside the blocks: (the vocabulary table, the rest of the first stage, the rest of
    the last stage). The embedding and the head are vocabulary-parallel (`vocab` rows, padded to 128 x tp); the
    first stage also holds learned positions, the last the final norm and a head bias. A tied head is the
    embedding's table, held again by a last stage that is not the first (PipelineModel.tied_copy)."""
    positions = sum(p.numel() for p in model.pos_embeddings.parameters()) if model.pos_embeddings is not None else 0
    head_bias = vocab // tp if model.output is not None and model.output.bias is not None else 0
    return vocab * m.hidden_size // tp, positions, head_bias + sum(p.numel() for p in model.norm.parameters())


def mtp_params(model: nn.Module, tp: int, ep: int) -> tuple[int, int]:
    """(routed experts, everything else) parameters one rank holds of the multi-token prediction depths (last stage):
    each depth's block as a decoder block, its enorm, hnorm, eh_proj and final norm whole on every tp rank
    (tensor_parallel.mtp_plan replicates them)."""
    routed = rest = 0
    for layer in model.mtp.layers.values() if model.mtp is not None else ():
        block_routed, block_rest = layer_params(layer.block, tp, ep)
        routed += block_routed
        rest += block_rest + sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("block."))
    return routed, rest


def activations_per_token_layer(m: ModelConfig, tp: int, sp: bool, moe: bool = False, spec: LayerSpec | None = None) -> float:
    """A MoE layer keeps the MLP's 3 widths (split by tp) for each of a token's k experts and the shared ones,
    and its input and output rows and router scores for the whole sequence on every tp rank."""
    h, f = m.hidden_size, m.ffn_hidden_size
    norms = 4 * h / tp + 2 * h if sp and tp > 1 else 4 * h
    attention, whole = attention_activations(m, spec)
    unsplit = norms + whole
    if moe:
        routed = m.moe_top_k * (2 * h + 3 * m.moe_ffn_hidden_size / tp) + 3 * m.moe_shared_ffn_hidden_size / tp
        return unsplit + attention / tp + routed + m.moe_experts
    return unsplit + (attention + 3 * f) / tp


def attention_activations(m: ModelConfig, spec: LayerSpec | None = None) -> tuple[int, int]:
    """(split over tp, whole on every rank) elements an attention keeps per token. Grouped-query: q and k
    after RoPE, v, the SDPA output and its reshaped copy. MLA: the query projection, the query and key with
    their RoPE parts joined, the heads' keys and values from the latent, the output and its copy; whole: the
    compressed query and its norm, the latent with the RoPE key, and its norm (configs/tiny.yaml with MLA,
    q_lora 48, latent 32, rope 8, v 16, micro-batch 16 x 256, --measure: 0.41 GiB estimated, 0.42 measured)."""
    d, heads = (spec and spec.head_dim) or m.head_dim, m.num_heads  # the layer's own width (Gemma 4's full layers)
    if m.attention == "mla":
        v, rope, latent = m.mla_v_head_dim, m.mla_rope_head_dim, m.mla_kv_lora_rank
        whole = 2 * latent + rope + (2 * m.mla_q_lora_rank if m.mla_q_lora_rank is not None else 0)
        return 3 * heads * d + heads * (d - rope + v) + 2 * heads * v, whole
    return 3 * heads * d + 2 * ((spec and spec.kv_heads) or m.num_kv_heads) * d, 0


def mtp_activations_per_token(m: ModelConfig, tp: int, sp: bool, vocab: int, recompute: bool) -> float:
    """One multi-token prediction depth (model/mtp.py): its block as a decoder layer of the last layer's kind (only
    its input under recompute), around it the shifted tokens' embedding, enorm and hnorm, their concatenation
    (2h), eh_proj's output and the final norm (8h, a sequence shard under sp), and its logits as the main head's
    (logits, log-probabilities, their gradient; the masked logits under loss_parallel): all depths' logits are
    alive together until the loss."""
    h = m.hidden_size / tp if sp and tp > 1 else m.hidden_size
    block = h if recompute else activations_per_token_layer(m, tp, sp, moe=m.layer(m.num_layers - 1).moe)
    return block + 8 * h + (3 + (tp > 1)) * vocab / tp


def in_flight(parallel: ParallelConfig, pp_rank: int, micro_batches: int) -> float:
    """Micro-batches whose activations a pp rank holds at its peak, in units of all its layers."""
    pp, v = parallel.pp, parallel.virtual_stages
    if pp == 1:
        return 1
    if parallel.schedule == "gpipe":
        return micro_batches
    if parallel.schedule == "interleaved_1f1b":  # Megatron's interleaved-schedule memory, first rank
        return min(micro_batches, pp * (1 + (pp - 1) / (pp * v)) - pp_rank)
    if parallel.schedule == "zbv":  # each rank's V of two chunks balances memory: as 1F1B's first rank
        return min(micro_batches, pp)
    return min(micro_batches, pp - pp_rank)


def estimate(cfg: Config, dp: int, act_bytes: float) -> list[StageMemory]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tp, p.pp
    vocab = padded_vocab_size(m.vocab_size, tp) if tp > 1 else m.vocab_size
    model = meta_model(m)
    held = [layer_params(model.layers[str(i)], tp, p.ep) for i in range(m.num_layers)]  # (routed, rest) per layer
    table, first_rest, last_rest = outer_params(model, m, tp, vocab)
    mtp_routed, mtp_rest = mtp_params(model, tp, p.ep)
    layers = stage_layers(m.num_layers, p)
    tokens = t.micro_batch_size * cfg.data.seq_len
    fsdp = p.data_parallel == "fsdp" and dp > 1
    out = []
    for rank in range(pp):
        stages = stages_of_rank(rank, p)
        first, last = 0 in stages, p.num_stages - 1 in stages
        mine = [i for s in stages for i in layers[s]]
        n_layers = len(mine)
        routed = sum(held[i][0] for i in mine) + (mtp_routed if last else 0)
        full = routed + sum(held[i][1] for i in mine)  # this rank's parameters before FSDP
        full += table + first_rest if first else 0
        full += last_rest + mtp_rest + (0 if m.tie_embeddings and first else table) if last else 0  # a tied head counts once
        # the MTP stage's copy of the embedding (parallel/pipeline.py); tied, the head above is its table
        full += first_rest + (0 if m.tie_embeddings else table) if last and m.mtp_layers and not first else 0
        # FSDP shards the experts over the dp / ep ranks holding the same ones, the rest over dp
        params = math.ceil((full - routed) / dp) + math.ceil(routed * p.ep / dp) if fsdp else full
        per_layer = activations_per_token_layer(m, tp, p.sp)
        if n_layers:  # the mean over this rank's layers (dense or MoE, each attention at its own width)
            per_layer = sum(activations_per_token_layer(m, tp, p.sp, m.layer(i).moe, m.layer(i)) for i in mine) / n_layers
        layers_in_flight = n_layers * in_flight(p, rank, t.grad_accum_steps)
        if t.activation_checkpointing == "full":  # blocks keep their input; the one in its backward recomputes
            acts = (m.hidden_size / tp if p.sp else m.hidden_size) * layers_in_flight + 1.5 * per_layer
        else:  # + one layer of one micro-batch: the backward of a layer holds gradients as large as its activations
            acts = per_layer * (layers_in_flight + 1)
        if last:  # final norm; logits, log-probabilities, their gradient (+ the masked logits under loss_parallel;
            # + the logits a pipeline stage keeps as its output until the backward)
            acts += 3 * m.hidden_size + (3 + (tp > 1) + (pp > 1)) * vocab / tp
            acts += m.mtp_layers * mtp_activations_per_token(m, tp, p.sp, vocab, t.activation_checkpointing == "full")
        block = max(sum(held[i]) for i in mine)
        if fsdp and pp > 1:  # unsharded stage and gradients through the step
            unsharded = 8 * full
        elif fsdp:  # the current and the prefetched block, with their gradients
            unsharded = 2 * 8 * block
        elif dp > 1:  # DDP is FSDP2's replicate: the weights it computes with are a second copy (not of
            # experts split over all of dp, which no data-parallel unit holds)
            unsharded = 4 * (full - (routed if p.ep == dp else 0))
        else:
            unsharded = 0
        activations = acts * tokens * act_bytes
        out.append(StageMemory(rank, params, 4 * params, 4 * params, 8 * params, activations, unsharded))
    return out


def report(cfg: Config, dp: int, stages: list[StageMemory], measured: dict[int, float] | None = None) -> None:
    p = cfg.parallel
    print(f"layout tp={p.tp} pp={p.pp} dp={dp} ({p.data_parallel}, sp={p.sp}, schedule={p.schedule}), "
          f"micro-batch {cfg.training.micro_batch_size} x {cfg.data.seq_len} tokens, "
          f"{cfg.training.grad_accum_steps} micro-batches; GiB per GPU")
    columns = ["weights", "grads", "AdamW", "activ.", "FSDP", "total"]
    print(f"{'pp rank':>7} {'params':>14}" + "".join(f" {c:>8}" for c in columns) + ("  measured" if measured else ""))
    for s in stages:
        values = [s.param_bytes, s.grad_bytes, s.optimizer_bytes, s.activation_bytes, s.unsharded_bytes, s.total]
        row = f"{s.rank:>7} {s.params:>14,}" + "".join(f" {v / GIB:>8.2f}" for v in values)
        if measured and s.rank in measured:
            row += f"  {measured[s.rank] / GIB:>8.2f} ({measured[s.rank] / s.total - 1:+.0%})"
        print(row)


# ---------------------------------------------------------------------------------------------
# Measuring on CPU: one process per rank over gloo, the real parallelize/train_step, random tokens.


def _measure_rank(rank: int, world: int, port: int, config: str, overrides: list[str], replies) -> None:
    import torch

    from megatron_llm.data.synthetic import random_batches
    from megatron_llm.parallel import init_distributed, parallelize_from_config
    from megatron_llm.training.metrics import peak_resident_bytes, resident_bytes
    from megatron_llm.training.optimizer import build_optimizer
    from megatron_llm.training.step import train_step

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    t = cfg.training
    device = torch.device("cpu")
    dims = init_distributed(cfg.parallel, device)
    base = resident_bytes()
    model = parallelize_from_config(cfg, dims, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    batches = random_batches(cfg, device, seed=dims.dp_rank)
    for _ in range(3):  # the first step creates the AdamW state; the peak comes after
        train_step(model, optimizer, batches, dims, z_loss=t.z_loss, grad_clip=cfg.optimizer.grad_clip, autocast=None)
    peak = peak_resident_bytes() - base
    pp_rank = dims.mesh["pp"].get_local_rank()
    torch.distributed.destroy_process_group()
    replies.put((pp_rank, peak))


def check_measurable(stages: list[StageMemory], cfg: Config, dp: int) -> None:
    """Refuses a layout this machine cannot run for --measure: too many ranks for its CPUs, or more memory
    than it has available (every rank's estimate, in fp32, plus each process's own)."""
    p = cfg.parallel
    world = p.tp * p.pp * dp
    if world > MEASURE_MAX_RANKS:
        raise UsageError(
            f"--measure runs {world} ranks (tp x pp x dp) as processes here, more than {MEASURE_MAX_RANKS}: "
            "measure a smaller layout, or drop --measure for the estimate alone"
        )
    needed = sum(s.total for s in stages) * p.tp * dp + world * RANK_BASE_BYTES
    available = _available_bytes()
    if needed > available:
        raise UsageError(
            f"--measure needs about {needed / GIB:.1f} GiB for {world} rank(s) but this machine has {available / GIB:.1f} GiB "
            "available: measure a smaller model (e.g. --model.num_layers 2) or drop --measure for the estimate alone"
        )


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024  # kB


def _collect(procs: list, replies, progress: Progress) -> list:
    """Every rank's reply; fails as soon as a rank died without one, instead of waiting for it."""
    import queue

    results = []
    while len(results) < len(procs):
        try:
            results.append(replies.get(timeout=1))
        except queue.Empty:
            dead = [rank for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()  # the others wait for it in a collective
                raise UsageError(f"rank {dead[0]} of the measurement exited with code {procs[dead[0]].exitcode} (its error is above)")
        progress.update(len(results))
    progress.close()
    return results


def measure(config: str, overrides: list[str], world: int) -> dict[int, float]:
    """pp rank -> the largest peak over its ranks, in bytes above the state before the model was built."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Large blocks straight from mmap and back on free: resident memory then follows live tensors, where
    # glibc's adaptive threshold would keep freed blocks of up to 32 MB in the heap.
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    ctx = multiprocessing.get_context("spawn")
    replies = ctx.Queue()
    procs = [ctx.Process(target=_measure_rank, args=(r, world, port, config, overrides, replies)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = _collect(procs, replies, Progress(f"measuring {world} ranks (three steps each)", world, "ranks"))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    peaks: dict[int, float] = {}
    for pp_rank, peak in results:
        peaks[pp_rank] = max(peaks.get(pp_rank, 0), peak)
    return peaks


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (world = tp x pp x dp)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="activations; default: bf16 unless --measure"
    )
    parser.add_argument("--measure", action="store_true", help="run the layout on CPU and compare")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.dp <= 0:
            raise UsageError(f"--dp must be positive (the data-parallel size), got {args.dp}")
        cfg = load_config(args.config, overrides)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("fp32" if args.measure else "bf16")
    stages = estimate(cfg, args.dp, 4 if dtype == "fp32" else 2)
    if args.measure:
        try:
            check_measurable(stages, cfg, args.dp)
            measured = measure(args.config, overrides, cfg.parallel.tp * cfg.parallel.pp * args.dp)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    else:
        measured = None
    report(cfg, args.dp, stages, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
