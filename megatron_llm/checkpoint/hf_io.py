"""Hugging Face directories: config.json plus safetensors, one file or shards with an index.

Reading memory-maps each file (safetensors safe_open) and copies out only the tensors asked for.
Writing streams each tensor into a planned place in its shard (see HFWriter); shards are named
model-0000k-of-0000n.safetensors with model.safetensors.index.json, or model.safetensors when one
suffices, as transformers' save_pretrained does. The name tables are the families' (checkpoint/families/).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from megatron_llm.checkpoint.families import family
from megatron_llm.checkpoint.families.multimodal import unwrap, wrap_config
from megatron_llm.checkpoint.hf import HF_IGNORED, export_hf_config, model_config_from_hf, text_family
from megatron_llm.checkpoint.stream import HEAD, check_names, native_shapes
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
WRITE_CHUNK = 64 << 20  # bytes per positioned write: large tensors are split among the writer threads


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator:
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise UsageError(f"{path} is not a complete safetensors file ({e}): a cut download or copy?") from None


class HFReader:
    def __init__(self, path: Path, quiet: bool = False):
        self.directory = Path(path)
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise UsageError(f"{path} is not a Hugging Face model directory: it has no config.json")
        self.config_json = _read_json(config_file)  # as stored: a multimodal wrapper's whole config
        self.config: ModelConfig = model_config_from_hf(self.config_json)
        self.config.validate()
        self.family = text_family(self.config_json)
        self.weight_map = self._weight_map()
        # A multimodal checkpoint is read as its language model: its config and tensors by the text model's names.
        self.text = unwrap(self.config_json, list(self.weight_map))
        self.hf_config: Optional[dict] = self.text.hf_config  # carried to the output: the text model is what we write
        self.stored = self.text.stored  # the text model's tensor name -> the name in the files
        self.file_of = {name: self.weight_map[at] for name, at in self.stored.items()}
        self.config = model_config_from_hf(self.config_json, self.stored)  # now with the depths the files hold
        self.config.validate()
        self._check_keys()
        note = self.text.note(str(path))
        if note and not quiet:
            print(note, flush=True)

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file name, from the index or from the single file's own header."""
        index = self.directory / INDEX
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
        elif (self.directory / SINGLE).is_file():
            with _open_safetensors(self.directory / SINGLE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise UsageError(f"{self.directory} has neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)")
        missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
        if missing:
            raise UsageError(f"{self.directory} lacks the shard files {missing} named by its index")
        for file in sorted(set(weight_map.values())):
            with _open_safetensors(self.directory / file):  # a cut file is named now, before any output exists
                pass
        return weight_map

    def _check_keys(self) -> None:
        tied = self.config.tie_embeddings
        shapes = {n: shape for n, shape in native_shapes(self.config).items() if not (tied and n == HEAD)}
        expected = set(self.family.hf_names(shapes, self.config))
        present = {k for k in self.file_of if not HF_IGNORED.match(k)}
        present -= {k for k in present - expected if self.family.is_unused(k)}  # stored, but of no use to the model
        # A tied checkpoint may still store the head (some exporters do); it is the embedding, so skipped.
        optional = {self.family.hf_name(HEAD, self.config)} if tied else set()
        check_names(f"{self.directory} does not match its config.json", expected, present - optional)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Opens the files for this group only: a mapping kept open would keep every page read so far
        resident, so the process would grow to the size of the input."""
        keys = {key for name in names for key in self.family.hf_keys(name, self.config)}
        theirs = {}
        for file in sorted({self.file_of[key] for key in keys}):
            with _open_safetensors(self.directory / file) as f:
                theirs.update({key: f.get_tensor(self.stored[key]) for key in keys if self.file_of[key] == file})
        return self.family.from_hf(names, theirs.__getitem__, self.config)


@dataclass(frozen=True)
class Stored:
    """A tensor where a safetensors file keeps it: copied through byte for byte, whatever its dtype."""

    file: str
    dtype: str  # safetensors' name: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    begin: int  # its first byte in the file
    size: int  # bytes


def stored_tensors(directory: Path, weight_map: dict[str, str]) -> dict[str, Stored]:
    """Every tensor of a checkpoint as its files' headers place it (the files were opened whole by HFReader)."""
    out = {}
    for file in sorted(set(weight_map.values())):
        with open(directory / file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if weight_map.get(name) == file:  # not __metadata__, nor a tensor the index places elsewhere
                begin, end = entry["data_offsets"]
                out[name] = Stored(file, entry["dtype"], tuple(entry["shape"]), 8 + length + begin, end - begin)
    return out


class HFWriter:
    """Streams each tensor straight into its place in a shard file. Every name, shape and dtype is known
    from the config before the first tensor arrives, so the shards and their safetensors headers are
    planned up front and nothing is buffered: memory stays at one group whatever the shard size.
    The bytes go out as positioned writes (pwrite, which releases the GIL) from a few threads: copying
    into the page cache is most of a conversion's time, and threads share it among the cores.

    Written `into` a multimodal checkpoint (an HFReader of it), the output is that checkpoint with our model as
    its language model: its config.json with ours as text_config, our tensors under its prefixes, and its other
    tensors (vision tower, projector) copied from its files in chunks, byte for byte."""

    def __init__(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, hf_config: Optional[dict],
                 model_type: Optional[str], max_shard_bytes: int, into: Optional[HFReader] = None):
        self.path, self.dtype, self.into = Path(path), dtype, into
        # Built first: a family that cannot express the model is refused before any tensor is read.
        dtype_name = str(dtype).removeprefix("torch.")
        if into is None:
            self.config_json = text = export_hf_config(cfg, dtype_name, hf_config, model_type)
        else:
            text = export_hf_config(cfg, dtype_name, into.config_json, into.family.model_type)
            self.config_json = wrap_config(into.config_json, text)
        self.cfg, self.family = cfg, family(text["model_type"])
        shapes = {n: s for n, s in native_shapes(cfg).items() if not (cfg.tie_embeddings and n == HEAD)}  # re-tied on load
        ours = {name: tuple(shape) for name, shape in self.family.hf_names(shapes, cfg).items()}
        self.stored_as, stored_shapes, self.copied = _placed_into(ours, into) if into else ({n: n for n in ours}, ours, {})
        self.transposed = {name for name, shape in ours.items() if stored_shapes[name] != shape}
        planned = {self.stored_as[name]: (math.prod(shape) * dtype.itemsize, stored_shapes[name], SAFETENSORS_DTYPES[dtype])
                   for name, shape in ours.items()}
        planned.update({name: (t.size, t.shape, t.dtype) for name, t in self.copied.items()})
        self.path.mkdir(parents=True)
        self.shards = _plan(planned, max_shard_bytes)
        n = len(self.shards)
        self.files = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.place = {name: (k, entry[0]) for k, shard in enumerate(self.shards) for name, entry in shard.items()}
        self.left = [len(shard) for shard in self.shards]  # tensors still to come, per shard
        self.fds: dict[int, tuple[int, int]] = {}  # open shard -> (file descriptor, where its data starts)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        jobs = []
        for name, tensor in self.family.to_hf(tensors, self.cfg).items():
            if name not in self.stored_as:
                continue  # the tied head
            tensor = tensor.transpose(-2, -1) if name in self.transposed else tensor
            fd, at = self._target(self.stored_as[name])
            data = tensor.to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            for offset in range(0, data.nbytes, WRITE_CHUNK):
                jobs.append(self.pool.submit(_pwrite, fd, data[offset : offset + WRITE_CHUNK], at + offset))
        self._wait(jobs)  # written before the group's tensors are let go

    def _copy_through(self) -> None:
        """The multimodal checkpoint's other tensors, WRITE_CHUNK bytes at a time: never a whole tower in memory."""
        sources = {file: os.open(self.into.directory / file, os.O_RDONLY) for file in {t.file for t in self.copied.values()}}
        jobs = []
        for name, t in self.copied.items():
            fd, at = self._target(name)
            for offset in range(0, t.size, WRITE_CHUNK):
                size = min(WRITE_CHUNK, t.size - offset)
                jobs.append(self.pool.submit(_copy, sources[t.file], t.begin + offset, size, fd, at + offset))
        try:
            self._wait(jobs)
        finally:
            for source in sources.values():
                os.close(source)

    def _target(self, name: str) -> tuple[int, int]:
        """(shard's file descriptor, offset of the tensor `name` in it), counting it as written."""
        k, start = self.place[name]
        fd, data_start = self.fds[k] if k in self.fds else self._create(k)
        self.left[k] -= 1
        return fd, data_start + start

    def _wait(self, jobs: list) -> None:
        for job in jobs:
            job.result()  # re-raises a failed write
        for k in [k for k in self.fds if self.left[k] == 0]:
            os.close(self.fds.pop(k)[0])

    def _create(self, k: int) -> tuple[int, int]:
        """Opens shard k and writes its header: u64 length, then JSON padded to 8 bytes, as safetensors does."""
        entries = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + size]}
                   for name, (start, size, shape, dtype) in self.shards[k].items()}
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        fd = os.open(self.path / self.files[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
        self.fds[k] = (fd, 8 + len(header))
        return self.fds[k]

    def finish(self) -> int:
        if self.copied:
            self._copy_through()
        self.pool.shutdown()
        if self.fds:
            raise RuntimeError(f"shards {sorted(self.fds)} were not completed")  # a reader skipped a tensor: a bug
        if len(self.files) > 1:
            weight_map = {name: file for file, shard in zip(self.files, self.shards) for name in shard}
            total = sum(entry[1] for shard in self.shards for entry in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.path / INDEX).write_text(json.dumps(index, indent=2))
        (self.path / "config.json").write_text(json.dumps(self.config_json, indent=2))
        return len(self.files)


def _placed_into(ours: dict[str, tuple], into: HFReader) -> tuple[dict[str, str], dict[str, tuple], dict[str, Stored]]:
    """Our tensors' stored names and shapes in the multimodal checkpoint `into` (its layout's prefixes; stacked
    experts it stores [E, in, out], as published Qwen3-VL-MoE, so too: transformers reads either by its own shape)
    and the tensors of `into` that are not its language model's."""
    theirs = stored_tensors(into.directory, into.weight_map)
    names, shapes = {}, {}
    for name, shape in ours.items():
        at = names[name] = into.text.stored_name(name)
        shapes[name] = theirs[at].shape if at in theirs else shape
        swapped = (*shape[:-2], shape[-1], shape[-2]) if len(shape) == 3 else shape
        if shapes[name] not in (shape, swapped):
            raise UsageError(f"{into.directory} stores {at} as {list(shapes[name])} where our language model has "
                             f"{list(shape)}: the checkpoint and its config.json disagree")
    language = set(into.stored.values())
    return names, shapes, {name: t for name, t in theirs.items() if name not in language}


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy(source: int, begin: int, size: int, fd: int, offset: int) -> None:
    _pwrite(fd, os.pread(source, size, begin), offset)  # whole: HFReader checked each file's length (safe_open)


def _plan(entries: dict[str, tuple], max_shard_bytes: int) -> list[dict]:
    """Tensors (name -> bytes, shape, safetensors dtype), widest dtype first (so each starts aligned to its
    dtype, as safetensors orders them) and else in order, cut into shards of at most max_shard_bytes (a larger
    tensor gets its own): each shard maps name -> (offset in its data, bytes, shape, dtype)."""
    def itemsize(entry: tuple) -> int:
        return entry[0] // max(1, math.prod(entry[1]))

    shards: list[dict] = [{}]
    used = 0
    for name, (size, shape, dtype) in sorted(entries.items(), key=lambda item: -itemsize(item[1])):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = (used, size, shape, dtype)
        used += size
    return shards
