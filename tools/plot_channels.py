"""Draw the per-channel loss curves of a run from its TensorBoard event files.

    python tools/plot_channels.py runs/tiny --output channels.png            # the newest run
    python tools/plot_channels.py runs/tiny --run 20261130-081613 --output channels.png

Each run logs to its own directory under logging.tensorboard_dir (logging.run_name, or its start
time); the newest is drawn unless --run names another, and the picture is titled with it. One panel for
training loss (loss/<channel> and the overall loss), one for validation loss (val_loss/<channel>) when
the run evaluated.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.logging.runs import find_run  # noqa: E402
from megatron_llm.paths import remove_dead_temporaries, temporary_beside, writable_directory  # noqa: E402


def read_scalars(logdir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of one run's directory -> (steps, values), with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if not tags:
        raise UsageError(f"{logdir} holds no TensorBoard scalars; pass the run's logging.tensorboard_dir")
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)]) for tag in tags}


def plot(scalars: dict[str, tuple[list[int], list[float]]], output: str, title: str) -> list[str]:
    """Writes the figure; returns the channel names drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    channels = sorted(tag.split("/", 1)[1] for tag in scalars if tag.startswith("loss/"))
    if not channels:
        raise UsageError("the run logged no loss/<channel> curves")
    panels = [("loss", "training loss")] + ([("val_loss", "validation loss")] if any(t.startswith("val_loss/") for t in scalars) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (prefix, panel_title) in zip(axes[0], panels):
        for name in sorted(t.split("/", 1)[1] for t in scalars if t.startswith(prefix + "/")):
            ax.plot(*scalars[f"{prefix}/{name}"], label=name)
        if prefix in scalars:
            ax.plot(*scalars[prefix], label="all", color="black", linestyle="--", linewidth=1)
        ax.set(title=panel_title, xlabel="step", ylabel="cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, output)
    return channels


def check_picture(output: str) -> str:
    """Refuses, before the work that draws it, an --output that cannot be written: a directory, an unwritable
    place, a suffix matplotlib writes no format for (png without one). Its directory is created when missing."""
    from matplotlib.backend_bases import FigureCanvasBase

    if Path(output).is_dir():
        raise UsageError(f"--output {output} is a directory: give the picture's file name, like {Path(output) / 'plot.png'}")
    suffix = Path(output).suffix.lstrip(".").lower() or "png"
    if suffix not in FigureCanvasBase.get_supported_filetypes():
        raise UsageError(f"--output {output}: no picture format {suffix!r}; use one of .png, .svg, .pdf, .jpg")
    writable_directory(str(Path(output).parent), "the directory of --output")
    return suffix


def save_figure(fig, output: str) -> None:
    """Writes `fig` under a temporary name beside `output` and renames it into place, so a picture already
    there is replaced whole or not at all; the format follows the suffix (png without one)."""
    import matplotlib.pyplot as plt

    suffix = check_picture(output)
    remove_dead_temporaries(Path(output))
    tmp = temporary_beside(Path(output))
    try:
        fig.savefig(tmp, dpi=120, format=suffix)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", help="logging.tensorboard_dir (its newest run is drawn), or one run's directory")
    parser.add_argument("--run", help="the run to draw: its name (logging.run_name or start time) under logdir")
    parser.add_argument("--output", default="channels.png", help="image file to write")
    args = parser.parse_args(argv)
    try:
        check_picture(args.output)
        run = find_run(args.logdir, args.run)
        channels = plot(read_scalars(run), args.output, f"run {run.name}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {args.output}: run {run.name}, {len(channels)} channels ({', '.join(channels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
