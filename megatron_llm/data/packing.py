"""Post-training sequences: conversations packed best-fit into data.seq_len slots (data.format sft), and
preference pairs as chosen/rejected rows (data.format pairs, `PreferenceRows`).

Each blend dataset is a conversation set written by `tools/preprocess_data.py --format chat` (or
prompt_response): PREFIX.bin/.idx with one document per conversation and PREFIX.mask.bin/.idx with its
loss mask (1 at the tokens the model learns to predict). Documents are split into train and valid by
data.split as megatron-core splits them. The train stream draws conversations from the datasets in
proportion to their weights (each dataset reshuffled every pass, seeded), cuts it into windows and packs
each window best-fit decreasing (every conversation goes into the fullest sequence that still has room
for it), then shuffles the window's sequences. Everything is a pure function of the seed, so every rank
computes the same sequences and sample k is the same after a resume.

A packed sample keeps its conversations apart: `positions` restart at 0 for each and `documents` numbers
them, so the model's document mask lets no token attend across a boundary; the labels of a conversation
stop at its end (its last token predicts nothing) and the padding after the last one forms a document of
its own with loss mask 0. Every token carries its conversation's channel. Without packing, each sequence
holds one conversation padded at the end, which plain causal attention already keeps apart.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_llm.data.mcore import mcore
from megatron_llm.errors import UsageError

WINDOW = 4096  # conversations packed together: more fill the sequences better; they are shuffled as one


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` (each <= capacity) grouped into bins of
    `capacity`, longest first, each into the bin whose free space it fills most tightly."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin), sorted; full bins leave the list
    for i in np.argsort(-lengths, kind="stable"):
        size = int(lengths[i])
        j = bisect.bisect_left(free, (size, -1))
        if j == len(free):
            bins.append([int(i)])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = free.pop(j)
            bins[b].append(int(i))
            room -= size
        if room:
            bisect.insort(free, (room, b))
    return bins


def split_documents(n: int, split: str) -> tuple[range, range]:
    """Train and valid document ranges of a dataset of n documents, as megatron-core splits them."""
    weights = np.array([float(x) for x in split.split(",")])
    bounds = np.concatenate([[0.0], np.cumsum(weights / weights.sum())])
    edges = [int(round(b * n)) for b in bounds]
    return range(edges[0], edges[1]), range(edges[1], edges[2])


@dataclass
class Conversations:
    """One blend dataset: its token documents, their loss masks (when `masked`) and their lengths."""

    prefix: str
    lengths: np.ndarray
    masked: bool = True

    def __post_init__(self):
        self._tokens = self._masks = None

    def tokens(self, i: int) -> np.ndarray:
        if self._tokens is None:  # opened lazily: once per DataLoader worker, after the fork
            indexed = mcore("datasets.indexed_dataset")
            self._tokens = indexed.IndexedDataset(self.prefix)
            self._masks = indexed.IndexedDataset(f"{self.prefix}.mask") if self.masked else None
        return self._tokens[i]

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens(i), self._masks[i]

    def __getstate__(self):  # DataLoader workers open their own readers
        return {**self.__dict__, "_tokens": None, "_masks": None}


class PackedConversations(torch.utils.data.Dataset):
    """Samples {tokens, labels, loss_mask, dataset_id: [s]} (+ positions, documents [s] when packed) from
    `packs`: each a list of (dataset index, document index, channel)."""

    def __init__(self, sources: list[Conversations], packs: list[list[tuple[int, int, int]]], seq_len: int,
                 pad_id: int, packed: bool):
        self.sources, self.packs, self.seq_len, self.pad_id, self.packed = sources, packs, seq_len, pad_id, packed

    def __len__(self) -> int:
        return len(self.packs)

    def real_tokens(self) -> int:
        return sum(min(int(self.sources[d].lengths[i]), self.seq_len) for pack in self.packs for d, i, _ in pack)

    def __getitem__(self, idx: int) -> dict:
        s = self.seq_len
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        positions = np.zeros(s, dtype=np.int64)
        documents = np.zeros(s, dtype=np.int64)
        channel = np.zeros(s, dtype=np.int64)
        start = 0
        pack = self.packs[idx]
        for k, (d, i, c) in enumerate(pack):
            ids, mask = (a[: s - start] for a in self.sources[d].document(i))  # truncated to what fits
            end = start + len(ids)
            tokens[start:end] = ids
            labels[start : end - 1] = ids[1:]  # the conversation's last token predicts nothing
            loss_mask[start : end - 1] = mask[1:]  # trained where the predicted token is
            positions[start:end] = np.arange(len(ids))
            documents[start:end] = k
            channel[start:end] = c
            start = end
        positions[start:] = np.arange(s - start)  # the padding: a document of its own
        documents[start:] = len(pack)
        channel[start:] = pack[0][2]
        sample = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                  "loss_mask": torch.from_numpy(loss_mask), "dataset_id": channel}
        if self.packed:
            sample.update(positions=torch.from_numpy(positions), documents=torch.from_numpy(documents))
        return sample


def _blend_order(sources: list[Conversations], docs: list[range], weights: list[float], seed: int):
    """Endless (dataset, document) draws: at each draw the dataset furthest behind its weight's share
    (megatron-core's blending rule), its documents in a new seeded order every pass."""
    share = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(sources))
    passes = [0] * len(sources)
    orders = [np.random.default_rng([seed, d, 0]).permutation(docs[d]) for d in range(len(sources))]
    cursor = [0] * len(sources)
    drawn = 0
    while True:
        d = int(np.argmax(share * (drawn + 1) - counts))
        if cursor[d] == len(orders[d]):
            passes[d] += 1
            orders[d], cursor[d] = np.random.default_rng([seed, d, passes[d]]).permutation(docs[d]), 0
        yield d, int(orders[d][cursor[d]])
        cursor[d] += 1
        counts[d] += 1
        drawn += 1


