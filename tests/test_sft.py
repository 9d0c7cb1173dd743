"""Post-training data: conversations with loss masks, packing with document masks, channels in packs.

Each claim is checked against a from-scratch computation: the chat files against a hand-rendered default
template, the masked loss against cross-entropy over the assistant tokens, a packed sequence against
each of its conversations run alone (loss and gradients), data.document_mask against each pretraining
document run alone, the CPU kernel that attends document by document against the dense mask, and a
chain of SFT runs (1F1B, interleaved 1F1B, ZBV) against one process.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CHANNELS, ROOT
from megatron_llm.config import DataConfig, DatasetSpec, load_config
from megatron_llm.data.chat import RecordEncoder
from megatron_llm.data.loader import collate
from megatron_llm.data.packing import DocumentMasked, best_fit, build_conversation_datasets
from megatron_llm.data.preprocess import preprocess
from megatron_llm.data.synthetic_chat import conversations
from megatron_llm.data.tokenizer import ByteTokenizer
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model.attention_kernels import KeyMask, ScoreRules, alibi_slopes, attend, document_chunks, masked_attend
from megatron_llm.parallel.pipeline import document_inputs
from megatron_llm.training.loss import micro_batch_loss
from test_parallel import check_chain, workers  # noqa: F401 (workers: the module's pool of ranks, a fixture)

TOK = ByteTokenizer()


def _write(path, records):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _by_hand(messages) -> tuple[list[int], list[int]]:
    """The default template, written out: ids and the target mask (assistant content and its eod)."""
    ids, mask = [], []
    for m in messages:
        if m["role"] == "assistant":
            head, body = TOK.encode("<|assistant|>\n"), TOK.encode(m["content"]) + [TOK.eod]
            ids += head + body
            mask += [0] * len(head) + [1] * len(body)
        else:
            text = TOK.encode(f"<|{m['role']}|>\n{m['content']}\n")
            ids += text
            mask += [0] * len(text)
    return ids, mask


def _documents(prefix) -> list[list[int]]:
    from megatron_llm.data.mcore import mcore

    data = mcore("datasets.indexed_dataset").IndexedDataset(str(prefix))
    return [data[i].tolist() for i in range(len(data))]


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    """Synthetic conversations as three chat datasets named like conftest's channels (gzip'd input)."""
    directory = tmp_path_factory.mktemp("chat")
    records = conversations(600, seed=1)
    for c, name in enumerate(CHANNELS):
        src = _write(directory / f"{name}.jsonl.gz", records[c::3])
        preprocess(str(src), str(directory / name), fmt="chat", progress=False)
    return directory, records


def test_chat_files_hold_the_template_and_the_assistant_mask(chat_corpus):
    directory, records = chat_corpus
    expected = [_by_hand(r["messages"]) for r in records[0::3]]
    assert _documents(directory / CHANNELS[0]) == [ids for ids, _ in expected]
    assert _documents(directory / f"{CHANNELS[0]}.mask") == [mask for _, mask in expected]


def test_prompt_response_loss_on_all_and_max_length(tmp_path):
    src = _write(tmp_path / "qa.jsonl", [{"prompt": "hi", "response": "hello there"}, {"prompt": "x" * 50, "response": "y"}])
    stats = preprocess(str(src), str(tmp_path / "qa"), fmt="prompt_response", loss_on="all", max_length=40, progress=False)
    ids, _ = _by_hand([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    assert _documents(tmp_path / "qa") == [ids, _by_hand([{"role": "user", "content": "x" * 50}])[0][:40]]
    assert _documents(tmp_path / "qa.mask") == [[1] * len(ids), [1] * 40]
    assert (stats.truncated, stats.dropped) == (1, 0)
    # On the assistant only, the cut conversation has no target left: dropped, and counted.
    stats = preprocess(str(src), str(tmp_path / "qa2"), fmt="prompt_response", max_length=40, progress=False)
    assert (stats.documents, stats.truncated, stats.dropped) == (1, 0, 1)


def test_a_malformed_line_is_one_error_and_nothing_is_written(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    src = _write(tmp_path / "in.jsonl", [good, good, {"messages": [{"role": "robot", "content": "b"}]}])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--format", "chat", "--input",
                             str(src), "--output-prefix", str(tmp_path / "out"), "--workers", "1"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: line 3 message 0 is not \{role", lines[0]), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_parquet_without_pyarrow_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """pyarrow stays out of the test extra (26.0.1: a 55 MB wheel, 170 MB installed); without it a parquet
    input is refused by name, before anything is written."""
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # an import of it fails, as where it is absent
    (tmp_path / "chats.parquet").write_bytes(b"PAR1")
    with pytest.raises(UsageError, match=r"chats.parquet is parquet, which needs pyarrow: pip install -e '\.\[parquet\]' \(or pyarrow\), or export it as jsonl"):
        preprocess(str(tmp_path / "chats.parquet"), str(tmp_path / "chat"), fmt="chat", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.parquet"]


def test_hf_chat_template_masks_the_assistant_turns(tmp_path):
    """A ChatML template from tokenizer_config.json, with the byte-level vocabulary of a tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(32, 127)} | {"\n": 127, "<|im_start|>": 128, "<|im_end|>": 129}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    from megatron_llm.data.tokenizer import load_tokenizer

    encode = RecordEncoder("chat", load_tokenizer(str(tmp_path / "tokenizer.json")))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (ids, mask), = encode({"messages": messages}).documents
    text = "".join("<|im_start|>" if i == 128 else "<|im_end|>" if i == 129 else "\n" if i == 127 else chr(i) for i in ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    trained = "".join(t for t, m in zip(re.findall(r"<\|im_\w+\|>|.|\n", text, re.S), mask) if m)
    assert trained == "yo<|im_end|>\n"


def _data(directory, packing: bool, seq_len: int = 256, **extra) -> DataConfig:
    blend = [DatasetSpec(path=str(directory / name)) for name in CHANNELS]
    return DataConfig(blend=blend, seq_len=seq_len, format="sft", packing=packing, split="90,10,0", **extra)


def _model(seed=0):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["--model.hidden_size", "64", "--model.num_layers", "2",
                                                           "--model.num_heads", "4", "--model.num_kv_heads", "2",
                                                           "--model.ffn_hidden_size", "128"]).model
    return build_model(cfg, "cpu", seed=seed)


