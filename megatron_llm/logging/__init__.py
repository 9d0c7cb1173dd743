"""Console lines and the scalar sinks (TensorBoard, Weights & Biases), written by one rank only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_llm.config import LoggingConfig
from megatron_llm.logging.progress import Clock
from megatron_llm.logging.sinks import Sink, TensorBoardSink, WandbSink


class MetricsLogger:
    """Prints one compact line per call and sends the same scalars to every sink.

    `cfg.run_name` must be resolved (see runs.py): the run's TensorBoard directory is
    tensorboard_dir/run_name and its W&B run id is the name."""

    def __init__(self, cfg: LoggingConfig, config: dict, clock: Clock, enabled: bool):
        self.clock, self.enabled = clock, enabled
        self.run_dir: Optional[Path] = Path(cfg.tensorboard_dir) / cfg.run_name if cfg.tensorboard_dir else None
        self.sinks: list[Sink] = []
        if not enabled:
            return
        if self.run_dir is not None:
            self.sinks.append(TensorBoardSink(self.run_dir, config, clock.start_step))
        if cfg.wandb_project:
            self.sinks.append(WandbSink(cfg.wandb_project, cfg.run_name, config))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """A training line: its scalars, then elapsed time and ETA, then the channels."""
        self._emit(f"step {self._of_total(step)}", scalars, self.clock.text(step), step)

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        self._emit(f"eval step {self._of_total(step)}", scalars, "", step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def _of_total(self, step: int) -> str:
        total = str(self.clock.total_steps)
        return f"{step:>{len(total)}}/{total}"

    def _emit(self, head: str, scalars: dict[str, float], clock: str, step: int) -> None:
        if not self.enabled:
            return
        # Per-channel values go last, compactly; token counts per channel only to the sinks.
        main = [_format(k, v) for k, v in scalars.items() if "/" not in k] + ([clock] if clock else [])
        channels = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in scalars.items() if k.startswith(("loss/", "val_loss/"))]
        line = f"{head} | " + " | ".join(main)
        print(line + (" | channels: " + ", ".join(channels) if channels else ""), flush=True)
        for sink in self.sinks:
            sink.log(step, scalars)


def _format(key: str, value: float) -> str:
    if key in ("tokens", "tokens_per_s", "skipped_steps"):
        return f"{key} {value:,.0f}"
    if key == "lr":
        return f"{key} {value:.3e}"
    if key in ("ms_per_step", "peak_mem_gb"):
        return f"{key} {value:.1f}"
    return f"{key} {value:.4f}"
