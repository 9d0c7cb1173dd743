"""Per-channel loss: exact sums, the overall loss as their token-weighted mean, TensorBoard curves
read back with TensorBoard's own reader, torchrun dp=2 against one process, random channels, tools."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CHANNELS, ROOT, free_port, tiny_overrides
from megatron_llm.config import load_config
from megatron_llm.data.datasets import build_datasets
from megatron_llm.data.loader import TrainBatches
from megatron_llm.logging.runs import find_run
from megatron_llm.model import build_model
from megatron_llm.training.channels import tag_safe
from megatron_llm.training.trainer import train


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(find_run(str(tb_dir))), size_guidance={"scalars": 0})  # the run's own directory
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_channel_sums_are_exact_and_logged(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, training__steps=4, logging__interval=2, training__eval_interval=4)
    result = train(cfg)

    # Step 0 from scratch: the initial model, the first global batch, F.cross_entropy, grouped by channel.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        data = build_datasets(cfg.data, cfg.model.vocab_size, cfg.training.seed, 4 * cfg.training.micro_batch_size, 0)
    finally:
        torch.distributed.destroy_process_group()
    (batch,) = TrainBatches(data.train, cfg.training.micro_batch_size, 1, 0, 1).next_step()
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, torch.device("cpu"), seed=cfg.training.seed)
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["tokens"]).transpose(1, 2), batch["labels"], reduction="none")  # [b, s]
    expected = {}
    for c in batch["channel"].unique().tolist():
        rows = batch["channel"] == c
        expected[c] = (ce[rows].sum().item(), float(batch["loss_mask"][rows].sum()))
    assert sorted(result.channels[0]) == sorted(expected)
    for c, (loss_sum, tokens) in expected.items():
        assert result.channels[0][c][1] == tokens
        assert result.channels[0][c][0] == pytest.approx(loss_sum, rel=1e-5)

    # Every step: the token-weighted mean over channels is the overall loss; the counts cover the batch.
    for step, per_channel in result.channels.items():
        loss_sum = sum(loss for loss, _ in per_channel.values())
        tokens = sum(tokens for _, tokens in per_channel.values())
        assert tokens == cfg.training.micro_batch_size * cfg.data.seq_len
        assert loss_sum / tokens == pytest.approx(result.losses[step], rel=1e-6)

    # TensorBoard: loss/<channel> and tokens/<channel> are the interval's token-weighted values.
    logged = scalars(tmp_path / "tb")
    names = list(CHANNELS)
    for end in (2, 4):
        for c, name in enumerate(names):
            steps = [s for s in (end - 2, end - 1) if c in result.channels[s]]
            if not steps:
                assert end not in logged.get(f"loss/{name}", {})  # absent channel: not logged
                continue
            loss = sum(result.channels[s][c][0] for s in steps)
            tokens = sum(result.channels[s][c][1] for s in steps)
            assert logged[f"loss/{name}"][end] == pytest.approx(loss / tokens, rel=1e-6)
            assert logged[f"tokens/{name}"][end] == tokens
    for name in names:
        assert logged[f"val_loss/{name}"][4] == pytest.approx(result.val_channel_losses[4][name], rel=1e-6)
    assert len({round(result.val_channel_losses[4][n], 3) for n in names}) == 3  # the sources differ


def test_per_channel_off_trains_the_same_without_channel_curves(tiny_config, tmp_path):
    on = train(tiny_config(tmp_path / "on", training__steps=4, training__eval_interval=4))
    off = train(tiny_config(tmp_path / "off", training__steps=4, training__eval_interval=4, logging__per_channel=False))
    assert off.losses == on.losses  # the accounting only reads the loss
    assert all(channels == {} for channels in off.channels.values()) and off.val_channel_losses[4] == {}
    tags = set(scalars(tmp_path / "off" / "tb"))
    assert {"loss", "val_loss"} <= tags and not any("/" in tag for tag in tags), tags
    assert {f"loss/{name}" for name in CHANNELS} <= set(scalars(tmp_path / "on" / "tb"))


@pytest.mark.parametrize("data_parallel", ["ddp"])
def test_torchrun_dp2_matches_one_process(corpus_dir, tmp_path, data_parallel):
    """The real entry point under torchrun, 2 data-parallel ranks: every step's per-channel values
    equal one process's on the same global batch (micro-batch 2 x 2 ranks = 4)."""
    common = ["--training.steps", "3", "--logging.interval", "1", "--training.eval_interval", "0"]

    def run(tag: str, launcher: list[str], extra: list[str]) -> dict:
        args = tiny_overrides(corpus_dir, tmp_path / tag) + common + extra
        out = subprocess.run(launcher + ["train.py", "--config", "configs/tiny.yaml", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return scalars(tmp_path / tag / "tb")

    single = run("one", [sys.executable], ["--training.micro_batch_size", "4"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    dp2 = run("dp2", torchrun, ["--training.micro_batch_size", "2", "--parallel.data_parallel", data_parallel])
    channel_tags = [t for t in single if t.startswith(("loss/", "tokens/"))]
    assert len(channel_tags) >= 4
    assert sorted(t for t in dp2 if t.startswith(("loss/", "tokens/"))) == sorted(channel_tags)
    for tag in channel_tags + ["loss"]:
        for step, value in single[tag].items():
            assert dp2[tag][step] == pytest.approx(value, rel=1e-5), (tag, step)


def test_random_channels_agree_within_noise(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, training__steps=6, data__random_channels=4, training__micro_batch_size=16, training__eval_interval=0)
    result = train(cfg)
    totals = {}
    for per_channel in result.channels.values():
        for c, (loss, tokens) in per_channel.items():
            acc = totals.setdefault(c, [0.0, 0.0])
            acc[0] += loss
            acc[1] += tokens
    assert sorted(totals) == [0, 1, 2, 3]
    overall = sum(l for l, _ in totals.values()) / sum(t for _, t in totals.values())
    for loss, tokens in totals.values():
        assert tokens > 0.1 * sum(t for _, t in totals.values())  # roughly uniform assignment
        assert loss / tokens == pytest.approx(overall, abs=0.15)  # same distribution: same loss, within noise
    assert {t for t in scalars(tmp_path / "tb") if t.startswith("loss/")} == {f"loss/random_{c}" for c in range(4)}


def test_channel_field_splits_the_jsonl_into_a_blend(tmp_path):
    src = tmp_path / "mixed.jsonl"
    docs = [("web", "hello world " * 40), ("code", "def f(x):\n    return x\n" * 30), ("web", "more web text " * 40)]
    src.write_text("".join(json.dumps({"text": t, "channel": c}) + "\n" for c, t in docs))
    out = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix", str(tmp_path / "mixed"),
         "--tokenizer", "byte", "--channel-field", "channel", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    blend_yaml = out.stdout[out.stdout.index("data:"):]
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(blend_yaml)
    blend = load_config(str(config_file)).data.blend
    assert [(Path(b.path).name, b.name) for b in blend] == [("mixed_code", "code"), ("mixed_web", "web")]
    from megatron_llm.data.mcore import mcore

    web = mcore("datasets.indexed_dataset").IndexedDataset(str(tmp_path / "mixed_web"))
    assert len(web) == 2 and bytes(web[1][:-1].tolist()).decode() == docs[2][1]


def test_plot_channels_draws_every_channel(tiny_config, tmp_path):
    train(tiny_config(tmp_path, training__steps=4, training__eval_interval=2))
    png = tmp_path / "channels.png"
    out = subprocess.run([sys.executable, "tools/plot_channels.py", str(tmp_path / "tb"), "--output", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"3 channels ({', '.join(sorted(CHANNELS))})" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    empty = subprocess.run([sys.executable, "tools/plot_channels.py", str(tmp_path / "nowhere")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "not a directory" in empty.stderr


def test_tag_safe():
    assert tag_safe("web/en: v2") == "web_en__v2"
    assert tag_safe("code-python.3") == "code-python.3"