def pack_documents(entries: list[tuple[int, int, int]], lengths: np.ndarray, seq_len: int, packed: bool):
    """Sequences of (dataset, document, channel) entries: best-fit when packed, else one each."""
    if not packed:
        return [[e] for e in entries]
    return [[entries[j] for j in group] for group in best_fit(np.minimum(lengths, seq_len), seq_len)]


def train_packs(sources: list[Conversations], docs: list[range], weights: list[float], channels: list[np.ndarray],
                seq_len: int, seed: int, count: int, packed: bool) -> list[list[tuple[int, int, int]]]:
    """At least `count` train sequences, window by window of the blend's draws."""
    draws = _blend_order(sources, docs, weights, seed)
    out: list[list[tuple[int, int, int]]] = []
    window = 0
    while len(out) < count:
        entries = [(d, i, int(channels[d][i])) for d, i in (next(draws) for _ in range(WINDOW))]
        lengths = np.array([sources[d].lengths[i] for d, i, _ in entries])
        packs = pack_documents(entries, lengths, seq_len, packed)
        order = np.random.default_rng([seed, 1 << 20, window]).permutation(len(packs))
        out += [packs[j] for j in order]
        window += 1
    return out


def document_layout(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and document ids [s] of pretraining tokens [s]: a document ends at its eod token (which
    belongs to it) and the next one starts at position 0 (megatron-core's reset_position_ids)."""
    ends = (tokens == eod).long()
    documents = torch.cumsum(ends, 0) - ends  # eod tokens strictly before each token
    index = torch.arange(len(tokens))
    starts = torch.where(torch.cat([ends.new_ones(1), ends[:-1]]).bool(), index, 0)
    return index - torch.cummax(starts, 0).values, documents


class DocumentMasked(torch.utils.data.Dataset):
    """Pretraining samples with positions and document ids (data.document_mask): no token attends
    across the end of a document, as with packed conversations."""

    def __init__(self, dataset: torch.utils.data.Dataset, eod: int):
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        sample = self.dataset[idx]
        positions, documents = document_layout(torch.as_tensor(sample["tokens"]), self.eod)
        return {**sample, "positions": positions, "documents": documents}


def channel_of_documents(n: int, source: int, random_channels: Optional[int], seed: int) -> np.ndarray:
    """Each document's channel: its dataset's index, or a seeded random one of data.random_channels."""
    if random_channels:
        return np.random.default_rng([seed, source, 2 << 20]).integers(random_channels, size=n)
    return np.full(n, source, dtype=np.int64)


def build_conversation_datasets(cfg, vocab_size: int, seed: int, num_train_samples: int, pad_id: int,
                                head_rows: Optional[int] = None):
    """(train dataset, valid dataset per channel name, the start-up note on packing) for data.format sft."""
    from megatron_llm.data.datasets import channel_names, check_indexed_dataset  # datasets.py calls this module

    sources, trains, valids, channels = [], [], [], []
    for d, spec in enumerate(cfg.blend):
        lengths = check_indexed_dataset(spec.path, vocab_size, head_rows=head_rows)  # strict: masked tokens too
        if not np.array_equal(check_indexed_dataset(f"{spec.path}.mask", 2), lengths):
            raise UsageError(f"{spec.path}.mask does not match {spec.path} document for document; rerun tools/preprocess_data.py")
        train, valid = split_documents(len(lengths), cfg.split)
        if not len(train):
            raise UsageError(f"dataset {spec.path}: its train split holds no conversations; add some or change data.split")
        sources.append(Conversations(spec.path, lengths))
        trains.append(train)
        valids.append(valid)
        channels.append(channel_of_documents(len(lengths), d, cfg.random_channels, seed))
    packs = train_packs(sources, trains, [s.weight for s in cfg.blend], channels, cfg.seq_len, seed,
                        num_train_samples, cfg.packing)
    train = PackedConversations(sources, packs, cfg.seq_len, pad_id, cfg.packing)
    valid_by_channel = {}
    for d, name in enumerate(channel_names(cfg.blend)):
        if len(valids[d]):
            entries = [(d, int(i), d) for i in valids[d]]
            lengths = sources[d].lengths[valids[d].start : valids[d].stop]
            packed = pack_documents(entries, lengths, cfg.seq_len, cfg.packing)
            valid_by_channel[name] = PackedConversations(sources, packed, cfg.seq_len, pad_id, cfg.packing)
    truncated = sum(int((s.lengths[t.start : t.stop] > cfg.seq_len).sum()) for s, t in zip(sources, trains))
    efficiency = train.real_tokens() / (len(train) * cfg.seq_len)
    note = (f"sft: {len(train)} sequences of {cfg.seq_len} tokens, "
            f"{'packed best-fit' if cfg.packing else 'one conversation each, padded'}: {efficiency:.1%} real tokens"
            + (f"; {truncated} train conversations longer than data.seq_len are truncated" if truncated else ""))
    return train, valid_by_channel, note


class PreferenceRows(torch.utils.data.Dataset):
    """Preference pairs as consecutive rows, 2k the chosen and 2k + 1 the rejected side of pair k, each
    padded on the right to seq_len (a longer side keeps its last seq_len tokens: the score is read at
    the end). `last` is a row's last real token; the loss mask holds a single 1, at the chosen row's,
    so a batch's loss "tokens" count its pairs (training/reward.py). With an even micro-batch size every
    micro-batch holds whole pairs."""

    def __init__(self, sources: list[Conversations], pairs: list[tuple[int, int, int]], seq_len: int, pad_id: int):
        self.sources, self.pairs, self.seq_len, self.pad_id = sources, pairs, seq_len, pad_id  # (dataset, pair, channel)

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, idx: int) -> dict:
        d, pair, channel = self.pairs[idx // 2]
        ids = self.sources[d].tokens(2 * pair + idx % 2)[-self.seq_len :]
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        loss_mask = np.zeros(self.seq_len, dtype=np.float32)
        if idx % 2 == 0:
            loss_mask[len(ids) - 1] = 1.0
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(loss_mask),
                "last": torch.tensor(len(ids) - 1), "dataset_id": np.int64(channel)}


def build_pair_datasets(cfg, vocab_size: int, seed: int, num_train_samples: int, pad_id: int):
    """(train rows, valid rows per channel name, the start-up note) for data.format pairs: train pairs drawn
    from the blend by weight; each dataset's valid split in order, as its own channel (evaluated alone,
    so its rows carry channel 0)."""
    from megatron_llm.data.datasets import channel_names, check_indexed_dataset  # datasets.py calls this module

    sources, trains, channels, valid_by_channel, longer = [], [], [], {}, 0
    for d, (spec, name) in enumerate(zip(cfg.blend, channel_names(cfg.blend))):
        lengths = check_indexed_dataset(spec.path, vocab_size)
        if len(lengths) % 2:
            raise UsageError(f"{spec.path} holds {len(lengths)} documents, not pairs; write it with tools/preprocess_data.py --format pairs")
        train, valid = split_documents(len(lengths) // 2, cfg.split)
        if not len(train):
            raise UsageError(f"dataset {spec.path}: its train split holds no pairs; add some or change data.split")
        sources.append(Conversations(spec.path, lengths, masked=False))
        trains.append(train)
        channels.append(channel_of_documents(len(lengths) // 2, d, cfg.random_channels, seed))
        longer += int((lengths[2 * train.start : 2 * train.stop] > cfg.seq_len).sum())
        if len(valid):
            valid_by_channel[name] = PreferenceRows(sources, [(d, i, 0) for i in valid], cfg.seq_len, pad_id)
    draws = _blend_order(sources, trains, [s.weight for s in cfg.blend], seed)
    pairs = [(d, i, int(channels[d][i])) for d, i in (next(draws) for _ in range((num_train_samples + 1) // 2))]
    note = (f"pairs: {len(pairs)} preference pairs as chosen/rejected rows of {cfg.seq_len} tokens"
            + (f"; {longer} train sides longer than data.seq_len keep their last {cfg.seq_len} tokens" if longer else ""))
    return PreferenceRows(sources, pairs, cfg.seq_len, pad_id), valid_by_channel, note
