"""Training-step speed of our model against Hugging Face's LlamaForCausalLM on the same math.

    python tools/benchmark.py --config configs/tiny.yaml
    python tools/benchmark.py --config configs/llama_100m.yaml --steps 10 --warmup 1
    python tools/benchmark.py --config configs/llama3.2_1b.yaml --device cuda --dtype bf16 --data.seq_len 2048

Both models start from the same weights (ours, copied into HF through the checkpoint table), see the
same random token batch (training.micro_batch_size x data.seq_len, training.grad_accum_steps
micro-batches) and take the same clipped AdamW step: the same hyperparameters, the same param groups
(no decay on norms and the embedding, mapped by name) and the same foreach/fused choice. Ours runs
`train_step`, the very step train.py runs; HF runs a plain loop (forward to logits, the token-mean
cross-entropy in fp32, backward, clip_grad_norm_, step, zero_grad) with SDPA attention and no KV cache.
Steps alternate between the two (ours first on even steps, HF first on odd ones) so machine noise
hits both; medians are reported. The first-step losses and gradient norms are printed side by side:
they agree to ~1e-5 in fp32 when both compute the same function.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.checkpoint.hf import hf_config_from_model_config, native_to_hf  # noqa: E402
from megatron_llm.config import Config, load_config  # noqa: E402
from megatron_llm.errors import UsageError  # noqa: E402
from megatron_llm.model import build_model, flops_per_token  # noqa: E402
from megatron_llm.parallel import ParallelDims  # noqa: E402
from megatron_llm.parallel.dims import pick_device  # noqa: E402
from megatron_llm.training.metrics import peak_flops  # noqa: E402
from megatron_llm.training.optimizer import build_optimizer  # noqa: E402
from megatron_llm.training.step import autocast_dtype, train_step  # noqa: E402

SINGLE = ParallelDims(world_size=1, rank=0, tp=1, pp=1, dp=1)


@dataclass
class Runner:
    """One side of the comparison: a step function and what it measured."""

    step: Callable[[], tuple[float, float]]  # -> (loss, grad norm), after one host sync
    resting_bytes: Callable[[], int]  # parameters + AdamW state, which the step does not free
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # resting + the step's largest transient allocation (CUDA only)
    first: Optional[tuple[float, float]] = None


def hf_twin(model: nn.Module, device: torch.device) -> nn.Module:
    """LlamaForCausalLM with `model`'s config and weights."""
    config = transformers.LlamaConfig(**hf_config_from_model_config(model.cfg, "llama"), attn_implementation="sdpa")
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(native_to_hf(model.state_dict()))
    return hf.train()


def matching_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, hf: nn.Module) -> torch.optim.Optimizer:
    """An AdamW over `hf` with `optimizer`'s groups and settings, each parameter mapped by name."""
    hf_name = native_to_hf({name: id(p) for name, p in model.named_parameters()})  # hf name -> id(ours)
    by_id = dict(zip(hf_name.values(), hf_name.keys()))
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [hf_params[by_id[id(p)]] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    # Each group carries every setting; foreach and fused are also read from the defaults when built.
    return torch.optim.AdamW(groups, **{k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "foreach", "fused")})


def hf_step(hf, optimizer, micro_batches: list[dict], *, grad_clip: float, autocast) -> tuple[float, float]:
    """A plain Hugging Face training step: token-mean cross-entropy over all micro-batches' tokens."""
    step_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches)
    loss_sum = 0.0
    for mb in micro_batches:
        with torch.autocast(mb["tokens"].device.type, dtype=autocast, enabled=autocast is not None):
            logits = hf(input_ids=mb["tokens"], use_cache=False).logits  # [b, s, vocab]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="none")
        loss = (ce * mb["loss_mask"].flatten()).sum() / step_tokens
        loss.backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), grad_clip or float("inf"))
    loss_value, norm_value = torch.stack([loss_sum, grad_norm]).tolist()  # one host sync, as train_step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def random_batches(cfg: Config, device: torch.device) -> list[dict]:
    """grad_accum_steps micro-batches of uniform random tokens, every label counted."""
    t, seq = cfg.training, cfg.data.seq_len
    gen = torch.Generator().manual_seed(t.seed)
    out = []
    for _ in range(t.grad_accum_steps):
        ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, seq + 1), generator=gen)
        out.append({
            "tokens": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device),  # [b, s] each, next-token
            "loss_mask": torch.ones(t.micro_batch_size, seq, device=device),
            "channel": torch.zeros(t.micro_batch_size, dtype=torch.long, device=device),
        })
    return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_step(runner: Runner, device: torch.device, record: bool) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = runner.step()  # ends in a host sync (.tolist()), so the clock sees finished work
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    runner.first = runner.first or result
    if record:
        runner.seconds.append(elapsed)
        if cuda:
            transient = torch.cuda.max_memory_allocated(device) - before
            runner.peak_bytes = max(runner.peak_bytes, runner.resting_bytes() + transient)


