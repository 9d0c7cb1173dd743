"""Hugging Face directories: config.json plus safetensors, one file or shards with an index.

Reading memory-maps each file (safetensors safe_open) and copies out only the tensors asked for.
Writing streams each tensor into a planned place in its shard (see HFWriter); shards are named
model-0000k-of-0000n.safetensors with model.safetensors.index.json, or model.safetensors when one
suffices, as transformers' save_pretrained does. The name tables are the families' (checkpoint/families/).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from megatron_llm.checkpoint.families import family
from megatron_llm.checkpoint.families.multimodal import unwrap
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
    def __init__(self, path: Path):
        self.directory = Path(path)
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise UsageError(f"{path} is not a Hugging Face model directory: it has no config.json")
        hf_config = _read_json(config_file)
        self.config: ModelConfig = model_config_from_hf(hf_config)
        self.config.validate()
        self.family = text_family(hf_config)
        weight_map = self._weight_map()
        # A multimodal checkpoint is read as its language model: its config and tensors by the text model's names.
        text = unwrap(hf_config, list(weight_map))
        self.hf_config: Optional[dict] = text.hf_config  # carried to the output: the text model is what we write
        self.stored = text.stored  # the text model's tensor name -> the name in the files
        self.file_of = {name: weight_map[at] for name, at in self.stored.items()}
        self._check_keys()
        note = text.note(str(path))
        if note:
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


class HFWriter:
    """Streams each tensor straight into its place in a shard file. Every name, shape and dtype is known
    from the config before the first tensor arrives, so the shards and their safetensors headers are
    planned up front and nothing is buffered: memory stays at one group whatever the shard size.
    The bytes go out as positioned writes (pwrite, which releases the GIL) from a few threads: copying
    into the page cache is most of a conversion's time, and threads share it among the cores."""

    def __init__(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, hf_config: Optional[dict],
                 model_type: Optional[str], max_shard_bytes: int):
        self.path, self.dtype = Path(path), dtype
        # Built first: a family that cannot express the model is refused before any tensor is read.
        self.config_json = export_hf_config(cfg, str(dtype).removeprefix("torch."), hf_config, model_type)
        self.cfg, self.family = cfg, family(self.config_json["model_type"])
        self.path.mkdir(parents=True)
        shapes = {n: s for n, s in native_shapes(cfg).items() if not (cfg.tie_embeddings and n == HEAD)}  # re-tied on load
        self.shards = _plan(self.family.hf_names(shapes, cfg), dtype.itemsize, max_shard_bytes)
        n = len(self.shards)
        self.files = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.place = {name: (k, start) for k, shard in enumerate(self.shards) for name, (start, _, _) in shard.items()}
        self.left = [len(shard) for shard in self.shards]  # tensors still to come, per shard
        self.fds: dict[int, tuple[int, int]] = {}  # open shard -> (file descriptor, where its data starts)
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        jobs = []
        for name, tensor in self.family.to_hf(tensors, self.cfg).items():
            if name not in self.place:
                continue  # the tied head
            k, start = self.place[name]
            fd, data_start = self.fds[k] if k in self.fds else self._create(k)
            data = tensor.to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            for offset in range(0, data.nbytes, WRITE_CHUNK):
                jobs.append(self.pool.submit(_pwrite, fd, data[offset : offset + WRITE_CHUNK], data_start + start + offset))
            self.left[k] -= 1
        for job in jobs:
            job.result()  # written before the group's tensors are let go; re-raises a failed write
        for k in [k for k in self.fds if self.left[k] == 0]:
            os.close(self.fds.pop(k)[0])

    def _create(self, k: int) -> tuple[int, int]:
        """Opens shard k and writes its header: u64 length, then JSON padded to 8 bytes, as safetensors does."""
        entries = {name: {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                                                    "data_offsets": [start, start + size]}
                   for name, (start, size, shape) in self.shards[k].items()}
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        fd = os.open(self.path / self.files[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
        self.fds[k] = (fd, 8 + len(header))
        return self.fds[k]

    def finish(self) -> int:
        self.pool.shutdown()
        if self.fds:
            raise RuntimeError(f"shards {sorted(self.fds)} were not completed")  # a reader skipped a tensor: a bug
        if len(self.files) > 1:
            weight_map = {name: file for file, shard in zip(self.files, self.shards) for name in shard}
            total = sum(size for shard in self.shards for _, size, _ in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.path / INDEX).write_text(json.dumps(index, indent=2))
        (self.path / "config.json").write_text(json.dumps(self.config_json, indent=2))
        return len(self.files)


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _plan(shapes: dict, itemsize: int, max_shard_bytes: int) -> list[dict]:
    """Native names in order, cut into shards of at most max_shard_bytes (a larger tensor gets its own):
    each shard maps name -> (offset in its data, bytes, shape)."""
    shards: list[dict] = [{}]
    used = 0
    for name, shape in shapes.items():
        size = shape.numel() * itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = (used, size, shape)
        used += size
    return shards
