"""Reading DCP checkpoints without running anything stored in them.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with plain `pickle.load` and each
non-tensor value (a step count, the optimizer's betas) with `torch.load(weights_only=False)`: a
crafted checkpoint would run code on load. Every read of ours goes through SafeReader and SafePlanner:
  - `.metadata` is unpickled by an Unpickler that builds only the types DCP's metadata holds (the
    list below, taken from our own checkpoints); any other type is refused before it is built;
  - values are read with `torch.load(weights_only=True)`, torch's allow-list of plain data.
Before any tensor is read, every shard file is checked to hold all the bytes the metadata places in
it, so a truncated or missing file is named instead of failing deep inside torch.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_llm.errors import UsageError

_DCP = "torch.distributed.checkpoint.metadata"
METADATA_TYPES = {
    *((_DCP, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset and length of an entry
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("pathlib", "PosixPath"),  # the directory it was saved to
}
TRUST = "nothing in it was run. Load only checkpoints from a source you trust"


@contextlib.contextmanager
def quiet_dcp():
    # DCP warns when it runs without a process group; a single-process load is what we want.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in METADATA_TYPES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(step_dir: Path) -> Metadata:
    """A checkpoint's `.metadata`, unpickled with the allow-list only."""
    path = Path(step_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UsageError(f"{step_dir} is not a complete checkpoint: it has no .metadata") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("GLOBAL "):
            _refuse(str(path), str(e).removeprefix("GLOBAL "))
        raise UsageError(f"{path} is truncated or corrupt ({e}); the checkpoint cannot be read") from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:  # what a cut or scrambled pickle raises
        reason = f"{type(e).__name__}: {e}"
        raise UsageError(f"{path} is truncated or corrupt ({reason}); the checkpoint cannot be read") from None


def _refuse(where: str, what: str) -> NoReturn:
    raise UsageError(f"refused to load {where}: it would build {what}, which a DCP checkpoint never holds; {TRUST}")


def check_complete(step_dir: Path, metadata: Metadata) -> None:
    """Every shard file holds all the bytes the metadata places in it (a cut copy, a full disk)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = Path(step_dir) / name
        if not file.is_file():
            raise UsageError(f"{file} is missing: the checkpoint's .metadata places data in it")
        if file.stat().st_size < size:
            raise UsageError(
                f"{file} is truncated: {file.stat().st_size:,} of the {size:,} bytes its .metadata places in it"
            )


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader with the restricted `.metadata` and the completeness check."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        check_complete(Path(self.path), metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values load with torch.load(weights_only=True)."""

    def __init__(self, step_dir: Path):
        super().__init__()
        self.step_dir = step_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first type it refused
            found = named[1] if named else "code"
            _refuse(f"{read_item.dest_index.fqn} of {self.step_dir}", found)
        if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with the value
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, step_dir: Path) -> None:
    """dcp.load into `state` through SafeReader and SafePlanner. DCP wraps each rank's failure in a
    CheckpointException: ours come back out as the UsageError they were."""
    try:
        with quiet_dcp():
            dcp.load(state, storage_reader=SafeReader(str(step_dir)), planner=SafePlanner(Path(step_dir)))
    except CheckpointException as e:
        rank, (inner, _) = min(e.failures.items(), key=lambda item: item[0])
        if isinstance(inner, UsageError):
            raise inner from None
        reason = str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__
        raise UsageError(f"cannot read checkpoint {step_dir} (rank {rank}: {reason})") from None