def build_runners(cfg: Config, device: torch.device, autocast) -> tuple[Runner, Runner]:
    model = build_model(cfg.model, device, seed=cfg.training.seed)
    hf = hf_twin(model, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    hf_optimizer = matching_optimizer(optimizer, model, hf)
    batches = random_batches(cfg, device)
    z_loss, clip = cfg.training.z_loss, cfg.optimizer.grad_clip

    def ours_step() -> tuple[float, float]:
        result = train_step(model, optimizer, batches, SINGLE, z_loss=z_loss, grad_clip=clip, autocast=autocast)
        return result.loss, result.grad_norm

    def theirs_step() -> tuple[float, float]:
        return hf_step(hf, hf_optimizer, batches, grad_clip=clip, autocast=autocast)

    # Read when measured: AdamW state only exists after the first step.
    ours = Runner(ours_step, lambda: state_bytes(model, optimizer))
    theirs = Runner(theirs_step, lambda: state_bytes(hf, hf_optimizer))
    return ours, theirs


def benchmark(cfg: Config, steps: int, warmup: int, device: torch.device, autocast) -> tuple[Runner, Runner]:
    if cfg.training.z_loss:
        raise UsageError("the Hugging Face side has no z-loss: run with --training.z_loss 0")
    ours, theirs = build_runners(cfg, device, autocast)
    for i in range(warmup + steps):
        pair = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        for runner in pair:
            run_step(runner, device, record=i >= warmup)
    return ours, theirs


def report(cfg: Config, ours: Runner, theirs: Runner, device: torch.device, autocast) -> str:
    t = cfg.training
    tokens = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps
    flops, peak = flops_per_token(cfg.model, cfg.data.seq_len), peak_flops(device)
    dtype = "fp32" if autocast is None else f"{autocast} autocast".replace("torch.", "")
    (loss_a, norm_a), (loss_b, norm_b) = ours.first, theirs.first
    lines = [
        f"torch {torch.__version__}, transformers {transformers.__version__}, {device} {dtype}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} over the last minute on"
        f" {os.cpu_count()} CPUs (other processes slow the two sides unevenly)",
        f"model {cfg.model.num_params() / 1e6:.1f}M params, {t.micro_batch_size} x {cfg.data.seq_len} tokens"
        f" x {t.grad_accum_steps} micro-batches = {tokens} tokens/step; {len(ours.seconds)} timed steps each,"
        " interleaved; medians",
        f"first-step loss:      ours {loss_a:.6f}  HF {loss_b:.6f}  |diff| {abs(loss_a - loss_b):.1e}",
        f"first-step grad norm: ours {norm_a:.6f}  HF {norm_b:.6f}  |diff| {abs(norm_a - norm_b):.1e}",
        "",
        f"{'':14}{'ours':>12}{'HF':>12}{'ours/HF':>10}",
    ]
    ms = [statistics.median(r.seconds) * 1e3 for r in (ours, theirs)]
    rate = [tokens / (m / 1e3) for m in ms]
    lines.append(f"{'tokens/s':14}{rate[0]:12.0f}{rate[1]:12.0f}{rate[0] / rate[1]:10.3f}")
    lines.append(f"{'ms/step':14}{ms[0]:12.1f}{ms[1]:12.1f}{ms[0] / ms[1]:10.3f}")
    if peak is not None:
        mfu = [flops * r / peak for r in rate]
        lines.append(f"{'MFU':14}{mfu[0]:12.1%}{mfu[1]:12.1%}{mfu[0] / mfu[1]:10.3f}")
    # Each step i of ours ran next to step i of HF, under much the same load: the paired ratios
    # cancel slow drifts in the load that the medians above can still show.
    paired = [b / a for a, b in zip(ours.seconds, theirs.seconds)]
    lines.append(
        f"{'paired':14}ours faster in {sum(r > 1 for r in paired)} of {len(paired)} step pairs,"
        f" median ratio {statistics.median(paired):.3f}"
    )
    if device.type == "cuda":
        gib = [r.peak_bytes / 2**30 for r in (ours, theirs)]
        lines.append(f"{'peak GiB':14}{gib[0]:12.2f}{gib[1]:12.2f}{gib[0] / gib[1]:10.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a training YAML file; its model, batch and optimizer are used")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: training.device")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None, help="default: training.dtype")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.steps < 1 or args.warmup < 0:
            raise UsageError("--steps must be >= 1 and --warmup >= 0")
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device or cfg.training.device)
        autocast = autocast_dtype(args.dtype or cfg.training.dtype, device)
        ours, theirs = benchmark(cfg, args.steps, args.warmup, device, autocast)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(report(cfg, ours, theirs, device, autocast))
    return 0


if __name__ == "__main__":
    sys.exit(main())
