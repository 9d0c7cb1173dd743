"""Data layer: tokenizers, jsonl -> .bin/.idx, the embedded corpus, megatron-core datasets, batching.

Everything is checked against an independent reference: the tokenizer's own encode, megatron-core's
IndexedDataset reader, the bytes of the dataset files, and the single-rank global batch.
"""

import dataclasses
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_llm.config import DataConfig, DatasetSpec
from megatron_llm.data.datasets import build_datasets
from megatron_llm.data.default_corpus import SUBJECTS, build_subject, subject_files
from megatron_llm.data.loader import TrainBatches, eval_batches
from megatron_llm.data.mcore import mcore
from megatron_llm.data.preprocess import preprocess
from megatron_llm.data.tokenizer import ByteTokenizer, load_tokenizer
from megatron_llm.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["hello world", "", "naïve café ✓ — ünïcödé", "line one\nline two\n" * 20, "x"]


def _init_group(init_file: Path, rank: int = 0, world: int = 1) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(str(init_file), world), rank=rank, world_size=world)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """megatron-core builds datasets only inside a process group: a world-size-1 gloo one here."""
    created = not dist.is_initialized()
    if created:
        _init_group(tmp_path_factory.mktemp("pg") / "store")
    yield
    if created:
        dist.destroy_process_group()


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def wordlevel_json(tmp_path_factory) -> Path:
    """A tiny Hugging Face WordLevel tokenizer.json with an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "line", "one", "two", "x", "<|endoftext|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _documents(prefix: Path) -> list[list[int]]:
    dataset = mcore("datasets.indexed_dataset").IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and (tok.eod, tok.vocab_size) == (256, 257)
    for text in DOCS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids + [tok.eod]) == text


def test_hf_tokenizer_json(wordlevel_json, tmp_path):
    tok = load_tokenizer(str(wordlevel_json))
    assert (tok.eod, tok.vocab_size) == (7, 8)
    assert tok.encode("hello world x") == [1, 2, 6]
    assert tok.encode("hello zebra") == [1, 0]
    assert load_tokenizer(str(wordlevel_json.parent)).eod == 7  # a directory holding tokenizer.json

    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------
# jsonl -> .bin/.idx


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_preprocess_cli_matches_tokenizer(tmp_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS * 30)
    result = _cli("--input", str(src), "--output-prefix", str(tmp_path / "out" / "docs"), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{len(DOCS) * 30} documents" in result.stdout
    tok = ByteTokenizer()
    assert _documents(tmp_path / "out" / "docs") == [tok.encode(d) + [tok.eod] for d in DOCS * 30]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.bin", "docs.idx"]  # no temporaries


def test_preprocess_hf_tokenizer_and_text_field(tmp_path, wordlevel_json):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS, field="content")
    stats = preprocess(str(src), str(tmp_path / "docs"), str(wordlevel_json), text_field="content", progress=False)
    tok = load_tokenizer(str(wordlevel_json))
    expected = [tok.encode(d) + [tok.eod] for d in DOCS]
    assert _documents(tmp_path / "docs") == expected
    assert (stats.documents, stats.tokens) == (len(DOCS), sum(map(len, expected)))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "input file .* not found"),
        ('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', "line 3 is not valid JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' field"),
    ],
    ids=["missing-file", "bad-json", "missing-field"],
)
def test_preprocess_cli_errors(tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    if content is not None:
        src.write_text(content)
    result = _cli("--input", str(src), "--output-prefix", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.jsonl"] if content else [])


# ---------------------------------------------------------------------------------------------
# The embedded corpus (built once per session by conftest's corpus_dir)


def test_default_corpus_subjects_differ_and_rebuild_identically(corpus_dir, tmp_path):
    tok = ByteTokenizer()
    contents = {}
    for subject in SUBJECTS:
        files = subject_files(subject)
        docs = _documents(corpus_dir / subject)
        assert len(docs) == len(files) >= 20
        assert docs[0] == tok.encode(files[0].read_text(encoding="utf-8", errors="replace")) + [tok.eod]
        assert not any(part in ("test", "tests", "idlelib") for f in files for part in f.parts)
        contents[subject] = (corpus_dir / f"{subject}.bin").read_bytes()
        build_subject(subject, str(tmp_path / subject))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"{subject}.{ext}").read_bytes() == (corpus_dir / f"{subject}.{ext}").read_bytes()
    assert len(set(contents.values())) == len(SUBJECTS)


def test_default_corpus_unknown_missing_dataset(tmp_path):
    from megatron_llm.data.default_corpus import ensure_default_corpus

    with pytest.raises(UsageError, match="not a default-corpus subject"):
        ensure_default_corpus([DatasetSpec(path=str(tmp_path / "wikipedia"))])


# ---------------------------------------------------------------------------------------------
# megatron-core datasets over a blend


def _blend_config(corpus: Path, tmp_path: Path, **kw) -> DataConfig:
    blend = [
        DatasetSpec(path=str(corpus / "networking"), weight=3.0, name="net"),
        DatasetSpec(path=str(corpus / "text"), weight=1.0),
    ]
    return DataConfig(blend=blend, seq_len=32, split="90,10,0", cache_dir=str(tmp_path / "cache"), **kw)


def _pieces_in(tokens: list[int], data: bytes, eod: int = 256) -> bool:
    """Whether every run of tokens between end-of-document tokens occurs in the file (samples cross
    documents in shuffled order, so only the runs are contiguous in the .bin)."""
    runs, run = [], []
    for t in tokens:
        if t == eod:
            runs.append(run)
            run = []
        else:
            run.append(t)
    runs.append(run)
    return all(np.asarray(r, dtype=np.uint16).tobytes() in data for r in runs if len(r) >= 8)


def test_build_datasets_blend(corpus_dir, tmp_path, process_group):
    cfg = _blend_config(corpus_dir, tmp_path)
    data = build_datasets(cfg, vocab_size=257, seed=7, num_train_samples=2000, num_valid_samples=40)
    assert data.channel_names == ["net", "text"] and len(data.train) >= 2000
    files = [(corpus_dir / f"{n}.bin").read_bytes() for n in ("networking", "text")]

    ids = np.array([int(data.train[i]["dataset_id"]) for i in range(2000)])
    assert abs((ids == 0).mean() - 0.75) < 0.02  # weights 3:1

    for i in range(0, 2000, 97):
        sample = data.train[i]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert len(tokens) == 32 and tokens[1:] == labels[:-1]
        channel = int(sample["dataset_id"])
        assert _pieces_in(tokens + labels[-1:], files[channel])
        assert not _pieces_in(tokens + labels[-1:], files[1 - channel])

    assert data.valid is not None and len(data.valid) >= 40
    for channel, name in enumerate(data.channel_names):
        valid = data.valid_by_channel[name]
        assert len(valid) >= 40
        for i in range(0, 40, 9):
            assert int(valid[i]["dataset_id"]) == channel
            assert _pieces_in(valid[i]["tokens"].tolist(), files[channel])

    again = build_datasets(cfg, vocab_size=257, seed=7, num_train_samples=2000, num_valid_samples=40)  # cache hit
    assert torch.equal(again.train[123]["tokens"], data.train[123]["tokens"])
    no_valid = build_datasets(dataclasses.replace(cfg, split="1,0,0"), 257, 7, 100, num_valid_samples=40)
    assert no_valid.valid is None and no_valid.valid_by_channel == {}


def _copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for ext in ("bin", "idx"):
        shutil.copy(f"{src}.{ext}", dst / f"{src.name}.{ext}")
    return dst / src.name


def test_build_datasets_rejects_bad_data(corpus_dir, tmp_path, process_group):
    def build(prefix: Path, vocab_size: int = 257, seq_len: int = 32):
        cfg = DataConfig(blend=[DatasetSpec(path=str(prefix))], seq_len=seq_len, cache_dir=str(tmp_path / "cache"))
        return build_datasets(cfg, vocab_size=vocab_size, seed=1, num_train_samples=10, num_valid_samples=0)

    single = build(corpus_dir / "text")  # the good case: one dataset is still a blend, channel 0
    assert single.channel_names == ["text"] and single.valid is None
    assert {int(single.train[i]["dataset_id"]) for i in range(10)} == {0}

    missing = _copy_dataset(corpus_dir / "text", tmp_path / "missing")
    Path(f"{missing}.bin").unlink()
    with pytest.raises(UsageError, match=r"missing/text\.bin not found; create it with tools/preprocess_data\.py"):
        build(missing)

    truncated = _copy_dataset(corpus_dir / "text", tmp_path / "truncated")
    with open(f"{truncated}.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UsageError, match=r"truncated/text\.idx describes \d+ bytes but .*holds 1000"):
        build(truncated)
    good_idx = Path(f"{truncated}.idx").read_bytes()
    last_document_start = len(good_idx) - 8
    for bad_idx in (b"MMIDIDX", good_idx[:-100], good_idx[:last_document_start] + bytes(8)):
        Path(f"{truncated}.idx").write_bytes(bad_idx)
        with pytest.raises(UsageError, match=r"dataset index .*truncated/text\.idx is corrupt; rerun"):
            build(truncated)

    with pytest.raises(UsageError, match=r"text\.bin holds token id 256 but the vocabulary has 200 ids"):
        build(corpus_dir / "text", vocab_size=200)
    with pytest.raises(UsageError, match=r"its valid split .* fewer than data\.seq_len \+ 1"):
        build(corpus_dir / "text", seq_len=1_000_000)


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.fixture(scope="module")
def train_dataset(corpus_dir, tmp_path_factory, process_group):
    cfg = _blend_config(corpus_dir, tmp_path_factory.mktemp("loader"))
    return build_datasets(cfg, vocab_size=257, seed=3, num_train_samples=200, num_valid_samples=16)


def _cat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_two_dp_ranks_see_the_single_rank_global_batch(train_dataset):
    single = TrainBatches(train_dataset.train, micro_batch_size=4, grad_accum_steps=2, dp_rank=0, dp_size=1)
    ranks = [TrainBatches(train_dataset.train, 2, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        one = single.next_step()
        per_rank = [r.next_step() for r in ranks]
        for m in range(2):
            joined = _cat([per_rank[0][m], per_rank[1][m]])
            for key in ("tokens", "labels", "loss_mask", "channel"):
                assert torch.equal(joined[key], one[m][key]), key
    first = TrainBatches(train_dataset.train, 4, 2, 0, 1).next_step()[0]
    assert first["tokens"].dtype == torch.long and first["loss_mask"].dtype == torch.float32
    assert first["tokens"].shape == (4, 32) and first["channel"].shape == (4,)
    assert torch.equal(first["tokens"][1], train_dataset.train[1]["tokens"])


def test_resume_and_workers_give_the_same_batches(train_dataset):
    straight = TrainBatches(train_dataset.train, 2, 3, dp_rank=1, dp_size=2)
    steps = [straight.next_step() for _ in range(4)]
    resumed = TrainBatches(train_dataset.train, 2, 3, dp_rank=1, dp_size=2, start_sample=2 * 12)
    workers = TrainBatches(train_dataset.train, 2, 3, dp_rank=1, dp_size=2, start_sample=2 * 12, num_workers=2)
    for k in (2, 3):
        for batches in (resumed.next_step(), workers.next_step()):
            for got, want in zip(batches, steps[k]):
                assert all(torch.equal(got[key], want[key]) for key in want)
    assert resumed.next_sample == 4 * 12  # global batch 2 x 3 x 2


def test_eval_batches_repeat(train_dataset):
    valid = train_dataset.valid_by_channel["text"]
    first = list(eval_batches(valid, 2, 3, dp_rank=0, dp_size=2))
    again = list(eval_batches(valid, 2, 3, dp_rank=0, dp_size=2))
    other = list(eval_batches(valid, 2, 3, dp_rank=1, dp_size=2))
    assert len(first) == 3 and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, again))
    assert (first[0]["channel"] == 1).all()
    assert torch.equal(_cat([first[1], other[1]])["tokens"], torch.stack([valid[i]["tokens"] for i in range(4, 8)]))


# ---------------------------------------------------------------------------------------------
# Several ranks building together


def _rank_main(rank: int, world: int, store: str, corpus: str, cache: str, out: str) -> None:
    _init_group(Path(store), rank, world)
    cfg = _blend_config(Path(corpus), Path(cache))
    data = build_datasets(cfg, vocab_size=257, seed=11, num_train_samples=300, num_valid_samples=8)
    tokens = torch.stack([data.train[i]["tokens"] for i in range(0, 300, 7)])
    torch.save(tokens, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_build_together(corpus_dir, tmp_path, process_group):
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: this one is already in a group
    args = (str(tmp_path / "store"), str(corpus_dir), str(tmp_path), str(tmp_path))
    procs = [ctx.Process(target=_rank_main, args=(r, 2, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ref = build_datasets(_blend_config(corpus_dir, tmp_path / "ref"), 257, 11, 300, 8)
    expected = torch.stack([ref.train[i]["tokens"] for i in range(0, 300, 7)])
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt"), expected)
