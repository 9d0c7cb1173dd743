"""Run directories: every training run logs to logging.tensorboard_dir/<run name>, its own directory.

Mixing two runs' event files in one directory makes TensorBoard (and tools/plot_channels.py) draw one
curve through both. The name is logging.run_name, else, for a resumed run, the name stored in the
checkpoint's config.yaml (so it continues its own curves), else the start time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from megatron_llm.errors import UsageError

EVENTS = "events.out.tfevents.*"


def new_run_name(tensorboard_dir: Optional[str]) -> str:
    """The start time, e.g. 20261130-081140; suffixed -2, -3, ... when a run started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while tensorboard_dir and (Path(tensorboard_dir) / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def run_names(logdir: Path) -> list[str]:
    """The runs under `logdir` (subdirectories holding event files), oldest first by their last write."""
    runs = [d for d in logdir.iterdir() if d.is_dir() and any(d.glob(EVENTS))]
    return [d.name for d in sorted(runs, key=lambda d: max(f.stat().st_mtime for f in d.glob(EVENTS)))]


def find_run(logdir: str, run: Optional[str] = None) -> Path:
    """The directory of run `run` under `logdir`, or of its newest run. `logdir` may also be one run's
    own directory (event files and no runs below it), which is then the answer when no `run` is named."""
    root = Path(logdir)
    if not root.is_dir():
        raise UsageError(f"{logdir} is not a directory; pass the run's logging.tensorboard_dir")
    names = run_names(root)
    if run is not None:
        if run not in names:
            raise UsageError(f"{logdir} has no run {run!r}; its runs: {', '.join(names) or 'none'}")
        return root / run
    if names:
        return root / names[-1]
    if not any(root.glob(EVENTS)):
        raise UsageError(f"{logdir} holds no TensorBoard runs; pass the run's logging.tensorboard_dir")
    return root
