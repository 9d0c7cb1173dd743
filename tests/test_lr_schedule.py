"""The schedule is a pure function of the step; torch's own schedulers are the reference."""

import math

import pytest
import torch

from megatron_llm.config import OptimizerConfig, ScheduleConfig
from megatron_llm.training.lr_schedule import lr_at

PEAK, FLOOR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110


def torch_lrs(make_schedulers, steps: int) -> list[float]:
    """LRs a torch SequentialLR produces for `steps` steps (warm-up then the given decay)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / WARMUP, end_factor=1.0, total_iters=WARMUP - 1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, make_schedulers(opt)], milestones=[WARMUP])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def ours(decay: str, steps: int = TOTAL, **kw) -> list[float]:
    schedule = ScheduleConfig(warmup_steps=WARMUP, decay=decay, **kw)
    return [lr_at(s, schedule, OptimizerConfig(lr=PEAK, min_lr=FLOOR), TOTAL) for s in range(steps)]


def test_cosine_matches_torch():
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - WARMUP, eta_min=FLOOR), TOTAL)
    torch.testing.assert_close(ours("cosine"), ref, rtol=1e-9, atol=1e-12)


def test_linear_matches_torch():
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, FLOOR / PEAK, total_iters=TOTAL - WARMUP), TOTAL
    )
    torch.testing.assert_close(ours("linear"), ref, rtol=1e-9, atol=1e-12)


def test_constant_and_warmup():
    lrs = ours("constant")
    assert lrs[0] == pytest.approx(PEAK / WARMUP) and lrs[WARMUP - 1] == PEAK
    assert all(lr == PEAK for lr in lrs[WARMUP:])


def test_wsd_holds_then_decays_linearly_to_min():
    lrs = ours("wsd", wsd_decay_fraction=0.2)
    decay_start = WARMUP + int(0.8 * (TOTAL - WARMUP))
    assert all(lr == PEAK for lr in lrs[WARMUP : decay_start + 1])
    tail = lrs[decay_start:]
    diffs = [a - b for a, b in zip(tail, tail[1:])]
    assert all(math.isclose(d, diffs[0], rel_tol=1e-9) for d in diffs)  # a straight line
    assert lr_at(TOTAL, ScheduleConfig(warmup_steps=WARMUP, decay="wsd"), OptimizerConfig(lr=PEAK, min_lr=FLOOR), TOTAL) == pytest.approx(FLOOR)


def test_past_the_end_stays_at_min():
    schedule = ScheduleConfig(warmup_steps=WARMUP, decay="cosine")
    assert lr_at(10 * TOTAL, schedule, OptimizerConfig(lr=PEAK, min_lr=FLOOR), TOTAL) == pytest.approx(FLOOR)
