"""Training-step speed against a reference run in the same process: Hugging Face, or ours without per-channel loss.

    python tools/benchmark.py --config configs/tiny.yaml
    python tools/benchmark.py --config configs/llama_100m.yaml --steps 10 --warmup 1
    python tools/benchmark.py --config configs/llama3.2_1b.yaml --device cuda --dtype bf16 --data.seq_len 2048
    torchrun --nproc_per_node 4 tools/benchmark.py --config configs/tiny.yaml --parallel.tp 2 --parallel.pp 2
    python tools/benchmark.py --config configs/tiny.yaml --reference channels-off
    python tools/benchmark.py --config configs/tiny.yaml --family gemma2     # any registered model_type
    python tools/benchmark.py --config configs/mixtral_tiny.yaml --family mixtral
    python tools/benchmark.py --config configs/mixtral_tiny.yaml --reference dense   # MoE vs its active FLOPs

--reference hf (the default in one process):

Both models start from the same weights (ours, copied into HF through the checkpoint table), see the
same random token batch (training.micro_batch_size x data.seq_len, training.grad_accum_steps
micro-batches) and take the same clipped AdamW step: the same hyperparameters, the same param groups
(no decay on norms and the embedding, mapped by name) and the same foreach/fused choice. Ours runs
`train_step`, the very step train.py runs; HF runs a plain loop (forward to logits, the token-mean
cross-entropy in fp32, backward, clip_grad_norm_, step, zero_grad) with SDPA attention and no KV cache.
Steps alternate between the two (ours first on even steps, HF first on odd ones) so machine noise
hits both; medians are reported. The first-step losses and gradient norms are printed side by side:
they agree to ~1e-5 in fp32 when both compute the same function. (A family whose transformers embedding
has a padding_idx, Gemma's, gives that row no lookup gradient; random tokens hit it, so its gradient
norms differ by ~1e-4 while the losses are equal.) `--family MODEL_TYPE` compares any registered family,
loading transformers' side from an exported directory as a user would.

--reference channels-off (the default under torchrun, any layout): our parallelised model, built as
train.py builds it, alternates steps with per-channel accounting on (logging.per_channel, as trained)
and off, on random tokens from 8 random channels. Besides the two speeds it prints each rank's peak
memory (CUDA: allocated; CPU: resident, above the process before the model was built) and, with a
pipeline, the measured bubble: the share of each rank's schedule time spent blocked waiting on its
pipeline peers for activations or gradients, next to the theoretical (pp - 1) / (v m + pp - 1) for m
micro-batches and v stages per rank (GPipe and 1F1B: v = 1; the zero-bubble schedules aim below it).
A step's time is its slowest rank's.

--reference dense (a MoE config, one process): our MoE alternates steps with the dense model of its active
FLOPs (every MoE layer's feed-forward one MLP as wide as the k routed experts and the shared ones). Besides
the two speeds it prints where the overhead goes: each side's AdamW update, which grows with the parameters;
on CPU, the time inside the MoE layers' feed-forward slots in the same steps (the MoE's split into its routed
experts and the routing around them) against the dense MLPs, and so the overhead that would remain with no
routing at all; and one layer's experts alone against one dense MLP of their FLOPs, which shows the matmuls'
efficiency at the rows each expert gets.

On CPU the process keeps the host memory it frees, as train.py does (training/host_memory.py), for both sides.
"""

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import schedules

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import (Runner, alternate, cpu_line, machine_line, our_runner, speed_table, state_bytes,  # noqa: E402
                         clock, module_seconds, synchronize, update_seconds)

