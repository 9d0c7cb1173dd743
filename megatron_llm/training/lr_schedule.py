"""Learning-rate schedules as a pure function of the optimizer step (so resume needs no scheduler state)."""

import math

from megatron_llm.config import OptimizerConfig, ScheduleConfig


def lr_at(step: int, schedule: ScheduleConfig, optim: OptimizerConfig, total_steps: int) -> float:
    """LR for 0-based optimizer step `step`: linear warm-up to optim.lr, then decay to optim.min_lr.

    Warm-up reaches the peak on its last step ((step + 1) / warmup) so that no step trains at LR 0.
    """
    peak, floor, warmup = optim.lr, optim.min_lr, schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = schedule.decay_steps if schedule.decay_steps is not None else max(total_steps - warmup, 1)
    progress = min(max((step - warmup) / max(decay_steps, 1), 0.0), 1.0)
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "linear":
        return peak - (peak - floor) * progress
    if schedule.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # warmup-stable-decay: hold the peak, then decay linearly over the last fraction of the decay steps.
    stable = 1.0 - schedule.wsd_decay_fraction
    if progress <= stable:
        return peak
    return peak - (peak - floor) * (progress - stable) / schedule.wsd_decay_fraction
