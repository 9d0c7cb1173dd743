"""Console lines and TensorBoard scalars, written by one rank only."""

from typing import Optional


class MetricsLogger:
    """Prints one compact line per call and mirrors the same scalars to TensorBoard."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        # Per-channel values go last, compactly; token counts per channel only to TensorBoard.
        main = [_format(k, v) for k, v in scalars.items() if "/" not in k]
        channels = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in scalars.items() if k.startswith(("loss/", "val_loss/"))]
        line = f"{prefix}step {step:>6} | " + " | ".join(main)
        print(line + (" | channels: " + ", ".join(channels) if channels else ""), flush=True)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(key: str, value: float) -> str:
    if key in ("tokens", "tokens_per_s", "skipped_steps"):
        return f"{key} {value:,.0f}"
    if key == "lr":
        return f"{key} {value:.3e}"
    if key in ("ms_per_step", "peak_mem_gb"):
        return f"{key} {value:.1f}"
    return f"{key} {value:.4f}"
