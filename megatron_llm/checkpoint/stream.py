"""The format-agnostic half of conversion: our parameter names in groups, streamed from a reader to a writer.

Every format speaks our native names (tok_embeddings.weight, layers.{i}.attention.wq.weight, ...) with
whole, unsharded tensors. A reader returns the tensors of one group on request; a writer stores each
group as it comes. The groups are the embedding, then one per layer, then the final norm and head,
so a converter holds one layer (plus whatever a writer buffers, at most a pipeline stage or a shard
file) and never the whole model twice.

The names and shapes come from our model itself, built on the meta device: nothing is allocated and
no second list of parameters can drift from model/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.logging.progress import Progress
from megatron_llm.model import Transformer, meta_model
from megatron_llm.paths import remove_dead_temporaries, temporary_beside

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD = "output.weight"
EMBEDDING = "tok_embeddings.weight"
# The source's Hugging Face config.json, kept beside a Megatron or native conversion so that converting
# back restores its other fields (token ids, family).
HF_CONFIG = "hf_config.json"
ASIDE = "-replaced"  # the suffix of an output's old version moved aside while its replacement is renamed in


def native_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of our model's state dict and its shape, in state-dict order (the head included
    when tied, as a tied model's state_dict has it)."""
    return {name: tensor.shape for name, tensor in meta_model(cfg).state_dict().items()}


def native_groups(cfg: ModelConfig) -> list[list[str]]:
    """[embeddings], [layer 0's names], ..., [layer L-1's names], [final norm and head]."""
    groups: list[list[str]] = [[] for _ in range(cfg.num_layers + 2)]
    for name in native_shapes(cfg):
        module = name.split(".")[0]
        if module == "layers":
            groups[1 + int(name.split(".")[1])].append(name)
        else:
            groups[0 if module in Transformer.FIRST_STAGE else -1].append(name)
    return groups


class Reader(Protocol):
    config: ModelConfig
    hf_config: Optional[dict]  # the source's Hugging Face config.json when known, carried to the output
    directory: Path  # where tokenizer files may sit beside the weights

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors by native name. A tied model is never asked for the head."""


class Writer(Protocol):
    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One group, in the order of native_groups."""

    def finish(self) -> int:
        """Writes what is still buffered plus the metadata files; returns the number of weight files."""


@dataclass
class Totals:
    parameters: int = 0
    groups: int = 0


def stream(reader: Reader, writer: Writer, dtype: Optional[torch.dtype], label: str) -> Totals:
    """Moves every group from reader to writer, checking each shape against our model's, casting to
    `dtype` when given. A tied head is handed to the writer as a second read of the embedding: Megatron
    keeps such a copy on its last pipeline stage, Hugging Face and native writers decide for themselves;
    a writer whose `ties_head` is true (a model, whose head is its embedding) is not handed one."""
    cfg = reader.config
    shapes = native_shapes(cfg)
    groups = native_groups(cfg)
    totals = Totals()
    progress = Progress(label, len(groups), "groups")
    for names in groups:
        tied_head = cfg.tie_embeddings and HEAD in names
        wanted = [n for n in names if not (tied_head and n == HEAD)]
        tensors = reader.read(wanted)
        if tied_head and not getattr(writer, "ties_head", False):
            tensors[HEAD] = reader.read([EMBEDDING])[EMBEDDING]
        for name in tensors:
            tensor = tensors[name]
            if tensor.shape != shapes[name]:
                raise UsageError(
                    f"{name} has shape {tuple(tensor.shape)} in the input but its config implies {tuple(shapes[name])}; "
                    "the checkpoint and its config disagree"
                )
            if dtype is not None and tensor.dtype != dtype:
                tensors[name] = tensor.to(dtype)
            if not (tied_head and name == HEAD):
                totals.parameters += tensor.numel()
        writer.write(tensors)
        del tensors  # before the next read: one group in memory at a time
        totals.groups += 1
        progress.update(totals.groups)
    progress.close()
    return totals


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` (not yet created); on success it replaces `path`,
    on any error it is removed, so a failed conversion leaves no partial output behind."""
    remove_dead_temporaries(path, ASIDE)  # a killed conversion's, never a running one's
    if path.exists() and not overwrite:
        raise UsageError(f"output {path} already exists; pass --overwrite to replace it or choose another --output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # the old output moves aside whole and is deleted only once the new one has its name
        old = temporary_beside(path, ASIDE)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def check_names(where: str, expected: set, present: set, noun: str = "tensors") -> None:
    """Refuses a checkpoint whose entries differ from what its config implies, naming a few of each."""
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        parts = [f"missing {noun} {missing[:4]}" if missing else "", f"unexpected {noun} {extra[:4]}" if extra else ""]
        raise UsageError(f"{where}: " + "; ".join(part for part in parts if part))


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it is a view: torch.save writes a view's whole underlying storage, so a shard
    saved from slices of a full tensor would otherwise hold the full tensor."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def read_hf_sidecar(directory: Path) -> Optional[dict]:
    path = Path(directory) / HF_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
