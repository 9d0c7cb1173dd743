"""Directories a run or a tool will write to, checked before the work starts, not when it ends."""

from __future__ import annotations

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

