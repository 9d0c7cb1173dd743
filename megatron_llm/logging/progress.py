"""Progress of long tools on stderr, and the clock of a training run (elapsed time and ETA).

On a terminal the progress line is redrawn in place; anywhere else (a CI log, `tee`, a Slurm .out
file) it is printed as a new line every `every_s` seconds, so a long job is never silent.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def duration(seconds: float) -> str:
    """Short human duration: 42s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _amount(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 or float(x).is_integer() else f"{x:.1f}"


class Clock:
    """Elapsed time since the run (this process) started and an ETA from the pace of the steps done
    since then: evaluation and checkpoint time are in that pace, so the ETA includes them. Steps may be
    any unit of work (Progress counts bytes, groups, ranks)."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self, step: float) -> Optional[float]:
        done = step - self.start_step
        return self.elapsed() / done * (self.total_steps - step) if done > 0 else None

    def text(self, step: float, separator: str = " | ") -> str:
        eta = self.eta(step)
        return f"elapsed {duration(self.elapsed())}{separator}eta {duration(eta) if eta is not None else '?'}"


class Progress:
    """`done` out of `total` units of work (`unit`: 'MB', 'groups', 'ranks', ...) with a rate-based ETA."""

    def __init__(self, label: str, total: float, unit: str, every_s: float = 10.0, enabled: bool = True):
        self.label, self.total, self.unit, self.every_s, self.enabled = label, total, unit, every_s, enabled
        self.tty = sys.stderr.isatty()
        self.clock = Clock(0, total)
        self.done = 0.0
        self._shown = time.perf_counter() if not self.tty else 0.0  # a log's first line only after every_s

    def advance(self, amount: float) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and now - self._shown >= (0.5 if self.tty else self.every_s):
            self._shown = now
            self._show()

    def close(self) -> None:
        """The final state: the line is completed on a terminal, printed once more in a log if it ever was."""
        if self.enabled and (self.tty or self.clock.elapsed() >= self.every_s):
            self._show()
        if self.enabled and self.tty:
            sys.stderr.write("\n")

    def _show(self) -> None:
        fraction = self.done / self.total if self.total else 1.0
        line = (f"{self.label}: {fraction:6.1%} ({_amount(self.done)} of {_amount(self.total)} {self.unit}), "
                f"{self.clock.text(self.done, ', ')}")
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()
