"""The checkpoint directory of a training run: checked, locked and tidied before the data and model are built.

- Another run's checkpoints. A fresh run (no checkpoint.resume) into a directory that holds checkpoints
  would move `latest` to its own saves and prune the other run's: refused, naming the three ways on,
  unless checkpoint.overwrite. A launcher restart continues its run (faults.restarted_by_launcher).
- Writable. Every rank writes its own DCP shard, so every rank proves now that it can write there,
  rather than at the first save hours later; the logging rank does the same for TensorBoard.
- Lock. The writing rank holds an exclusive flock on `.lock` for the whole run, so a second run into
  the directory is refused instead of the two overwriting each other's saves. The kernel drops a flock
  when its process dies, however it dies: a lock file left by a killed run locks nothing, and the next
  run takes it over, naming the owner written in it.
- Stale temporaries. Under the lock no other run can be writing `.tmp-*` entries: they are saves a
  killed run never finished, and are removed (an older save renamed aside is put back instead).
- No empty leftovers. A run that fails before it writes anything there (a data error only the full
  read finds, a crash at start-up) removes the directory it created and its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from megatron_llm.checkpoint.native import STEP_DIR, TMP_PREFIX, Checkpointer, resolve_checkpoint, saves_newest_first
from megatron_llm.config import Config
from megatron_llm.errors import UsageError
from megatron_llm.paths import writable_directory
from megatron_llm.training.faults import refuse_together, restarted_by_launcher

ASIDE = re.compile(rf"^{re.escape(TMP_PREFIX)}\w+-replaced-(step_\d{{7}})$")  # native.Checkpointer._move_into_place


@dataclass
class RunDirectory:
    checkpointer: Checkpointer
    resume_from: Optional[Path]  # the checkpoint to continue from; None starts from scratch


@contextlib.contextmanager
def open_run_directory(cfg: Config, is_writer: bool) -> Iterator[RunDirectory]:
    """Every rank enters; a refusal on any rank stops all of them here. The lock lasts until exit."""
    ckpt = cfg.checkpoint
    created = _outermost_missing(Path(ckpt.dir))  # before the collectives below: no rank has made it yet
    restarted = restarted_by_launcher()  # collectives first: after this point a rank may refuse alone
    checkpointer = Checkpointer(ckpt.dir, ckpt.keep, is_writer, run_tag=_run_tag())
    with contextlib.ExitStack() as held:
        with refuse_together():
            resume = ckpt.resume or ("auto" if restarted else None)  # a restart continues its own run
            if resume is None and not ckpt.overwrite:
                _refuse_foreign_checkpoints(Path(ckpt.dir))
            if is_writer and cfg.logging.tensorboard_dir:
                writable_directory(cfg.logging.tensorboard_dir, "logging.tensorboard_dir")
            directory = writable_directory(ckpt.dir, "checkpoint.dir")
            if is_writer:
                lock = held.enter_context(_DirectoryLock(directory))
                if created is not None:  # runs on leaving, before the lock is released
                    held.push(lambda failed, *_: _remove_if_unused(created, lock.path) if failed else None)
                _remove_stale_temporaries(directory)
            resume_from = _resume_point(resume, checkpointer)
        yield RunDirectory(checkpointer, resume_from)


def _outermost_missing(path: Path) -> Optional[Path]:
    """The outermost directory that creating `path` would create; None when `path` exists."""
    path, missing = path.resolve(), None
    while not path.exists():
        path, missing = path.parent, path
    return missing


def _remove_if_unused(created: Path, lock: Path) -> None:
    """Removes `created` and the directories under it when they hold nothing but `lock`. rmdir, not rmtree,
    removes only empty directories: whatever another process writes there meanwhile stays."""
    entries, lock = list(created.rglob("*")), lock.resolve()  # created is resolved: so are the entries
    if any(entry != lock and (entry.is_symlink() or not entry.is_dir()) for entry in entries):
        return
    lock.unlink(missing_ok=True)  # while still held: no other run can have taken it
    for directory in sorted(entries + [created], key=lambda entry: len(entry.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _run_tag() -> str:
    """A name part no other run shares, the same on every rank (rank 0 draws it)."""
    tag = [uuid.uuid4().hex[:8]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(tag, src=0)
    return tag[0]


def _refuse_foreign_checkpoints(directory: Path) -> None:
    saves = saves_newest_first(directory)
    if saves:
        pointer = directory / "latest"
        found = pointer.read_text().strip() if pointer.exists() else saves[0].name
        step = int(STEP_DIR.match(found)[1]) if STEP_DIR.match(found) else found
        raise UsageError(
            f"checkpoint.dir {directory} already holds another run's checkpoints (up to step {step}); continue "
            "that run with --checkpoint.resume auto, choose another --checkpoint.dir, or start over there "
            "with --checkpoint.overwrite true"
        )


def _resume_point(resume: Optional[str], checkpointer: Checkpointer) -> Optional[Path]:
    if resume is None:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    path = checkpointer.resume_point()
    if path is None and checkpointer.is_writer:
        print(f"no checkpoint in {checkpointer.dir}: starting from scratch", flush=True)
    return path


class _DirectoryLock:
    """An exclusive flock on DIR/.lock while inside; the file names its holder (pid on host)."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.file = None

    def __enter__(self) -> "_DirectoryLock":
        self.file = open(self.path, "a+")  # not "w": the owner's line is read before it is replaced
        locked = self._lock()
        self.file.seek(0)
        previous = self.file.read().strip()  # empty after a clean exit
        if locked and previous:
            print(f"took over the lock of {self.path.parent} from {previous}, which is no longer running", flush=True)
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return self

    def _lock(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise UsageError(
                f"checkpoint.dir {self.path.parent} is in use by another run ({owner}); two runs would overwrite "
                "each other's checkpoints: wait for it to end or choose another checkpoint.dir"
            ) from None
        except OSError as e:  # a file system without locks (some network mounts): run, unguarded, and say so
            print(f"warning: cannot lock {self.path} ({e.strerror}): a second run would go unnoticed", flush=True)
            return False
        return True

    def __exit__(self, *exc) -> None:
        self.file.truncate(0)  # released cleanly: the next run has nothing to take over
        self.file.close()


def _remove_stale_temporaries(directory: Path) -> None:
    for path in sorted(p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)):
        aside = ASIDE.match(path.name)
        if aside and not (directory / aside[1]).exists():
            os.replace(path, directory / aside[1])
            print(f"restored {directory / aside[1]}, which a killed run was replacing", flush=True)
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"removed {path} ({size / 2**20:.1f} MiB), a save left unfinished by a killed run", flush=True)
