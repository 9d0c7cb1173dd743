"""Where a run or a tool writes: directories checked before the work starts, not when it ends, and small
files written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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



def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary name beside it, synced and renamed: a reader, or a crash,
    finds the file before or the file after, never a part of it."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