def test_masked_loss_is_cross_entropy_over_the_assistant_tokens(chat_corpus):
    directory, records = chat_corpus
    train, _, _ = build_conversation_datasets(_data(directory, packing=False), 257, 0, 8, TOK.eod)
    batch = collate([train[i] for i in range(4)])
    model = _model()
    loss, _ = micro_batch_loss(model(batch["tokens"]), batch["labels"], batch["loss_mask"], 0.0, batch["loss_mask"].sum())
    s = batch["tokens"].shape[1]
    by_ids = {}  # a row's tokens -> its conversation's ids and target mask, cut to the sequence like the row
    for r in records:
        ids, mask = _by_hand(r["messages"])
        by_ids[tuple(ids[:s] + [TOK.eod] * (s - len(ids)))] = (ids[:s], mask[:s])
    total, count = 0.0, 0
    for row in batch["tokens"]:
        ids, mask = by_ids[tuple(row.tolist())]
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        logits = model(ids[None])[0]
        total += F.cross_entropy(logits[:-1][mask[1:]], ids[1:][mask[1:]], reduction="sum")
        count += int(mask[1:].sum())
    torch.testing.assert_close(loss, total / count, rtol=1e-6, atol=1e-6)


def test_a_packed_sequence_equals_its_conversations_run_alone(chat_corpus):
    directory, _ = chat_corpus
    train, _, note = build_conversation_datasets(_data(directory, packing=True), 257, 0, 8, TOK.eod)
    assert "packed best-fit" in note
    batch = collate([next(train[k] for k in range(len(train)) if train[k]["documents"].max() >= 2)])  # 2+ documents
    model = _model()
    token_ce = model(batch["tokens"], batch["labels"], **document_inputs(batch)) * batch["loss_mask"]  # [1, s]
    (token_ce.sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_total = 0.0
    for d in batch["documents"][0].unique():
        cols = batch["documents"][0] == d
        tokens, labels, mask = (batch[k][:, cols] for k in ("tokens", "labels", "loss_mask"))
        alone = model(tokens, labels) * mask  # positions 0.., plain causal attention
        torch.testing.assert_close(token_ce[:, cols], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(batch["channel"][:, cols], batch["channel"][:, cols][:, :1].expand_as(mask))  # one channel
        alone_total = alone_total + alone.sum()
    alone_total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_document_mask_equals_pretraining_documents_run_alone():
    model = _model(seed=3)
    ids = torch.tensor([5, 6, 7, TOK.eod, 8, 9, TOK.eod, 10, 11, 12, 13, 14])
    sample = {"tokens": ids, "labels": torch.cat([ids[1:], ids[:1]]), "loss_mask": torch.ones(12), "dataset_id": np.int16(0)}
    batch = collate([DocumentMasked([sample], TOK.eod)[0]])
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    masked = model(batch["tokens"], batch["labels"], **document_inputs(batch))
    for start, end in ((0, 4), (4, 7), (7, 12)):
        alone = model(batch["tokens"][:, start:end], batch["labels"][:, start:end])
        torch.testing.assert_close(masked[:, start:end], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rules", [ScoreRules(), ScoreRules(window=17, alibi=True), ScoreRules(softcap=5.0)], ids=str)
def test_attention_by_document_equals_the_dense_document_mask(rules):
    """On CPU a document mask runs document by document (tiny ones grouped under the mask); outputs and
    gradients equal the dense mask's (1e-5), for every score rule, grouped-query heads and padding rows."""
    # 40 tiny documents, one long, a pad document; and chunks of one length and kind in several rows, run together
    lengths = [[5, 3, 150, 20, 30, 92], [300], [1] * 40 + [259, 1], [4, 4, 150, 142], [300]]
    documents = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    keys = KeyMask(documents=documents)
    assert document_chunks(keys) == [[(8, True), (150, False), (142, True)], [(300, False)], [(40, True), (259, False), (1, False)],
                                     [(8, True), (150, False), (142, False)], [(300, False)]]
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, h, 300, 16, requires_grad=True) for h in (4, 2, 2))
    slopes = alibi_slopes(4)
    outputs = [fn(q, k, v, rules, 0.25, slopes, keys) for fn in (attend, masked_attend)]
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in outputs]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for ours, dense in zip(*grads):
        torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    # Ids that come back to an earlier document are not spans: the dense mask decides.
    assert document_chunks(KeyMask(documents=torch.tensor([[0, 0, 1, 0]]))) is None


