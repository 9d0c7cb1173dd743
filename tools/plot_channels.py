"""Draw the per-channel loss curves of a run from its TensorBoard event files.

    python tools/plot_channels.py runs/tiny --output channels.png

One panel for training loss (loss/<channel> and the overall loss), one for validation loss
(val_loss/<channel>) when the run evaluated. Needs matplotlib (`pip install -e ".[plot]"`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.errors import UsageError  # noqa: E402


def read_scalars(logdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of the run -> (steps, values), with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(logdir).is_dir():
        raise UsageError(f"{logdir} is not a directory; pass the run's logging.tensorboard_dir")
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if not tags:
        raise UsageError(f"{logdir} holds no TensorBoard scalars; pass the run's logging.tensorboard_dir")
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)]) for tag in tags}


def plot(scalars: dict[str, tuple[list[int], list[float]]], output: str) -> list[str]:
    """Writes the figure; returns the channel names drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    channels = sorted(tag.split("/", 1)[1] for tag in scalars if tag.startswith("loss/"))
    if not channels:
        raise UsageError("the run logged no loss/<channel> curves")
    panels = [("loss", "training loss")] + ([("val_loss", "validation loss")] if any(t.startswith("val_loss/") for t in scalars) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], panels):
        for name in sorted(t.split("/", 1)[1] for t in scalars if t.startswith(prefix + "/")):
            ax.plot(*scalars[f"{prefix}/{name}"], label=name)
        if prefix in scalars:
            ax.plot(*scalars[prefix], label="all", color="black", linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="step", ylabel="cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(output).with_name(f".tmp-{Path(output).name}")
    fig.savefig(tmp, dpi=120, format=Path(output).suffix.lstrip(".") or "png")
    tmp.replace(output)
    plt.close(fig)
    return channels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", help="the run's TensorBoard directory (logging.tensorboard_dir)")
    parser.add_argument("--output", default="channels.png", help="image file to write")
    args = parser.parse_args(argv)
    try:
        channels = plot(read_scalars(args.logdir), args.output)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {args.output}: {len(channels)} channels ({', '.join(channels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