from megatron_llm.checkpoint.families import family  # noqa: E402
from megatron_llm.checkpoint.hf import hf_config_from_model_config, native_to_hf  # noqa: E402
from megatron_llm.config import Config, ModelConfig, load_config  # noqa: E402
from megatron_llm.data.synthetic import random_batches  # noqa: E402
from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.model import FeedForward, build_model, flops_per_token  # noqa: E402
from megatron_llm.model.moe import GroupedExperts  # noqa: E402
from megatron_llm.parallel import ParallelDims, PipelineModel, init_distributed, parallelize_from_config  # noqa: E402
from megatron_llm.parallel.dims import pick_device  # noqa: E402
from megatron_llm.training.host_memory import keep_freed_host_memory  # noqa: E402
from megatron_llm.training.metrics import peak_flops, peak_resident_bytes, resident_bytes  # noqa: E402
from megatron_llm.training.optimizer import build_optimizer  # noqa: E402
from megatron_llm.training.step import autocast_dtype, train_step  # noqa: E402

CHANNELS = 8  # random channel ids of the channels-off comparison
MIB = 2**20


def import_transformers():
    """Hugging Face transformers, needed by --reference hf only: the other comparison runs without it."""
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "--reference hf compares with Hugging Face transformers, which is not installed: "
            'pip install transformers (or pip install -e ".[hf]"), or use --reference channels-off'
        ) from None
    return transformers


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                "max_seq_len")
# A mixture of experts keeps its experts' count, width and choice (top-k, groups): transformers' defaults are a full-size
# model's (DeepSeek-V3's 256 experts of 2048, Qwen3-MoE's 128, would not fit this machine at hidden 512).
MOE_SHAPE_FIELDS = ("moe_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_groups", "moe_topk_groups")
# Linear-attention layers keep their heads and widths too (Qwen3-Next's defaults are 16 + 32 heads of 128).
LINEAR_SHAPE_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")


def family_model(cfg: Config, model_type: str) -> None:
    """Replaces cfg.model with `model_type`'s architecture at the config's shape: transformers' default config of
    the family, its shape keys set from ours through the family table, read back as our model. A sliding
    window (where the family has one) is set to half the sequence, so that it is exercised."""
    transformers = import_transformers()
    table = family(model_type)
    experts = {f: getattr(cfg.model, f) for f in MOE_SHAPE_FIELDS} if cfg.model.moe_experts else {}
    linear = LINEAR_SHAPE_FIELDS if cfg.model.linear_num_key_heads else ()
    fields = (*SHAPE_FIELDS, *experts, *linear)  # through the table where it maps a field one to one
    shape = {e.hf: e.write(getattr(cfg.model, e.ours)) for e in table.config if getattr(e, "ours", None) in fields}
    hf = {**transformers.AutoConfig.for_model(model_type).to_dict(), **shape}
    hf.update(num_key_value_heads=cfg.model.num_kv_heads, head_dim=cfg.model.head_dim)  # derived keys of most tables
    if hf.get("sliding_window"):
        hf["sliding_window"] = cfg.data.seq_len // 2
    if hf.get("layer_types"):  # the family's pattern, repeated over our layer count
        hf["layer_types"] = [hf["layer_types"][i % len(hf["layer_types"])] for i in range(cfg.model.num_layers)]
    cfg.model = dataclasses.replace(table.read_config(hf), **experts)  # and set where it derives it (an expert count)
    cfg.model.validate()


def hf_twin(model: nn.Module, model_type: str, device: torch.device) -> nn.Module:
    """transformers' model of `model_type` with `model`'s config and weights, loaded the way a user loads an
    exported checkpoint (from_pretrained applies transformers' own renames of old tensor names); eager
    attention where the family's soft-cap needs it (as transformers advises), else its default."""
    import tempfile

    from safetensors.torch import save_file

    transformers = import_transformers()
    config = hf_config_from_model_config(model.cfg, model_type)
    state = {k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "output.weight")}
    tensors = native_to_hf(state, model.cfg, model_type)  # a tied head is re-tied on load, as in an export
    extra = {"attn_implementation": "eager"} if model.cfg.attn_softcap else {}
    # Ours has no dropout; transformers' GPT-2-era configs default theirs to 0.1 where config.json is silent.
    config.update({key: 0.0 for key, value in transformers.AutoConfig.for_model(model_type).to_dict().items()
                   if key.endswith(("pdrop", "dropout")) and isinstance(value, float) and value and key not in config})
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, **extra)
    return hf.to(device).train()


