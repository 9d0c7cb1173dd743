"""Native checkpoints: torch.distributed.checkpoint (DCP) directories, written atomically.

Layout of `checkpoint.dir`:
    step_0000100/      .metadata + *.distcp shards (model, optimizer, trainer state) and config.yaml
    latest             text file naming the newest complete step directory

A save goes to `.tmp-step_XXXXXXX/`, is renamed into place once every rank has written, and only then
is `latest` replaced (write, fsync, rename). A crash at any point leaves `latest` naming a complete
checkpoint. DCP stores each tensor with its global shape, so a later run may load it at another layout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from megatron_llm.errors import UsageError
from megatron_llm.parallel.state import layout_free_state, load_layout_free_state

STEP_DIR = re.compile(r"^step_(\d{7})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_dcp():
    # DCP warns when it runs without a process group; a single-process load is what we want.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under one directory."""

    def __init__(self, directory: str, keep: int, is_writer: bool):
        self.dir = Path(directory)
        self.keep = keep
        self.is_writer = is_writer  # one rank renames, points `latest` and prunes

    def latest(self) -> Optional[Path]:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / ".metadata").exists():
            raise UsageError(f"{pointer} names {path}, which is not a complete checkpoint; fix or remove the pointer")
        return path

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, config: dict) -> Path:
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}"
        model_sd, optim_sd = layout_free_state(model, optimizer)
        try:
            if self.is_writer:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
            _barrier()
            dcp.save({"model": model_sd, "optimizer": optim_sd, "trainer": trainer_state}, checkpoint_id=tmp)
            _barrier()
            if self.is_writer:
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                shutil.rmtree(final, ignore_errors=True)  # an older run's save of the same step
                os.replace(tmp, final)
                _write_atomically(self.dir / "latest", final.name + "\n")
                self._prune()
            _barrier()
        except (OSError, CheckpointException) as e:  # DCP wraps a rank's failed write in CheckpointException
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(
                f"cannot write checkpoint {final} ({_write_failure(e, self.dir)}); the previous checkpoint is intact: "
                "free space or point checkpoint.dir at a writable place"
            ) from None
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        """Restores model and optimizer in place; returns the saved values of `trainer_state`'s keys
        (DCP loads into a template: only keys present in it are read).

        A weights-only checkpoint (written by tools/convert_checkpoint.py) restores the model alone and
        returns {}: training starts at step 0 from those weights.
        """
        if not has_training_state(path):
            optimizer, trainer_state = None, {}
        model_sd, optim_sd = layout_free_state(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "trainer": dict(trainer_state)}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path)
        load_layout_free_state(model, optimizer, state["model"], state["optimizer"])
        return state["trainer"]

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        steps = sorted(p for p in self.dir.iterdir() if STEP_DIR.match(p.name))
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _write_failure(e: BaseException, directory: Path) -> str:
    """One line: the first failed rank's error (torch's writer reports a full disk as a short write),
    and the free space left, which is what the user checks first."""
    if isinstance(e, CheckpointException):
        rank, (inner, _) = min(e.failures.items(), key=lambda item: item[0])
        reason = f"rank {rank}: {getattr(inner, 'strerror', None) or str(inner).strip().splitlines()[-1]}"
    else:
        reason = str(e.strerror or e)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return reason
    if free < 2**20 and "No space left" not in reason:  # torch's writer says "unexpected pos" instead
        reason = f"the disk is full: {reason}"
    return f"{reason}; {free / 2**20:,.0f} MiB free there"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> Path:
    """A step directory, or a checkpoint.dir whose `latest` names one."""
    p = Path(path)
    if (p / ".metadata").exists():
        return p
    latest = Checkpointer(str(p), keep=0, is_writer=False).latest() if p.is_dir() else None
    if latest is None:
        raise UsageError(f"{path} is not a native checkpoint: expected a step directory with .metadata or a 'latest' file")
    return latest


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    """Loads only the model weights of a checkpoint into an unsharded model (no process group needed)."""
    state: dict[str, Any] = {"model": model.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])


def save_weights(path: Path, model_state: dict[str, torch.Tensor], config: dict) -> None:
    """A weights-only checkpoint at `path` (atomically: a temporary directory renamed into place).
    `config` is a full config dict (Config.to_dict()); train.py can resume from the result."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_dcp():
        dcp.save({"model": model_state}, checkpoint_id=tmp)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def has_training_state(path: Path) -> bool:
    """False for a weights-only checkpoint: one holding just `model` and config.yaml."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(key.startswith("trainer.") for key in keys)


def read_config(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())
