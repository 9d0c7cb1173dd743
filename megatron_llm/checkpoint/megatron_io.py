"""Megatron-LM's legacy checkpoint directories, read lazily and written one pipeline stage at a time.

    <dir>/latest_checkpointed_iteration.txt          "release" (what we write) or an iteration number
    <dir>/release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt {args, checkpoint_version, iteration, model}

(_PPP when pp > 1, _EEE when expert parallel: each EP rank's file repeats the non-expert tensors and
holds its E/ep experts, split over expert_tensor_parallel_size ranks. With that etp < tp, Megatron's
"parallel folding", only the (tp rank, ep rank) pairs of megatron-core's rank order exist: Layout.files.)

Files are opened with torch.load(weights_only=True, mmap=True): unpickling may build only the types on
an allow-list (a pickle that would run code is refused, not run), and tensors stay on disk until a
layer needs them, so optimizer states in the file cost nothing. The key mapping is in megatron.py.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import re
import signal
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn, Optional

import torch

from megatron_llm.checkpoint.megatron import (
    Layout,
    entries,
    extra_state_keys,
    held_by,
    megatron_args,
    merge,
    model_config_from_args,
    split,
)
from megatron_llm.checkpoint.megatron_moe import drop_shards_note
from megatron_llm.checkpoint.stream import check_names, native_shapes, own_storage, read_hf_sidecar
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def _allowed_globals(with_megatron_core: bool) -> list:
    """What a Megatron-LM file may contain besides tensors and containers: the args Namespace, numpy RNG
    state, paths. Newer Megatron-LM args also hold megatron-core enums: megatron-core's own list
    (megatron.core.safe_globals) adds them, but importing it costs seconds, so only when a file needs it."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, signal.Signals,
               np.ndarray, np.dtype, np.dtypes.UInt32DType, multiarray._reconstruct,
               (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]  # as numpy 1 pickled it
    if with_megatron_core:
        from megatron_llm.data.mcore import mcore

        allowed += mcore("safe_globals").SAFE_GLOBALS
    return allowed


def safe_load(path: Path) -> dict:
    """A Megatron file's dict, its tensors memory-mapped; refuses anything beyond the allow-list."""
    try:
        return _load(path, with_megatron_core=False)
    except pickle.UnpicklingError as e:
        if "GLOBAL megatron." not in str(e):
            _refuse(path, e)
    try:
        return _load(path, with_megatron_core=True)
    except pickle.UnpicklingError as e:
        _refuse(path, e)


