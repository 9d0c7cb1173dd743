"""Training steps timed side by side, for the benchmarks in tools/: a Runner is one side of a comparison (a
step function and what it measured), `alternate` runs two sides' steps in turn so machine noise hits both,
and the speed table prints each side's tokens/s, ms/step and MFU with the paired ratios."""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.config import Config  # noqa: E402
from megatron_llm.parallel import ParallelDims  # noqa: E402
from megatron_llm.training.step import train_step  # noqa: E402

SINGLE = ParallelDims(world_size=1, rank=0, tp=1, pp=1, dp=1)


@dataclass
class Runner:
    """One side of the comparison: a step function and what it measured."""

    step: Callable[[], tuple[float, float]]  # -> (loss, grad norm), after one host sync
    resting_bytes: Callable[[], int] = lambda: 0  # parameters + AdamW state, which the step does not free
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time over the same steps
    peak_bytes: int = 0  # resting + the step's largest transient allocation (CUDA only)
    first: Optional[tuple[float, float]] = None


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
    start, cpu_start = time.perf_counter(), time.process_time()
    result = runner.step()  # ends in a host sync (.tolist()), so the clock sees finished work
    synchronize(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    runner.first = runner.first or result
    if record:
        runner.seconds.append(elapsed)
        runner.cpu_seconds.append(cpu)
        if cuda:
            transient = torch.cuda.max_memory_allocated(device) - before
            runner.peak_bytes = max(runner.peak_bytes, runner.resting_bytes() + transient)


def alternate(a: Runner, b: Runner, steps: int, device: torch.device, record: bool) -> None:
    """`steps` steps of each, a first on even steps and b first on odd ones, so machine noise hits both."""
    for i in range(steps):
        for runner in (a, b) if i % 2 == 0 else (b, a):
            run_step(runner, device, record)


def our_runner(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], autocast) -> Runner:
    """train_step, the step train.py runs, on one process."""

    def step() -> tuple[float, float]:
        result = train_step(model, optimizer, batches, SINGLE, z_loss=cfg.training.z_loss,
                            grad_clip=cfg.optimizer.grad_clip, autocast=autocast)
        return result.loss, result.grad_norm

    return Runner(step, lambda: state_bytes(model, optimizer))


def speed_table(tokens: int, a: list[float], b: list[float], names: tuple[str, str], mfu_scale) -> list[str]:
    """tokens/s, ms/step (medians), MFU when `mfu_scale` (FLOP per token / peak FLOP/s) is known, and
    the step-pair ratios: step i of one side ran next to step i of the other, under much the same load,
    so the paired ratios cancel slow drifts in the load that the medians can still show."""
    ms = [statistics.median(x) * 1e3 for x in (a, b)]
    rate = [tokens / (m / 1e3) for m in ms]
    lines = [
        f"{'':14}{names[0]:>14}{names[1]:>14}{'ratio':>10}",
        f"{'tokens/s':14}{rate[0]:14.0f}{rate[1]:14.0f}{rate[0] / rate[1]:10.3f}",
        f"{'ms/step':14}{ms[0]:14.1f}{ms[1]:14.1f}{ms[0] / ms[1]:10.3f}",
    ]
    if mfu_scale is not None:
        mfu = [r * mfu_scale for r in rate]
        lines.append(f"{'MFU':14}{mfu[0]:14.1%}{mfu[1]:14.1%}{mfu[0] / mfu[1]:10.3f}")
    paired = [y / x for x, y in zip(a, b)]
    spread = ""
    if len(paired) >= 4:  # how far single pairs scatter: the machine's noise, beside the median
        low, _, high = statistics.quantiles(paired, n=4)
        spread = f" (quartiles {low:.3f}-{high:.3f})"
    lines.append(
        f"{'paired':14}{names[0]} faster in {sum(r > 1 for r in paired)} of {len(paired)} step pairs,"
        f" median ratio {statistics.median(paired):.3f}{spread}"
    )
    return lines


def cpu_line(a: Runner, b: Runner, names: tuple[str, str]) -> str:
    """Medians and the paired ratio b/a of the process's CPU time per step. CPU time is what a step computes,
    without the time the process waited for a core: on a shared machine it scatters less than the clock
    (with one thread per process it is the step's compute)."""
    cpu = [statistics.median(r.cpu_seconds) * 1e3 for r in (a, b)]
    paired = statistics.median(y / x for x, y in zip(a.cpu_seconds, b.cpu_seconds))
    return (f"CPU time of this process: {names[0]} {cpu[0]:.1f}, {names[1]} {cpu[1]:.1f} ms/step (ratio"
            f" {cpu[0] / cpu[1]:.3f}); paired {names[1]}/{names[0]} median {paired:.3f}")


def machine_line(device: torch.device, autocast, libraries: str = "") -> str:
    dtype = "fp32" if autocast is None else f"{autocast} autocast".replace("torch.", "")
    return (
        f"torch {torch.__version__}, {libraries}{device.type} {dtype}, "
        f"{torch.get_num_threads()} threads per process; load average {os.getloadavg()[0]:.1f} over the last"
        f" minute on {os.cpu_count()} CPUs (other processes slow the two sides unevenly)"
    )


def update_seconds(optimizer: torch.optim.Optimizer, device: torch.device) -> list[float]:
    """The seconds of each `optimizer.step()` from now on, appended as they end (`clock`'s). The update reads and
    writes each parameter's weight, gradient and two moments: its time grows with the parameter count, the
    experts' included, whatever the tokens per step."""
    seconds: list[float] = []
    started: list[float] = []
    now = clock(device)

    def start(*_) -> None:
        synchronize(device)
        started.append(now())

    def end(*_) -> None:
        synchronize(device)
        seconds.append(now() - started.pop())

    optimizer.register_step_pre_hook(start)
    optimizer.register_step_post_hook(end)
    return seconds


def module_seconds(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> list[float]:
    """The CPU seconds of each step from now on spent inside `modules`' forwards and backwards, appended at
    each `optimizer.step()`. A backward is timed from its output's gradient to its input's, so each module
    must take one input that needs a gradient and give one output; CPU only (a CUDA clock here would sync)."""
    seconds: list[float] = []
    total, started = [0.0], [0.0]

    def add_since_start(*_) -> None:
        total[0] += time.process_time() - started[0]

    def start(*_) -> None:
        started[0] = time.process_time()

    def forward_start(module, args) -> None:
        start()
        if args[0].requires_grad:
            args[0].register_hook(add_since_start)

    def forward_end(module, args, output) -> None:
        add_since_start()
        if output.requires_grad:
            output.register_hook(start)

    def close_step(*_) -> None:
        seconds.append(total[0])
        total[0] = 0.0

    for module in modules:
        module.register_forward_pre_hook(forward_start)
        module.register_forward_hook(forward_end)
    optimizer.register_step_post_hook(close_step)
    return seconds


def clock(device: torch.device) -> Callable[[], float]:
    """The clock of a part of a step: on CPU this process's CPU time, which other processes on a shared machine
    do not stretch; on CUDA the wall clock (after a synchronize)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
