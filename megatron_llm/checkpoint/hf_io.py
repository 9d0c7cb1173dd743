"""Hugging Face directories: config.json plus safetensors, one file or shards with an index.

Reading memory-maps each file (safetensors safe_open) and copies out only the tensors asked for.
Writing buffers tensors up to max_shard_bytes, then writes a shard; shards are named
model-0000k-of-0000n.safetensors with model.safetensors.index.json, or model.safetensors when one
suffices, as transformers' save_pretrained does. The key table is in hf.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_llm.checkpoint.hf import HF_IGNORED, NATIVE_TO_HF, export_hf_config, model_config_from_hf, rename_key
from megatron_llm.checkpoint.stream import HEAD, check_names, native_shapes
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFReader:
    def __init__(self, path: Path):
        self.directory = Path(path)
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise UsageError(f"{path} is not a Hugging Face model directory: it has no config.json")
        self.hf_config: Optional[dict] = json.loads(config_file.read_text())
        self.config: ModelConfig = model_config_from_hf(self.hf_config)
        self.config.validate()
        self.file_of = self._weight_map()
        self._open: dict[str, object] = {}
        self._check_keys()

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file name, from the index or from the single file's own header."""
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE).is_file():
            with safe_open(self.directory / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise UsageError(f"{self.directory} has neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)")
        missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
        if missing:
            raise UsageError(f"{self.directory} lacks the shard files {missing} named by its index")
        return weight_map

    def _check_keys(self) -> None:
        tied = self.config.tie_embeddings
        expected = {rename_key(n, NATIVE_TO_HF) for n in native_shapes(self.config) if not (tied and n == HEAD)}
        present = {k for k in self.file_of if not HF_IGNORED.match(k)}
        # A tied checkpoint may still store the head (some exporters do); it is the embedding, so skipped.
        optional = {rename_key(HEAD, NATIVE_TO_HF)} if tied else set()
        check_names(f"{self.directory} does not match its config.json", expected, present - optional)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            key = rename_key(name, NATIVE_TO_HF)
            file = self.file_of[key]
            if file not in self._open:
                self._open[file] = safe_open(self.directory / file, framework="pt")
            out[name] = self._open[file].get_tensor(key)
        return out


class HFWriter:
    def __init__(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, hf_config: Optional[dict],
                 family: Optional[str], max_shard_bytes: int):
        self.path, self.cfg, self.max_shard_bytes = Path(path), cfg, max_shard_bytes
        # Built first: a family that cannot express the model is refused before any tensor is read.
        self.config_json = export_hf_config(cfg, str(dtype).removeprefix("torch."), hf_config, family)
        self.path.mkdir(parents=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []  # tensor names of each written shard
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if self.cfg.tie_embeddings and name == HEAD:
                continue  # transformers re-ties lm_head to the embedding on load
            if self.buffer and self.buffered + tensor.nbytes > self.max_shard_bytes:
                self._flush()
            self.buffer[rename_key(name, NATIVE_TO_HF)] = tensor.contiguous()
            self.buffered += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.buffer, self.path / f"part-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.total += self.buffered
        self.buffer, self.buffered = {}, 0

    def finish(self) -> int:
        if self.buffer:
            self._flush()
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            (self.path / f"part-{k}.safetensors").rename(self.path / name)
        if n > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards) for key in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.path / INDEX).write_text(json.dumps(index, indent=2))
        (self.path / "config.json").write_text(json.dumps(self.config_json, indent=2))
        return n