def _load(path: Path, with_megatron_core: bool) -> dict:
    try:
        with torch.serialization.safe_globals(_allowed_globals(with_megatron_core)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        reason = str(e).splitlines()[0].split(". ")[0]  # torch goes on with advice about its own internals
        raise UsageError(f"cannot read {path} as a torch checkpoint ({reason}): it is truncated or not one") from None


def _refuse(path: Path, e: pickle.UnpicklingError) -> NoReturn:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first type it refused
    detail = [line for line in str(e).splitlines() if line.strip()][-2][:200]
    what = f"build {found.group(1)}, which is not" if found else f"use pickle content ({detail}) that is not"
    raise UsageError(
        f"refused to load {path}: it would {what} on the allow-list of what a Megatron checkpoint needs; "
        "nothing in it was run. Convert only checkpoints from a source you trust"
    ) from None


class MegatronReader:
    def __init__(self, path: Path):
        self.directory = Path(path)
        tracker = self.directory / TRACKER
        if not tracker.is_file():
            raise UsageError(f"{path} is not a Megatron-LM checkpoint: it has no {TRACKER}")
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise UsageError(f"{tracker} holds {text!r}; expected an iteration number or 'release'")
        self.iter_dir = self.directory / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not self.iter_dir.is_dir():
            raise UsageError(f"{tracker} names {self.iter_dir.name}, which does not exist")
        first = sorted(self.iter_dir.glob(f"mp_rank_00*/{SHARD_FILE}"))
        if not first:
            raise UsageError(f"{self.iter_dir} has no mp_rank_00*/{SHARD_FILE}: not a legacy Megatron-LM checkpoint")
        state = safe_load(first[0])
        args = state.get("args")
        if not isinstance(args, argparse.Namespace):
            raise UsageError(f"{first[0]} has no args Namespace; cannot tell the model's architecture")
        try:
            self.config: ModelConfig = model_config_from_args(args)
            tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            ep = getattr(args, "expert_model_parallel_size", None) or 1
            etp = (getattr(args, "expert_tensor_parallel_size", None) or tp) if self.config.moe_experts else None
        except AttributeError as e:
            raise UsageError(f"the args in {first[0]} lack {e.name!r}; cannot tell the model's architecture") from None
        self.config.validate()
        self.layout = Layout.of(self.config, tp, pp, padded_vocab_size=args.padded_vocab_size, ep=ep, etp=etp)
        self._check_shard_dirs()
        self.hf_config = read_hf_sidecar(self.directory)
        self._stage: Optional[int] = None
        self._shards: dict[tuple[int, int], dict] = {}
        # The Transformer Engine spec fuses layer 0's norm into linear_qkv; stage 0 always holds layer 0.
        self.spec = "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in state.get("model", {})) else "local"
        if self.spec == "te" and self.config.moe_experts:
            raise UsageError(f"{first[0]} is a mixture-of-experts model in the Transformer Engine spec, whose expert and "
                             "norm names we do not read; save it with megatron-core's local spec (transformer_impl local)")
        # ... and latent attention's latent norms into linear_q_up_proj / linear_kv_up_proj, whose names we do not read
        if any(k.endswith("linear_kv_up_proj.layer_norm_weight") for k in state.get("model", {})):
            raise UsageError(f"{first[0]} holds latent attention in the Transformer Engine spec (its latent norms fused "
                             "into linear_kv_up_proj), whose names we do not read; save it with megatron-core's local "
                             "spec (transformer_impl local)")
        self._entries = entries(native_shapes(self.config), self.layout, self.spec, self.config.tie_embeddings)

    def _check_shard_dirs(self) -> None:
        lay = self.layout
        expected = {lay.shard_dir(t, p, e) for p in range(lay.pp) for t, e in lay.files()}
        found = {d.name for d in self.iter_dir.glob("mp_rank_*") if (d / SHARD_FILE).is_file()}
        where = f"{self.iter_dir} does not match its args (tp={lay.tp}, pp={lay.pp}, ep={lay.ep}, etp={lay.etp})"
        if lay.tp > lay.ep * lay.etp:  # only with experts folded (etp < tp): older legacy saves lack files
            where += ("; Megatron-LM versions that saved only expert-data-parallel rank 0's files miss the tp ranks past "
                      "ep x etp: save it with a newer Megatron-LM or as torch_dist")
        check_names(where, expected, found, "shards")

    def _load_stage(self, stage: int) -> dict[tuple[int, int], dict]:
        """The model dicts of every (tp, ep) rank of one stage (memory-mapped); the previous stage is dropped."""
        if stage != self._stage:
            self._shards = {}
            for t, e in self.layout.files():
                path = self.iter_dir / self.layout.shard_dir(t, stage, e) / SHARD_FILE
                state = safe_load(path)
                if "model" not in state:
                    raise UsageError(f"{path} has no 'model' (model0, model1, ...: virtual pipeline chunks are not supported)")
                self._shards[t, e] = ungroup_experts(state["model"], self.layout.experts_per_rank, self.config.hidden_size)
            self._stage = stage
            self._check_keys(stage)
        return self._shards

    def _check_keys(self, stage: int) -> None:
        """Every file of the stage holds exactly the tensors its layout implies (extra states aside)."""
        for (t, e), shard in self._shards.items():
            expected = {x.key for x in held_by(self._entries, stage, e)}
            present = {k for k in shard if not k.endswith("._extra_state")}
            check_names(str(self.iter_dir / self.layout.shard_dir(t, stage, e)), expected, present)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, list[torch.Tensor]] = {}  # stacked sources, one expert at a time in order
        for entry in self._entries:
            if entry.sources[0] in names:
                shards = self._load_stage(entry.stage)
                sources = [shards[f][entry.key] for f in self.layout.sources(entry)]
                parts = merge(entry, sources, self.layout.slicing(entry))
                for name, part in zip(entry.sources, parts):
                    if entry.expert is None:
                        out[name] = part
                    else:
                        experts.setdefault(name, []).append(part)
        out.update({name: torch.stack(parts) for name, parts in experts.items()})
        return {n: out[n] for n in names}


