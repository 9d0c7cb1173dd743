"""Our own DCP checkpoints as a conversion source or target.

A source may be a weights-only checkpoint or a trainer's step directory: only its `model.*` entries
are read, one group at a time (DCP loads exactly the keys of the template it is given), through
safe_dcp, which runs nothing stored in the files. A target is a weights-only checkpoint
(native.save_weights) that train.py --checkpoint.resume starts from; DCP stores global tensors, so it
loads at any tp/pp and no resharding is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_llm.checkpoint.native import read_config, resolve_checkpoint, save_weights
from megatron_llm.checkpoint.stream import HEAD, check_names, native_shapes, read_hf_sidecar
from megatron_llm.config import Config, ModelConfig, config_from_dict


class NativeReader:
    def __init__(self, path: Path):
        from megatron_llm.checkpoint import safe_dcp  # here, not at import: see native.py on DCP's import cost

        self.directory = Path(path)
        self.step_dir = resolve_checkpoint(str(path))
        self.config: ModelConfig = config_from_dict({"model": read_config(self.step_dir)["model"]}).model
        self.config.validate()
        self.hf_config: Optional[dict] = read_hf_sidecar(self.step_dir)
        self.metadata = safe_dcp.read_metadata(self.step_dir).state_dict_metadata
        tied = self.config.tie_embeddings
        expected = {f"model.{n}" for n in native_shapes(self.config) if not (tied and n == HEAD)}
        present = {k for k in self.metadata if k.startswith("model.")} - ({f"model.{HEAD}"} if tied else set())
        check_names(f"{self.step_dir} does not match its config.yaml", expected, present)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron_llm.checkpoint import safe_dcp

        template = {}
        for name in names:
            meta = self.metadata[f"model.{name}"]
            template[f"model.{name}"] = torch.empty(meta.size, dtype=meta.properties.dtype)
        safe_dcp.load(template, self.step_dir)
        return {name: template[f"model.{name}"] for name in names}


class NativeWriter:
    """DCP writes one checkpoint from one complete state dict, so the groups are collected: the whole
    model is held once, in the output dtype (never a second copy)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        self.path, self.cfg = Path(path), cfg
        self.state: dict[str, torch.Tensor] = {}

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state.update(tensors)

    def finish(self) -> int:
        config = Config(model=self.cfg).to_dict()
        save_weights(self.path, self.state, config)
        self.state = {}
        return len(list(self.path.glob("*.distcp")))