def test_best_fit_packs_a_mixed_length_set_tightly():
    lengths = np.random.default_rng(0).integers(8, 900, size=4096)
    bins = best_fit(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(4096))
    assert max(lengths[b].sum() for b in bins) <= 1024
    assert lengths.sum() / (len(bins) * 1024) > 0.95


def test_random_channels_and_resume_position(chat_corpus):
    """Random channels are per conversation and seeded; sample k does not depend on what was read before."""
    directory, _ = chat_corpus
    first, _, _ = build_conversation_datasets(_data(directory, True, random_channels=4), 257, 7, 16, TOK.eod)
    again, _, _ = build_conversation_datasets(_data(directory, True, random_channels=4), 257, 7, 16, TOK.eod)
    for k in (15, 3):
        for key, value in first[k].items():
            assert np.array_equal(np.asarray(value), np.asarray(again[k][key])), key
    channels = np.concatenate([first[k]["dataset_id"][first[k]["loss_mask"] > 0] for k in range(16)])
    assert set(channels.tolist()) == {0, 1, 2, 3}


# tp2 x pp2 (1F1B, sequence parallel), pp2 x dp2 (interleaved 1F1B, two virtual stages a rank, DDP), then
# pp2 x dp2 (ZBV, FSDP2), each resuming the previous run's checkpoint mid-epoch at another layout: per-step
# and per-channel losses, validation and parameters equal one process's (test_parallel.check_chain).
# Stages pass positions and document ids on.
SFT_CHAIN = [
    ("sft-tp2-pp2-1f1b-sp", 2, 2, 1, dict(parallel__sp=True)),
    ("sft-pp2-dp2-interleaved-ddp", 1, 2, 2, dict(parallel__schedule="interleaved_1f1b", parallel__virtual_stages=2,
                                                   parallel__data_parallel="ddp")),
    ("sft-pp2-dp2-zbv-fsdp", 1, 2, 2, dict(parallel__schedule="zbv", parallel__virtual_stages=2, training__eval_interval=0)),
]


def test_sft_packing_chain_matches_one_process(workers, chat_corpus, tmp_path):
    sft = dict(data__format="sft", data__seq_len=128, model__max_seq_len=128)
    check_chain(workers, chat_corpus[0], tmp_path, sft, SFT_CHAIN)
