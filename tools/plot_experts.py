"""Draw the expert load of a mixture-of-experts run as heatmaps: per MoE layer, each expert's share of the
routed assignments (expert_load/layer<i>/expert<e>, logged every logging.interval) over the steps.

    python tools/plot_experts.py runs/tiny --output experts.png             # the newest run
    python tools/plot_experts.py runs/tiny --run 20261130-081613 --output experts.png

A balanced layer is one flat colour at 1/E; a collapsing router shows as a few bright rows.
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_channels import check_picture, read_scalars, save_figure  # noqa: E402

from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402
from megatron_llm.logging.runs import find_run  # noqa: E402

TAG = re.compile(r"expert_load/layer(\d+)/expert(\d+)$")


def load_tables(scalars: dict) -> tuple[list[int], dict[int, list[list[float]]]]:
    """(logged steps, layer -> [expert][step] shares) from the run's expert_load scalars."""
    found = {tuple(map(int, m.groups())): tag for tag in scalars if (m := TAG.match(tag))}
    if not found:
        raise UsageError("the run logged no expert_load/<layer>/<expert> scalars: was it a MoE model (model.moe_experts)?")
    steps = scalars[next(iter(found.values()))][0]
    layers: dict[int, list[list[float]]] = {}
    for (layer, expert), tag in sorted(found.items()):
        layers.setdefault(layer, []).append(scalars[tag][1])
    return steps, layers


def plot(scalars: dict, output: str, title: str) -> list[int]:
    """Writes the figure; returns the MoE layers drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    steps, layers = load_tables(scalars)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 0.35 * sum(map(len, layers.values()))), squeeze=False)
    for ax, (layer, shares) in zip(axes[:, 0], layers.items()):
        image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(shares) - 0.5, -0.5))
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
        fig.colorbar(image, ax=ax, label="share of assignments")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, output)
    return list(layers)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", help="logging.tensorboard_dir (its newest run is drawn), or one run's directory")
    parser.add_argument("--run", help="the run to draw: its name (logging.run_name or start time) under logdir")
    parser.add_argument("--output", default="experts.png", help="image file to write")
    args = parser.parse_args(argv)
    try:
        check_picture(args.output)
        run = find_run(args.logdir, args.run)
        layers = plot(read_scalars(run), args.output, f"expert load, run {run.name}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {args.output}: run {run.name}, MoE layers {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
