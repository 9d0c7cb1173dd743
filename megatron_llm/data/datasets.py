"""megatron-core GPTDataset/BlendedDataset over the blend in `DataConfig`, checked before building.

Every sample is a dict {tokens, labels, loss_mask, position_ids, dataset_id}: `dataset_id` is the
index of its dataset in `data.blend`, which is our channel id. Building needs an initialised
torch.distributed process group (gloo and world size 1 are fine): megatron-core builds and caches the
sample indices on rank 0, barriers, and the other ranks load them, so every rank must call
`build_datasets` and the cache directory must be shared by all ranks. Its precompiled C++ helpers ship
with the wheel; we never call `compile_helpers`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_llm.config import DataConfig, DatasetSpec
from megatron_llm.data.mcore import mcore
from megatron_llm.data.packing import DocumentMasked, build_conversation_datasets, build_pair_datasets
from megatron_llm.data.preprocess import MASK_SUFFIX
from megatron_llm.data.tokenizer import load_tokenizer
from megatron_llm.errors import UsageError


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    """BlendedDataset of the train splits, at least num_train_samples long."""
    valid: Optional[torch.utils.data.Dataset]
    """BlendedDataset of the validation splits; None when data.split gives valid no weight or
    num_valid_samples is 0."""
    valid_by_channel: dict[str, torch.utils.data.Dataset] = field(default_factory=dict)
    """Each dataset's own validation split, num_valid_samples long, samples tagged with its channel."""
    channel_names: list[str] = field(default_factory=list)
    """Channel id -> name (spec.name or the file stem), in blend order."""
    note: str = ""
    """What the run prints about its sequences at start (data.format sft: packing efficiency)."""


def channel_names(blend: list[DatasetSpec]) -> list[str]:
    return [spec.name or Path(spec.path).name for spec in blend]


class _TokenizerInfo:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer: `vocab_size` (picks the token dtype
    for its per-dataset sequence counts), `eod` (used only by the reset/eod-mask options, all off here)
    and `unique_identifiers` (part of the cache key: only eod, so a padded vocab reuses the cache).
    Without `pad`, megatron-core pads with -1, which no token is; train samples are never padded."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size = eod, vocab_size
        self.unique_identifiers = {"class": "megatron_llm", "eod": eod}


class _TaggedWithChannel(torch.utils.data.Dataset):
    """A single GPTDataset whose samples carry `dataset_id` like a BlendedDataset's."""

    def __init__(self, dataset: torch.utils.data.Dataset, channel: int):
        self.dataset, self.channel = dataset, channel

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return {"dataset_id": np.int16(self.channel), **self.dataset[idx]}


class _RandomChannels(torch.utils.data.Dataset):
    """Replaces each sample's channel by a seeded random one of k, a pure function of (seed, index):
    every channel then sees the same data distribution, so all k loss curves must agree within noise,
    a check of the per-channel machinery itself."""

    def __init__(self, dataset: torch.utils.data.Dataset, k: int, seed: int):
        self.dataset, self.k, self.seed = dataset, k, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        channel = np.random.default_rng([self.seed, idx]).integers(self.k)
        return {**self.dataset[idx], "dataset_id": np.int16(channel)}


_IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# megatron-core's DType codes (indexed_dataset.DType): the token type of the .bin.
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def _read_index(idx_path: Path) -> Optional[tuple[np.ndarray, np.ndarray, np.dtype]]:
    """(sequence lengths, sequence byte offsets in the .bin, token dtype) of an .idx in megatron-core's layout,
    or None where megatron-core's reader would fail (by assertion, and then again in its __del__). Read here
    with numpy rather than that reader: importing megatron-core's datasets takes ~2 s, and the launcher's
    check_config runs this check before any worker starts."""
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
        if len(head) < _IDX_HEADER.size:
            return None
        magic, version, code, sequences, documents = _IDX_HEADER.unpack(head)
        arrays = sequences * (4 + 8) + documents * 8  # int32 lengths, int64 pointers, int64 document starts
        if magic != b"MMIDIDX\x00\x00" or version != 1 or code not in _TOKEN_DTYPES or documents < 1 or (
                idx_path.stat().st_size < _IDX_HEADER.size + arrays):
            return None
        lengths, pointers = np.fromfile(f, np.int32, sequences), np.fromfile(f, np.int64, sequences)
        f.seek((documents - 1) * 8, 1)
        last_document_end = int(np.fromfile(f, np.int64, 1)[0])
    if last_document_end != sequences:  # megatron-core asserts it when it opens the dataset
        return None
    return lengths, pointers, np.dtype(_TOKEN_DTYPES[code])


