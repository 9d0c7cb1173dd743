"""Reward models: the score head, preference pairs and the Bradley-Terry loss, transformers' sequence classifiers.

The pairwise loss is checked against a from-scratch computation on each side run alone; a short run on
pairs whose chosen side is recognisable must learn to rank them; Hugging Face Llama and Qwen2
sequence classifiers load into the score head and score as transformers does, and export back.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from megatron_llm.config import DataConfig, DatasetSpec, load_config
from megatron_llm.data.loader import collate
from megatron_llm.data.packing import build_pair_datasets
from megatron_llm.data.preprocess import preprocess
from megatron_llm.data.synthetic_chat import pairs
from megatron_llm.data.tokenizer import ByteTokenizer
from megatron_llm.inference.llm import LLM
from megatron_llm.model import build_model
from megatron_llm.training.reward import PairwiseObjective
from megatron_llm.training.trainer import train
from test_parallel import check_chain, workers  # noqa: F401 (workers: the module's pool of ranks, a fixture)

TOK = ByteTokenizer()
CHANNELS = ("upper", "lower")
GOOD, BAD = ("yes", "sure", "right", "true"), ("no", "never", "wrong", "false")


@pytest.fixture(scope="module")
def pair_corpus(tmp_path_factory):
    """Two channels of pairs that differ only in their last word: one of GOOD is chosen, one of BAD rejected."""
    directory = tmp_path_factory.mktemp("pairs")
    gen = torch.Generator().manual_seed(0)
    for name in CHANNELS:
        with open(directory / f"{name}.jsonl", "w") as f:
            for _ in range(200):
                words = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen))
                words = words.upper() if name == "upper" else words
                good, bad = (words_[int(torch.randint(4, (1,), generator=gen))] for words_ in (GOOD, BAD))
                f.write(json.dumps({"chosen": f"{words} {good}", "rejected": f"{words} {bad}"}) + "\n")
        preprocess(str(directory / f"{name}.jsonl"), str(directory / name), fmt="pairs", progress=False)
    return directory


def _score_model(seed=0, **extra):
    overrides = ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
                 "--model.num_kv_heads", "2", "--model.ffn_hidden_size", "128", "--model.head", "score"]
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides + ["--data.format", "pairs"]).model
    return build_model(cfg, "cpu", seed=seed)


def test_pairwise_loss_equals_each_side_scored_alone(pair_corpus):
    data = DataConfig(blend=[DatasetSpec(path=str(pair_corpus / n)) for n in CHANNELS], seq_len=32, format="pairs")
    rows, _, _ = build_pair_datasets(data, 257, 0, 8, TOK.eod)
    batch = collate([rows[i] for i in range(8)])  # 4 pairs
    model = _score_model()
    objective = PairwiseObjective(margin=0.5, centering=0.01, num_channels=2, device=torch.device("cpu"))
    loss, per_pair = objective(model(batch["tokens"]), batch, 4)
    expected = []
    for k in range(4):
        chosen, rejected = (model(rows[2 * k + j]["tokens"][None, : int(rows[2 * k + j]["last"]) + 1])[0, -1, 0]
                            for j in (0, 1))  # each side alone, unpadded: its score at its last token
        expected.append(-F.logsigmoid(chosen - rejected - 0.5) + 0.01 * (chosen + rejected) ** 2)
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_pair[batch["loss_mask"] > 0], torch.stack(expected).detach(), rtol=1e-6, atol=1e-6)
    accuracy = objective.gather(None)["accuracy"]
    assert sum(n for _, n in accuracy.values()) == 4


def test_a_short_run_learns_to_rank_recognisable_pairs(pair_corpus, tmp_path, capsys):
    """Training accuracy rises; validation on held-out pairs shows it per channel, and tools/evaluate.py
    on the checkpoint reproduces that validation from the command line."""
    blend = "[" + ", ".join(f"{{path: {pair_corpus / n}, name: {n}}}" for n in CHANNELS) + "]"
    overrides = {
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 128, "model.head": "score", "data.format": "pairs", "data.blend": blend,
        "data.default_corpus": False, "data.seq_len": 32, "training.micro_batch_size": 16,
        "training.steps": 16, "training.eval_interval": 16, "training.eval_iters": 1, "schedule.warmup_steps": 2,
        "optimizer.lr": 3e-3, "logging.interval": 4, "logging.tensorboard_dir": None,
        "checkpoint.dir": str(tmp_path / "ckpt"), "checkpoint.interval": 0, "training.reward_centering": 1e-3,
    }
    args = [x for k, v in overrides.items() for x in (f"--{k}", "null" if v is None else str(v))]
    result = train(load_config(str(ROOT / "configs" / "tiny.yaml"), args))
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval step 16/16")]
    assert float(re.search(r"val_accuracy (\S+)", line)[1]) > 0.9, line

    def accuracy(steps, channel=None):
        totals = [t for s in steps for c, t in result.rates[s]["accuracy"].items() if channel in (None, c)]
        return sum(v for v, _ in totals) / sum(n for _, n in totals)

    assert result.losses[0] == pytest.approx(math.log(2), abs=0.02)  # untrained: indifferent, -log sigmoid(~0)
    assert accuracy(range(12, 16)) > 0.95, [accuracy([s]) for s in range(16)]
    for c in range(len(CHANNELS)):
        assert accuracy(range(12, 16), c) > 0.9
    llm = LLM.load(str(tmp_path / "ckpt"))
    chosen, rejected = llm.reward(["QWERTY sure", "QWERTY never"])
    assert chosen > rejected
    out = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "ckpt"), "--data", blend],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r[0]: [float(x) for x in r[1:]] for r in map(str.split, out.stdout.splitlines()[2:])}  # pairs loss accuracy margin
    assert sorted(rows) == sorted([*CHANNELS, "all"])
    for name, loss in result.val_channel_losses[16].items():
        # data.split 98,2,0 holds out 4 pairs per channel; a micro-batch of 16 rows reads them twice.
        assert rows[name][0] == 8 and rows[name][1] == pytest.approx(loss, abs=1e-4), out.stdout
        assert rows[name][2] > 0.9 and rows[name][3] > 0, out.stdout
    assert rows["all"][1] == pytest.approx(result.val_losses[16], abs=1e-4)
    refused = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "ckpt"), "--data", blend,
                              "--format", "pretrain"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "preference pairs need a reward model" in refused.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_sequence_classifier_scores_equal_llm_reward_and_export(arch, tmp_path):
    import transformers

    from megatron_llm.checkpoint.convert import Options, convert

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    model_class = {"llama": transformers.LlamaForSequenceClassification, "qwen2": transformers.Qwen2ForSequenceClassification}[arch]
    torch.manual_seed(0)
    config = config_class(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, num_labels=1, max_position_embeddings=128, pad_token_id=TOK.eod)
    hf = model_class(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    texts = ["hello world", "a longer text than the first one", "x"]
    with torch.no_grad():
        expected = [hf(torch.tensor([TOK.encode(t)])).logits[0, 0].item() for t in texts]
    llm = LLM.load(str(tmp_path / "hf"))
    assert llm.model.cfg.head == "score"
    torch.testing.assert_close(torch.tensor(llm.reward(texts)), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # native and back: transformers builds the same classifier from our export
    convert(str(tmp_path / "hf"), "hf", str(tmp_path / "native"), "native", Options())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "back"), "hf", Options())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [model_class.__name__]
    again = model_class.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        scores = [again(torch.tensor([TOK.encode(t)])).logits[0, 0].item() for t in texts]
    assert scores == expected


# tp2 x pp2 (1F1B, sequence parallel: the score head row-parallel) then pp2 x dp2 (GPipe, DDP), each resuming
# the previous run's checkpoint: per-step and per-channel pairwise losses and parameters equal one process's.
REWARD_CHAIN = [
    ("rm-tp2-pp2-1f1b-sp", 2, 2, 1, dict(parallel__sp=True)),
    ("rm-pp2-dp2-gpipe-ddp", 1, 2, 2, dict(parallel__schedule="gpipe", parallel__data_parallel="ddp")),
]


def test_reward_chain_matches_one_process(workers, tmp_path_factory):
    from conftest import CHANNELS as CORPUS_NAMES

    directory = tmp_path_factory.mktemp("pair_chain")
    records = pairs(300, seed=2)
    for c, name in enumerate(CORPUS_NAMES):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[c::3]))
        preprocess(str(directory / f"{name}.jsonl"), str(directory / name), fmt="pairs", progress=False)
    # One score per row leaves most embedding rows a gradient of rounding noise, which AdamW's eps 1e-8 would
    # turn into full-size updates of either sign (see test_parallel's PARAM_ATOL): eps 1e-4 keeps them small.
    model = dict(data__format="pairs", model__head="score", optimizer__eps=1e-4)
    # A pairwise loss after a few updates moves ~10x more than the parameters that make it: dp2 DDP alone, 4 steps
    # from scratch, left every parameter within 1.5e-6 of one process (PARAM_ATOL 2e-5) and the step-4 validation
    # loss 2.7e-5 relative apart (this chain: 7.8e-5), while the step-1 and step-2 ones agreed to 4e-7.
    check_chain(workers, directory, tmp_path_factory.mktemp("runs"), model, REWARD_CHAIN, val_rtol=2e-4)


def test_init_from_a_language_model_keeps_its_body_under_a_new_score_head(pair_corpus, tmp_path):
    """checkpoint.init_from a tied causal LM with --model.head score: every weight but the head is the LM's
    (lr 0 keeps them), the head is the one training would draw, and the embedding is untied."""
    from megatron_llm.checkpoint.native import save_weights

    small = ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4", "--model.num_kv_heads", "2",
             "--model.ffn_hidden_size", "128", "--model.tie_embeddings", "true"]
    lm_config = load_config(str(ROOT / "configs" / "tiny.yaml"), small)
    lm = build_model(lm_config.model, "cpu", seed=5)
    save_weights(tmp_path / "lm", lm.state_dict(), lm_config.to_dict())
    blend = "[" + ", ".join(f"{{path: {pair_corpus / n}}}" for n in CHANNELS) + "]"
    args = ["--checkpoint.init_from", str(tmp_path / "lm"), "--model.head", "score", "--data.format", "pairs",
            "--data.blend", blend, "--data.default_corpus", "false", "--data.seq_len", "32", "--training.steps", "1",
            "--training.micro_batch_size", "4", "--training.eval_interval", "0", "--optimizer.lr", "0", "--optimizer.min_lr", "0",
            "--logging.tensorboard_dir", "null", "--checkpoint.dir", str(tmp_path / "rm")]
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), args)
    assert (cfg.model.head, cfg.model.tie_embeddings, cfg.model.hidden_size) == ("score", False, 64)
    train(cfg)
    reward = LLM.load(str(tmp_path / "rm")).model
    for name, value in reward.state_dict().items():
        expected = build_model(cfg.model, "cpu", seed=cfg.training.seed).output.weight if name == "output.weight" else lm.state_dict()[name]
        assert torch.equal(value, expected), name