def matching_optimizer(optimizer: torch.optim.Optimizer, hf: nn.Module) -> torch.optim.Optimizer:
    """An AdamW over `hf` with `optimizer`'s settings and its no-decay rule (norms, biases and the embedding:
    training/optimizer.py), applied to transformers' own parameters: fused tensors (q/k/v, gate/up) have no
    one-to-one counterpart, so groups follow the rule rather than a name map."""
    embedding = hf.get_input_embeddings().weight
    decay, no_decay = optimizer.param_groups[-1]["weight_decay"], optimizer.param_groups[0]["weight_decay"]
    groups: dict[float, list] = {}
    for param in hf.parameters():  # a tied head is yielded once, as the embedding
        rate = no_decay if param.ndim < 2 or param is embedding else decay
        groups.setdefault(rate, []).append(param)
    # Each group carries every setting; foreach and fused are also read from the defaults when built.
    return torch.optim.AdamW([{"params": ps, "weight_decay": rate} for rate, ps in groups.items()],
                             **{k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "foreach", "fused")})


def hf_step(hf, optimizer, micro_batches: list[dict], *, grad_clip: float, autocast, aux_coeff: float = 0.0
            ) -> tuple[float, float]:
    """A plain Hugging Face training step: token-mean cross-entropy over all micro-batches' tokens, plus, for a
    mixture of experts, `aux_coeff` x transformers' load-balancing loss averaged over the micro-batches (as
    train_step adds it; the reported loss is the cross-entropy, as ours)."""
    step_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches)
    loss_sum = 0.0
    for mb in micro_batches:
        with torch.autocast(mb["tokens"].device.type, dtype=autocast, enabled=autocast is not None):
            out = hf(input_ids=mb["tokens"], use_cache=False, **({"output_router_logits": True} if aux_coeff else {}))
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="none")
        loss = (ce * mb["loss_mask"].flatten()).sum() / step_tokens
        (loss + aux_coeff * out.aux_loss / len(micro_batches) if aux_coeff else loss).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), grad_clip or float("inf"))
    loss_value, norm_value = torch.stack([loss_sum, grad_norm]).tolist()  # one host sync, as train_step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def build_runners(cfg: Config, model_type: str, device: torch.device, autocast) -> tuple[Runner, Runner]:
    model = build_model(cfg.model, device, seed=cfg.training.seed)
    hf = hf_twin(model, model_type, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    hf_optimizer = matching_optimizer(optimizer, hf)
    batches = random_batches(cfg, device, cfg.training.seed)
    aux = cfg.model.moe_aux_loss_coeff if cfg.model.moe_experts else 0.0

    def theirs_step() -> tuple[float, float]:
        return hf_step(hf, hf_optimizer, batches, grad_clip=cfg.optimizer.grad_clip, autocast=autocast, aux_coeff=aux)

    # Read when measured: AdamW state only exists after the first step.
    theirs = Runner(theirs_step, lambda: state_bytes(hf, hf_optimizer))
    return our_runner(cfg, model, optimizer, batches, autocast), theirs


def benchmark(cfg: Config, model_type: str, steps: int, warmup: int, device: torch.device, autocast) -> tuple[Runner, Runner]:
    if cfg.training.z_loss:
        raise UsageError("the Hugging Face side has no z-loss: run with --training.z_loss 0")
    ours, theirs = build_runners(cfg, model_type, device, autocast)
    alternate(ours, theirs, warmup, device, record=False)
    alternate(ours, theirs, steps, device, record=True)
    return ours, theirs


def report(cfg: Config, ours: Runner, theirs: Runner, device: torch.device, autocast) -> str:
    t = cfg.training
    tokens = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps
    peak = peak_flops(device)
    (loss_a, norm_a), (loss_b, norm_b) = ours.first, theirs.first
    lines = [
        machine_line(device, autocast, f"transformers {import_transformers().__version__}, "),
        f"model {cfg.model.num_params() / 1e6:.1f}M params, {t.micro_batch_size} x {cfg.data.seq_len} tokens"
        f" x {t.grad_accum_steps} micro-batches = {tokens} tokens/step; {len(ours.seconds)} timed steps each,"
        " interleaved; medians",
        f"first-step loss:      ours {loss_a:.6f}  HF {loss_b:.6f}  |diff| {abs(loss_a - loss_b):.1e}",
        f"first-step grad norm: ours {norm_a:.6f}  HF {norm_b:.6f}  |diff| {abs(norm_a - norm_b):.1e}",
        "",
    ]
    mfu_scale = flops_per_token(cfg.model, cfg.data.seq_len) / peak if peak else None
    lines += speed_table(tokens, ours.seconds, theirs.seconds, ("ours", "HF"), mfu_scale)
    if device.type == "cpu":
        lines.append(cpu_line(ours, theirs, ("ours", "HF")))
    if device.type == "cuda":
        gib = [r.peak_bytes / 2**30 for r in (ours, theirs)]
        lines.append(f"{'peak GiB':14}{gib[0]:14.2f}{gib[1]:14.2f}{gib[0] / gib[1]:10.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --reference dense: a mixture of experts against the dense model of its active FLOPs, both ours.


def dense_twin(model: ModelConfig) -> ModelConfig:
    """Every layer's feed-forward as one MLP as wide as what a token of `model` passes through: its k routed
    experts and the shared ones. The attention, embedding and head are the same: so are the active FLOPs
    (the router's E x hidden per token aside)."""
    if not model.moe_experts:
        raise UsageError("--reference dense compares a mixture of experts with its dense twin: set model.moe_experts")
    width = model.moe_top_k * model.moe_ffn_hidden_size + model.moe_shared_ffn_hidden_size
    return dataclasses.replace(model, moe_experts=0, ffn_hidden_size=width, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)


def expert_matmuls(model: ModelConfig, tokens: int, device: torch.device, autocast, repeats: int) -> tuple[float, float]:
    """Median seconds of a forward and backward through one layer's routed experts, on tokens x k rows spread
    evenly over them (the routing left out), and through one dense MLP as wide as the k experts a token passes,
    on the tokens, interleaved: the same FLOPs, but each expert's matrix multiplies get E / k times fewer rows
    than the dense MLP's."""
    torch.manual_seed(0)
    experts = GroupedExperts(model).to(device)
    mlp = FeedForward(model, model.moe_top_k * model.moe_ffn_hidden_size).to(device)
    for param in [*experts.parameters(), *mlp.parameters()]:
        nn.init.normal_(param, std=0.02)
    k, e = model.moe_top_k, model.moe_experts
    counts = torch.full((e,), tokens * k // e, device=device)
    counts[: tokens * k % e] += 1
    rows = torch.randn(tokens * k, model.hidden_size, device=device, requires_grad=True)
    x = torch.randn(tokens, model.hidden_size, device=device, requires_grad=True)
    grads = torch.randn_like(rows.detach()), torch.randn_like(x.detach())
    passes = (lambda: experts(rows, counts).backward(grads[0]), lambda: mlp(x).backward(grads[1]))
    seconds: tuple[list[float], list[float]] = ([], [])
    now = clock(device)
    for i in range(repeats + 1):  # the first of each untimed
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            synchronize(device)
            start = now()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                passes[j]()
            synchronize(device)
            if i:
                seconds[j].append(now() - start)
            for param in [*experts.parameters(), *mlp.parameters(), rows, x]:
                param.grad = None
    return statistics.median(seconds[0]), statistics.median(seconds[1])


def benchmark_dense(cfg: Config, steps: int, warmup: int, device: torch.device, autocast) -> str:
    batches = random_batches(cfg, device, cfg.training.seed)
    runners, updates, slots = [], [], []
    moe_layers = [str(i) for i in range(cfg.model.num_layers) if cfg.model.layer(i).moe]
    for model_cfg in (cfg.model, dense_twin(cfg.model)):
        model = build_model(model_cfg, device, seed=cfg.training.seed)
        optimizer = build_optimizer(model, cfg.optimizer)
        updates.append(update_seconds(optimizer, device))
        if device.type == "cpu":  # the feed-forward slots of the MoE layers and, on the MoE side, its experts
            feed_forwards = [model.layers[i].feed_forward for i in moe_layers]
            slots.append(module_seconds(feed_forwards, optimizer))
            if model_cfg.moe_experts:
                experts_in_step = module_seconds([f.experts for f in feed_forwards], optimizer)
        runners.append(our_runner(cfg, model, optimizer, batches, autocast))
    alternate(*runners, warmup, device, record=False)
    alternate(*runners, steps, device, record=True)
    t, dense = cfg.training, dense_twin(cfg.model)
    tokens = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps
    lines = [
        machine_line(device, autocast),
        f"MoE {cfg.model.num_params() / 1e6:.1f}M params ({cfg.model.moe_experts} experts, top-{cfg.model.moe_top_k});"
        f" dense twin {dense.num_params() / 1e6:.1f}M params (ffn {dense.ffn_hidden_size}), the MoE's active ones;"
        f" {tokens} tokens/step; {steps} timed steps each, interleaved; medians",
        "",
        *speed_table(tokens, runners[0].seconds, runners[1].seconds, ("MoE", "dense"), None),
    ]
    overhead = statistics.median(runners[0].seconds) / statistics.median(runners[1].seconds) - 1
    lines.append(f"MoE overhead over the dense model of equal active FLOPs: {overhead:+.1%} step time")
    update_ms = [statistics.median(u[-steps:]) * 1e3 for u in updates]
    clock_name = " (CPU time)" if device.type == "cpu" else ""
    lines.append(f"of which the AdamW update{clock_name}: MoE {update_ms[0]:.1f}, dense {update_ms[1]:.1f} ms/step,"
                 f" over {cfg.model.num_params() / 1e6:.1f}M and {dense.num_params() / 1e6:.1f}M parameters")
    if slots:
        slot_ms = [statistics.median(x[-steps:]) * 1e3 for x in slots]
        experts_ms = statistics.median(experts_in_step[-steps:]) * 1e3
        dense_step_ms = statistics.median(runners[1].cpu_seconds) * 1e3
        lines.append(f"inside the steps (CPU time), the {len(moe_layers)} MoE layers' feed-forward slots forward and"
                     f" backward: MoE {slot_ms[0]:.1f} ms (its routed experts {experts_ms:.1f}, the rest"
                     f" {slot_ms[0] - experts_ms:.1f}), dense MLPs {slot_ms[1]:.1f} ms")
        if not cfg.model.moe_shared_ffn_hidden_size:  # else the dense MLPs also do the shared experts' work
            floor = (experts_ms - slot_ms[1] + update_ms[0] - update_ms[1]) / dense_step_ms
            lines.append(f"the experts' extra time over the dense MLPs and AdamW's: {floor:+.1%} of the dense step"
                         " (the overhead without any routing)")
    micro_batch = t.micro_batch_size * cfg.data.seq_len
    rows = micro_batch * cfg.model.moe_top_k
    experts_ms, mlp_ms = (x * 1e3 for x in expert_matmuls(cfg.model, micro_batch, device, autocast, max(steps, 5)))
    lines.append(f"one layer's experts alone (no routing; a micro-batch's {rows} rows, {rows // cfg.model.moe_experts}"
                 f" per expert){clock_name}: {experts_ms:.1f} ms forward and backward, one dense MLP of their FLOPs {mlp_ms:.1f} ms"
                 f" ({experts_ms / mlp_ms:.3f}x)")
    if device.type == "cpu":
        lines.append(cpu_line(*runners, ("MoE", "dense")))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --reference channels-off: our parallelised model, per-channel accounting on against off.


class PeerWaits:
    """Seconds this pipeline rank spends in its schedule, and blocked on its peers within it.

    Every schedule of torch.distributed.pipelining waits for its sends and receives through
    schedules._wait_batch_p2p: timing that function, and the schedule's step, measures the bubble from
    the outside without changing any schedule."""

    def __init__(self, model: PipelineModel, device: torch.device):
        self.model, self.device = model, device
        self.waiting = self.scheduled = 0.0

    @contextlib.contextmanager
    def installed(self):
        wait = schedules._wait_batch_p2p
        schedules._wait_batch_p2p = self._timed(wait, "waiting")
        self.model.schedule.step = self._timed(self.model.schedule.step, "scheduled")
        try:
            yield self
        finally:
            schedules._wait_batch_p2p = wait
            del self.model.schedule.step  # the class's method again

    def reset(self) -> None:
        self.waiting = self.scheduled = 0.0

    @property
    def fraction(self) -> float:
        return self.waiting / self.scheduled

    def _timed(self, fn, counter: str):
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - start)
            return out

        return timed

    def _sync(self) -> None:
        # NCCL's wait() only orders the GPU's streams: synchronising before and after it times the wait
        # itself, not the compute queued ahead of it.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def benchmark_layout(cfg: Config, steps: int, warmup: int, device: torch.device, autocast) -> Optional[str]:
    """Runs on every rank of the layout; returns the report on rank 0, None on the others."""
    dims = init_distributed(cfg.parallel, device, cfg.parallel.timeout_s)
    base = resident_bytes()
    t = cfg.training
    model = parallelize_from_config(cfg, dims, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    batches = random_batches(cfg, device, t.seed + dims.dp_rank, CHANNELS)

    def step(num_channels: int) -> tuple[float, float]:
        result = train_step(
            model, optimizer, batches, dims, z_loss=t.z_loss, grad_clip=cfg.optimizer.grad_clip, autocast=autocast,
            num_channels=num_channels,
        )
        return result.loss, result.grad_norm

    on, off = Runner(lambda: step(CHANNELS)), Runner(lambda: step(0))
    waits = PeerWaits(model, device) if isinstance(model, PipelineModel) else None
    with waits.installed() if waits else contextlib.nullcontext():
        alternate(on, off, warmup, device, record=False)
        if waits:
            waits.reset()
        alternate(on, off, steps, device, record=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_resident_bytes() - base
    coords = tuple(dims.mesh[d].get_local_rank() for d in ("pp", "dp", "tp"))
    coords += (dims.expert_mesh["ep"].get_local_rank(),) if dims.ep > 1 else ()  # which E / ep experts it holds
    mine = {"coords": coords, "on": on.seconds, "off": off.seconds, "peak": peak, "bubble": waits and waits.fraction}
    everyone: list[Optional[dict]] = [None] * dims.world_size
    dist.all_gather_object(everyone, mine)
    dist.destroy_process_group()
    return layout_report(cfg, dims, everyone, device, autocast) if dims.rank == 0 else None


def layout_report(cfg: Config, dims: ParallelDims, ranks: list[dict], device: torch.device, autocast) -> str:
    p, t = cfg.parallel, cfg.training
    m = t.grad_accum_steps
    tokens = t.micro_batch_size * cfg.data.seq_len * m * dims.dp
    slowest = {side: [max(step) for step in zip(*(r[side] for r in ranks))] for side in ("on", "off")}
    peak = peak_flops(device)
    memory = "CUDA allocated" if device.type == "cuda" else "resident, above the process before the model"
    lines = [
        machine_line(device, autocast),
        f"layout tp={p.tp} pp={p.pp} dp={dims.dp}{f' ep={dims.ep}' if dims.ep > 1 else ''} ({p.data_parallel},"
        f" sp {'on' if p.sp else 'off'}, schedule"
        f" {p.schedule}) on {dims.world_size} ranks; model {cfg.model.num_params() / 1e6:.1f}M params;"
        f" {t.micro_batch_size} x {cfg.data.seq_len} tokens x {m} micro-batches x dp {dims.dp} = {tokens}"
        f" tokens/step; {len(slowest['on'])} timed steps each, interleaved; medians of the slowest rank",
        "",
    ]
    mfu_scale = flops_per_token(cfg.model, cfg.data.seq_len) / (peak * dims.world_size) if peak else None
    lines += speed_table(tokens, slowest["on"], slowest["off"], ("channels on", "channels off"), mfu_scale)
    dims_named = ("pp", "dp", "tp") + (("ep",) if dims.ep > 1 else ())
    lines += ["", f"{'rank':>4}" + "".join(f" {d:>3}" for d in dims_named) + f" {'peak MiB':>10}"
              + (f" {'bubble':>8}" if p.pp > 1 else "")]
    for rank, r in enumerate(ranks):
        row = f"{rank:>4}" + "".join(f" {c:>3}" for c in r["coords"]) + f" {r['peak'] / MIB:>10.1f}"
        lines.append(row + (f" {r['bubble']:>8.1%}" if p.pp > 1 else ""))
    lines.append(f"peak memory: {memory}")
    if p.pp > 1:
        v = p.virtual_stages
        theory = (p.pp - 1) / (v * m + p.pp - 1)
        measured = statistics.mean(r["bubble"] for r in ranks)
        lines.append(
            f"pipeline bubble: measured {measured:.1%} (mean over ranks; time blocked on pipeline peers / schedule"
            f" time), theory (pp - 1) / (v m + pp - 1) = {theory:.1%} with pp={p.pp}, m={m}, v={v}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a training YAML file; its model, batch and optimizer are used")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: training.device")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None, help="default: training.dtype")
    parser.add_argument(
        "--reference", choices=("hf", "channels-off", "dense"), default=None,
        help="what to time against: Hugging Face (one process), ours without per-channel accounting"
        " (any layout), or (a MoE config, one process) the dense model of its active FLOPs;"
        " default: hf in one process, channels-off under torchrun",
    )
    parser.add_argument(
        "--family", default=None, metavar="MODEL_TYPE",
        help="--reference hf: that family's architecture at the config's shape, against transformers' model of it"
        " (default: llama with the config's own model)",
    )
    args, overrides = parser.parse_known_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.steps < 1 or args.warmup < 0:
            raise UsageError("--steps must be >= 1 and --warmup >= 0")
        reference = args.reference or ("hf" if world == 1 else "channels-off")
        if reference in ("hf", "dense") and world > 1:
            raise UsageError(f"--reference {reference} runs in one process: run without torchrun, or use --reference channels-off")
        if reference == "hf":
            import_transformers()  # before the model is built: a missing install is reported at once
        cfg = load_config(args.config, overrides)
        if args.family is not None:
            family_model(cfg, args.family)
        device = pick_device(args.device or cfg.training.device)
        if device.type == "cpu":
            keep_freed_host_memory()  # as train.py: the process's allocator, so for both sides
        autocast = autocast_dtype(args.dtype or cfg.training.dtype, device)
        if reference == "hf":
            model_type = args.family or "llama"
            text = report(cfg, *benchmark(cfg, model_type, args.steps, args.warmup, device, autocast), device, autocast)
        elif reference == "dense":
            text = benchmark_dense(cfg, args.steps, args.warmup, device, autocast)
        else:
            text = benchmark_layout(cfg, args.steps, args.warmup, device, autocast)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