def require_indexed_files(prefix: str) -> None:
    """Raises UsageError naming the file of the .bin/.idx pair `prefix` that is not there."""
    for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")):
        if not path.is_file():
            raise UsageError(f"dataset file {path} not found; create it with tools/preprocess_data.py")


def check_indexed_dataset(prefix: str, vocab_size: int, scan_up_to: Optional[int] = None,
                          head_rows: Optional[int] = None) -> np.ndarray:
    """Checks a .bin/.idx pair; returns its sequence (= document) lengths. Raises UsageError naming
    the file: missing, an .idx that does not describe its .bin, or a token id >= vocab_size, or >= `head_rows`
    (a pruned head's, model.output_vocab_size: every token of a token file is some sample's label, and transformers
    too refuses a label its head has no row for). The token ids are read only from a .bin of at most `scan_up_to`
    bytes (None: any): the index records no maximum."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    require_indexed_files(prefix)
    index = _read_index(idx_path)
    if index is None:
        raise UsageError(f"dataset index {idx_path} is corrupt; rerun tools/preprocess_data.py")
    lengths, pointers, dtype = index
    itemsize = np.dtype(dtype).itemsize
    described = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = bin_path.stat().st_size
    if described != actual or int(lengths.sum()) * itemsize != actual:
        raise UsageError(
            f"{idx_path} describes {described} bytes but {bin_path} holds {actual}: the pair does not match "
            "(truncated or overwritten); rerun tools/preprocess_data.py"
        )
    if actual and (scan_up_to is None or actual <= scan_up_to):
        max_id = int(np.memmap(bin_path, dtype=dtype, mode="r").max())
        if max_id >= vocab_size and prefix.endswith(MASK_SUFFIX):
            raise UsageError(f"{bin_path} holds {max_id} where a loss mask holds only 0 and 1; rerun "
                             "tools/preprocess_data.py")
        if max_id >= vocab_size:
            raise UsageError(
                f"{bin_path} holds token id {max_id} but the vocabulary has {vocab_size} ids "
                "(model.vocab_size); use the tokenizer it was made with or raise model.vocab_size"
            )
        if head_rows is not None and max_id >= head_rows:
            raise UsageError(f"{bin_path} holds token id {max_id}, a label the model's head has no row for: it predicts ids "
                             f"below {head_rows} (model.output_vocab_size); drop those tokens or train a whole head")
    return lengths


def _check_split_sizes(prefix: str, lengths: np.ndarray, split_matrix: list, seq_len: int) -> None:
    """megatron-core loops forever on a split without tokens: require one full sample in each."""
    n = len(lengths)
    for name, bounds in zip(("train", "valid", "test"), split_matrix):
        if bounds is None:
            continue
        beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))  # as megatron-core splits
        tokens = int(lengths[beg:end].sum())
        if tokens < seq_len + 1:
            raise UsageError(
                f"dataset {prefix}: its {name} split (documents {beg}..{end} of {n}) holds {tokens} tokens, "
                f"fewer than data.seq_len + 1 = {seq_len + 1}; add documents or change data.split"
            )


def _cache_dir(cfg: DataConfig) -> str:
    path = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.blend[0].path).parent / ".cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not (path.is_dir() and os.access(path, os.W_OK)):
        raise UsageError(f"cannot write the dataset index cache {path}; set data.cache_dir to a writable directory")
    return str(path)


def build_datasets(
    cfg: DataConfig, vocab_size: int, seed: int, num_train_samples: int, num_valid_samples: int,
    head_rows: Optional[int] = None,
) -> Datasets:
    """The blended train and valid datasets plus one valid dataset per channel. Every rank calls it.

    num_valid_samples is the length of `valid` and of each `valid_by_channel` entry; 0 skips them.
    data.format sft packs conversations instead (data/packing.py), and data.document_mask gives each
    sample the positions and document ids of the documents it holds. `head_rows`: a pruned head's rows, which
    every token must be below (check_indexed_dataset).
    """
    names = [f"random_{c}" for c in range(cfg.random_channels)] if cfg.random_channels else channel_names(cfg.blend)
    eod = load_tokenizer(cfg.tokenizer).eod
    if cfg.format == "sft":
        train, by_channel, note = build_conversation_datasets(cfg, vocab_size, seed, num_train_samples, eod, head_rows)
        return Datasets(train=train, valid=None, valid_by_channel=by_channel, channel_names=names, note=note)
    if cfg.format == "pairs":
        train, by_channel, note = build_pair_datasets(cfg, vocab_size, seed, num_train_samples, eod)
        return Datasets(train=train, valid=None, valid_by_channel=by_channel, channel_names=names, note=note)
    datasets = _build_pretraining(cfg, vocab_size, seed, num_train_samples, num_valid_samples, names, eod, head_rows)
    if cfg.document_mask:
        datasets.train = DocumentMasked(datasets.train, eod)
        datasets.valid_by_channel = {name: DocumentMasked(d, eod) for name, d in datasets.valid_by_channel.items()}
    return datasets


def _build_pretraining(cfg: DataConfig, vocab_size: int, seed: int, num_train_samples: int, num_valid_samples: int,
                       names: list[str], eod: int, head_rows: Optional[int]) -> Datasets:
    lengths = [check_indexed_dataset(spec.path, vocab_size, head_rows=head_rows) for spec in cfg.blend]
    cache = _cache_dir(cfg)
    if not torch.distributed.is_initialized():
        raise RuntimeError("build_datasets needs torch.distributed initialised (gloo with world size 1 is fine)")
    gpt = mcore("datasets.gpt_dataset")
    builder_mod = mcore("datasets.blended_megatron_dataset_builder")
    config = gpt.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_len,
        blend=([spec.path for spec in cfg.blend], [spec.weight for spec in cfg.blend]),
        split=cfg.split,
        path_to_cache=cache,
        tokenizer=_TokenizerInfo(eod, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    for spec, doc_lengths in zip(cfg.blend, lengths):
        _check_split_sizes(spec.path, doc_lengths, config.split_matrix, cfg.seq_len)

    # Always a BlendedDataset, even for one dataset (its weight list is not None), so every sample has
    # a dataset_id. The test split, if weighted at all, is built at its minimum (one epoch) and unused.
    sizes = [num_train_samples, num_valid_samples, 0]
    train, valid, _test = builder_mod.BlendedMegatronDatasetBuilder(
        gpt.GPTDataset, sizes, is_built_on_rank=lambda: True, config=config
    ).build()
    if cfg.random_channels:
        # Validation stays per source (below); only training samples are reassigned.
        train = _RandomChannels(train, cfg.random_channels, seed)
    if valid is None or num_valid_samples <= 0:
        return Datasets(train=train, valid=None, channel_names=names)

    # Per channel: a GPTDataset over the same held-out documents (valid.datasets[i]) but with
    # num_valid_samples samples of its own, built rank 0 first like megatron-core's own splits.
    by_channel = {}
    for channel, (name, part) in enumerate(zip(channel_names(cfg.blend), valid.datasets)):
        dataset = builder_mod.BlendedMegatronDatasetBuilder.build_generic_dataset(
            gpt.GPTDataset, lambda: True, True,
            part.dataset, part.dataset_path, part.indices, num_valid_samples, part.index_split, config,
        )
        by_channel[name] = _TaggedWithChannel(dataset, channel)
    return Datasets(train=train, valid=valid, valid_by_channel=by_channel, channel_names=names)
