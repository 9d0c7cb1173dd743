"""Native checkpoints: torch.distributed.checkpoint (DCP) directories, written atomically.

Layout of `checkpoint.dir`:
    step_0000100/      .metadata + *.distcp shards (model, optimizer, trainer state) and config.yaml
    latest             text file naming the newest complete step directory
    .lock              held by the run writing here (run_dir.py)

A save goes to `.tmp-<run tag>-step_XXXXXXX/` (no two runs share a temporary name), is renamed into
place once every rank has written, and only then is `latest` replaced (write, fsync, rename). A crash
at any point leaves `latest` naming a complete checkpoint. Retention keeps the newest saves, never the
one `latest` names. DCP stores each tensor with its global shape, so a later run may load it at another
layout. Reading goes through safe_dcp: nothing stored in a checkpoint is ever run.

DCP and the layout-free state (parallel.state) are imported where a checkpoint is read or written, not at
import: they pull in torch.distributed.tensor (about 1 s), and inference, which imports read_config and
resolve_checkpoint to load a Hugging Face model, would pay that in every worker.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from megatron_llm.errors import UsageError
from megatron_llm.paths import remove_dead_temporaries, temporary_beside, write_atomically

STEP_DIR = re.compile(r"^step_(\d{7})$")
TMP_PREFIX = ".tmp-"  # everything named so is a save in progress, or left by a killed one


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under one directory."""

    def __init__(self, directory: str, keep: int, is_writer: bool, run_tag: str = "run"):
        self.dir = Path(directory)
        self.keep = keep
        self.is_writer = is_writer  # one rank renames, points `latest` and prunes
        self.run_tag = run_tag  # the same on every rank of a run, different for every run

    def latest(self) -> Optional[Path]:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / ".metadata").exists():
            raise UsageError(f"{pointer} names {path}, which is not a complete checkpoint; fix or remove the pointer")
        return path

    def resume_point(self) -> Optional[Path]:
        """What `checkpoint.resume auto` continues from: `latest`, or, when that one cannot be read (a
        truncated copy, a missing shard), the newest save that can, saying so. None in an empty directory."""
        from megatron_llm.checkpoint import safe_dcp

        pointer = self.dir / "latest"
        named = [self.dir / pointer.read_text().strip()] if pointer.exists() else []
        problems = []
        for path in dict.fromkeys(named + saves_newest_first(self.dir)):
            try:
                safe_dcp.check_complete(path, safe_dcp.read_metadata(path))
            except UsageError as e:
                problems.append(str(e))
                continue
            if problems and self.is_writer:
                print(f"{problems[0]}: resuming from the previous complete checkpoint {path}", flush=True)
            return path
        if problems:
            raise UsageError(f"no complete checkpoint in {self.dir}: {problems[0]}")
        return None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, config: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from megatron_llm.parallel.state import layout_free_state

        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{self.run_tag}-{final.name}"
        model_sd, optim_sd = layout_free_state(model, optimizer)
        try:
            dcp.save({"model": model_sd, "optimizer": optim_sd, "trainer": trainer_state}, checkpoint_id=tmp)
            _barrier()
            if self.is_writer:
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                self._move_into_place(tmp, final)
                write_atomically(self.dir / "latest", final.name + "\n")
                self._prune(final)
            _barrier()
        except (OSError, CheckpointException) as e:  # DCP wraps a rank's failed write in CheckpointException
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            pointer = self.dir / "latest"
            kept = (f"the previous checkpoint is intact ({pointer.read_text().strip()})" if pointer.exists()
                    else "no checkpoint was written before")
            raise UsageError(
                f"cannot write checkpoint {final} ({_write_failure(e, self.dir)}); {kept}: "
                "free space or point checkpoint.dir at a writable place"
            ) from None
        return final

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Renames a finished save to its step name. An older save of that step (a run resumed from an
        earlier checkpoint) is renamed aside first, never deleted in place, so `latest` cannot name a
        half-deleted directory; run_dir puts it back if a crash falls between the two renames."""
        aside = self.dir / f"{TMP_PREFIX}{self.run_tag}-replaced-{final.name}"
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        """Restores model and optimizer in place; returns the saved values of `trainer_state`'s keys
        (DCP loads into a template: only keys present in it are read).

        A weights-only checkpoint (written by tools/convert_checkpoint.py) restores the model alone and
        returns {}: training starts at step 0 from those weights.
        """
        from megatron_llm.checkpoint import safe_dcp
        from megatron_llm.parallel.state import layout_free_state, load_layout_free_state

        if not has_training_state(path):
            optimizer, trainer_state = None, {}
        model_sd, optim_sd = layout_free_state(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "trainer": dict(trainer_state)}
        safe_dcp.load(state, path)
        load_layout_free_state(model, optimizer, state["model"], state["optimizer"])
        return state["trainer"]

    def _prune(self, written: Path) -> None:
        """Keeps the `keep` newest saves, by time and not by step number: a run resumed from an earlier
        step writes lower numbers than the saves it follows, and must not delete its own."""
        if self.keep <= 0:
            return
        others = [p for p in saves_newest_first(self.dir) if p != written]
        for old in others[self.keep - 1 :]:
            shutil.rmtree(old, ignore_errors=True)


def saves_newest_first(directory: Path) -> list[Path]:
    """The complete step directories, the most recently saved first (the time their .metadata was
    written; the step number breaks ties)."""
    if not directory.is_dir():
        return []
    steps = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(steps, key=lambda p: ((p / ".metadata").stat().st_mtime_ns, p.name), reverse=True)


def _write_failure(e: BaseException, directory: Path) -> str:
    """One line: the first failed rank's error (torch's writer reports a full disk as a short write),
    and the free space left, which is what the user checks first."""
    from torch.distributed.checkpoint.api import CheckpointException

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


def resolve_checkpoint(path: str) -> Path:
    """A step directory, or a checkpoint.dir whose `latest` names one."""
    p = Path(path)
    if (p / ".metadata").exists():
        return p
    latest = Checkpointer(str(p), keep=0, is_writer=False).latest() if p.is_dir() else None
    if latest is None:
        # Another format's files (megatron_io.TRACKER, hf_io's config.json), named: its loaders take it as it is.
        other = ("a Megatron-LM" if (p / "latest_checkpointed_iteration.txt").is_file() else
                 "a Hugging Face" if (p / "config.json").is_file() else None)
        raise UsageError(f"{path} is not a native checkpoint: expected a step directory with .metadata or a 'latest' file"
                         + (f"; it is {other} one: give its format, or start a run from it with checkpoint.init_from"
                            if other else ""))
    return latest


def save_weights(path: Path, model_state: dict[str, torch.Tensor], config: dict) -> None:
    """A weights-only checkpoint at `path` (atomically: a temporary directory renamed into place).
    `config` is a full config dict (Config.to_dict()); train.py can resume from the result."""
    import torch.distributed.checkpoint as dcp

    from megatron_llm.checkpoint.safe_dcp import quiet_dcp

    path = Path(path)
    remove_dead_temporaries(path)
    tmp = temporary_beside(path)
    try:
        with quiet_dcp():  # no_dist: one process writes it, even inside a run's process group (init_from's rank 0)
            dcp.save({"model": model_state}, checkpoint_id=tmp, no_dist=True)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def has_training_state(path: Path) -> bool:
    """False for a weights-only checkpoint: one holding just `model` and config.yaml."""
    from megatron_llm.checkpoint import safe_dcp

    keys = safe_dcp.read_metadata(path).state_dict_metadata
    return any(key.startswith("trainer.") for key in keys)


def read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # missing, not UTF-8 (a ValueError), not YAML
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]  # YAML's spans lines
        raise UsageError(f"cannot read {path / 'config.yaml'} ({reason}); a checkpoint needs its config to load") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UsageError(f"{path / 'config.yaml'} holds no model section; it is not one of our checkpoints")
    return config