def ungroup_experts(model: dict, per_rank: int, hidden: int) -> dict:
    """A file of megatron-core's legacy GroupedMLP (moe_grouped_gemm) in SequentialMLP names: its
    weight1 [hidden, E_l * fc1 rows] is, in memory, E_l blocks [hidden, fc1 rows] = fc1.T of each local
    expert (the view GroupedMLP.forward takes), and weight2 [E_l * ffn, hidden] E_l blocks fc2.T."""
    out = {}
    for key, value in model.items():
        prefix, _, name = key.rpartition(".experts.")
        if name == "weight1":
            out.update({f"{prefix}.experts.local_experts.{l}.linear_fc1.weight": w.T
                        for l, w in enumerate(value.reshape(per_rank, hidden, -1))})
        elif name == "weight2":
            out.update({f"{prefix}.experts.local_experts.{l}.linear_fc2.weight": w.T
                        for l, w in enumerate(value.reshape(per_rank, -1, hidden))})
        else:
            out[key] = value
    return out


class MegatronWriter:
    """Collects each stage's TP shards as groups arrive and saves them when the next stage begins, so
    one stage (1/pp of the model) is in memory at a time."""

    def __init__(self, path: Path, cfg: ModelConfig, tp: int, pp: int, spec: str, dtype: torch.dtype, ep: int = 1,
                 etp: Optional[int] = None):
        self.path, self.spec = Path(path), spec
        self.layout = Layout.of(cfg, tp, pp, ep=ep, etp=etp)
        self.args = megatron_args(cfg, self.layout, dtype, spec)
        note = drop_shards_note(cfg, tp)
        if note:
            print(note, flush=True)
        self.entries = entries(native_shapes(cfg), self.layout, spec, cfg.tie_embeddings)
        self.stage = 0
        self.files_of_stage: dict[tuple[int, int], dict] = {f: {} for f in self.layout.files()}
        self.files = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        for entry in self.entries:
            if entry.sources[0] not in tensors:
                continue
            if entry.stage != self.stage:
                self._flush()
                self.stage = entry.stage
            whole = [entry.part(tensors[n]) for n in entry.sources]
            parts = [own_storage(p) for p in split(entry, whole, self.layout.slicing(entry))]  # tp (experts: etp) slices
            for t, e in self.files_of_stage:
                if entry.ep_rank in (None, e):
                    self.files_of_stage[t, e][entry.key] = parts[t % len(parts)]  # an expert's slice t % etp

    def _flush(self) -> None:
        """Saves the stage's files side by side: torch.save spends its time in C++ (the zip CRC and the
        writes) with the GIL released, so threads overlap them."""
        def save(file: tuple[int, int]) -> None:
            t, e = file
            mine = held_by(self.entries, self.stage, e)
            model = {**self.files_of_stage[file], **dict.fromkeys(extra_state_keys(mine, self.layout, self.stage, self.spec))}
            target = self.path / "release" / self.layout.shard_dir(t, self.stage, e)
            target.mkdir(parents=True, exist_ok=True)
            state = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": model}
            torch.save(state, target / SHARD_FILE)

        files = self.layout.files()
        with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
            list(pool.map(save, files))  # list(): re-raises a failed save here
        self.files += len(files)
        self.files_of_stage = {f: {} for f in files}

    def finish(self) -> int:
        self._flush()
        (self.path / TRACKER).write_text("release\n")
        return self.files
