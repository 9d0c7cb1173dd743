"""Where the logging rank's scalars go besides the console: TensorBoard, and Weights & Biases when asked.

Both receive the same scalars at the same steps, and the resolved config once at the start.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol

import yaml

from megatron_llm.errors import UsageError

# Listed in the hparams view beside the settings; their values are the scalars of the same name.
HPARAM_METRICS = ("loss", "val_loss")


class Sink(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """{'training': {'steps': 300}} -> {'training.steps': 300}; values that are not numbers, strings or
    booleans (None, lists, mappings) become their JSON text, which both hparams views accept."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class TensorBoardSink:
    """One run directory; the config as text (a YAML block, rendered by the Text tab) and as hparams."""

    def __init__(self, run_dir: Path, config: dict, step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), step)  # a code block
        # The three hparams summaries go into this run's own file: SummaryWriter.add_hparams would open a
        # second run directory beside it.
        for summary in hparams(flat(config), dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary, step)
        self.writer.flush()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run whose id is the run name, so a resumed run continues it. WANDB_MODE
    (offline, disabled) and the other WANDB_* variables are wandb's own and left to it."""

    def __init__(self, project: str, run_name: str, config: dict):
        import wandb

        try:
            self.run = wandb.init(project=project, name=run_name, id=run_name, resume="allow", config=flat(config))
        except wandb.errors.Error as e:  # no API key, no network, a bad project name
            raise UsageError(
                f"logging.wandb_project: wandb cannot start a run ({str(e).strip().splitlines()[0]}); "
                "run `wandb login`, or set WANDB_MODE=offline"
            ) from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
