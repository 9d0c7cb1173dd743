"""Where a run or a tool writes: directories checked before the work starts, not when it ends, and small
files written whole or not at all."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from megatron_llm.errors import UsageError


def writable_directory(path: str, key: str) -> Path:
    """Creates `path` if needed and proves it writable by creating and removing a file in it (the
    permission bits do not tell: root ignores them, a read-only mount does not show in them)."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except FileExistsError:
        raise UsageError(f"{key} {path} is a file, not a directory: choose another place") from None
    except OSError as e:
        raise UsageError(f"{key} {path} is not writable ({e.strerror or e}): choose a writable place") from None
    return directory


def temporary_beside(path: Path, suffix: str = "") -> Path:
    """`.tmp-NAME-HOST-PID[suffix]` beside `path`, for a whole directory written under another name and renamed
    into place: the writer's host and pid in the name let a later writer tell a killed one's leftovers from
    those of one still running (two may write the same output), as remove_dead_temporaries does."""
    return path.with_name(f".tmp-{path.name}-{socket.gethostname()}-{os.getpid()}{suffix}")


def remove_dead_temporaries(path: Path, aside_suffix: Optional[str] = None) -> None:
    """Removes the temporaries of `path` (temporary_beside) left by processes of this host that no longer run,
    saying so in one line each; an older `path` that one had moved aside (`aside_suffix`) and not yet replaced
    is put back instead. Another host's are left alone: whether its pid still runs cannot be told from here."""
    name = re.compile(rf"^\.tmp-{re.escape(path.name)}-{re.escape(socket.gethostname())}-(\d+)(.*)$")
    entries = path.parent.iterdir() if path.parent.is_dir() else ()
    found = [(entry, match) for entry in entries if (match := name.match(entry.name)) and match[2] in ("", aside_suffix)]
    for entry, match in sorted(found, key=lambda item: not item[1][2]):  # asides first: one may be put back
        pid, aside = int(match[1]), bool(match[2])
        if _running(pid):
            continue
        if aside and not path.exists():
            os.replace(entry, path)
            print(f"restored {path}, which a killed process ({pid}) was replacing", flush=True)
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        print(f"removed {entry}, left unfinished by a killed process ({pid})", flush=True)


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this host (a reused pid counts as running: its temporary is kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary name beside it, synced and renamed: a reader, or a crash,
    finds the file before or the file after, never a part of it. Two writers of one path each have their own
    temporary; a killed writer's is removed by the next write."""
    remove_dead_temporaries(path)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
