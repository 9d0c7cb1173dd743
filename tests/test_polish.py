"""Operator-facing behaviour: run directories and their resume, the config in TensorBoard, the banner,
validation (token-weighted val_loss, final evaluation), the W&B logger, tools/evaluate.py against the
trainer, exported token ids read by transformers, and the one-line refusals of the launchers and tools."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import megatron_llm
from conftest import CHANNELS, ROOT, tiny_overrides
from megatron_llm.checkpoint.native import read_config
from megatron_llm.config import load_config
from megatron_llm.data.mcore import mcore
from megatron_llm.data.tokenizer import ByteTokenizer
from megatron_llm.errors import UsageError
from megatron_llm.logging.progress import Progress
from megatron_llm.logging.runs import run_names
from megatron_llm.training.trainer import train

STEPS, EVAL_INTERVAL = 6, 4  # the last step is not a multiple of the interval


def tiny(corpus: Path, run_dir: Path, **extra):
    values = {"training__steps": STEPS, "training__eval_interval": EVAL_INTERVAL, "checkpoint__interval": 4, **extra}
    return load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(corpus, run_dir, **values))


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = events(run_dir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def blend(corpus: Path) -> str:
    return "[" + ", ".join(f"{{path: {corpus / name}}}" for name in CHANNELS) + "]"


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    """One fresh run without a run name: (its directory, its config, its TrainResult)."""
    run_dir = tmp_path_factory.mktemp("trained")
    cfg = tiny(corpus_dir, run_dir)
    return run_dir, cfg, train(cfg)


def test_a_run_logs_to_its_own_directory_with_its_config_and_a_resume_continues_it(trained, corpus_dir, capsys):
    run_dir, cfg, _ = trained
    (name,) = run_names(run_dir / "tb")
    saved = read_config(run_dir / "ckpt" / f"step_{STEPS:07d}")
    assert saved["logging"]["run_name"] == name  # the resolved name rides in the checkpoint

    acc = events(run_dir / "tb" / name)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines())) == saved  # the whole resolved config
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["training.steps"].number_value == STEPS

    # Resuming (no run name given) writes on in the same directory; a fresh run gets a new one.
    resumed = train(tiny(corpus_dir, run_dir, training__steps=STEPS + 2, checkpoint__resume="auto"))
    assert sorted(resumed.losses) == [STEPS, STEPS + 1]
    assert run_names(run_dir / "tb") == [name]
    assert max(scalars(run_dir / "tb" / name)["loss"]) == STEPS + 2
    out = capsys.readouterr().out
    assert f"run {name}" in out and f"resumed from {run_dir / 'ckpt' / f'step_{STEPS:07d}'} at step {STEPS}" in out


def test_banner_states_the_run(trained, corpus_dir, tmp_path, capsys):
    cfg = tiny(corpus_dir, tmp_path, training__steps=1, training__eval_interval=0, logging__run_name="named")
    train(cfg)
    out = capsys.readouterr().out
    model = megatron_llm.load_model(str(tmp_path / "ckpt"))
    params = sum(p.numel() for p in model.parameters())
    t = cfg.training
    sequences = t.micro_batch_size * t.grad_accum_steps
    assert "run named" in out
    assert f"parameters   {params / 1e3:.2f}k total, {params / 1e3:.2f}k per rank" in out
    assert "1 rank: tp=1 pp=1 dp=1" in out
    assert f"global batch {sequences} sequences x {cfg.data.seq_len} tokens = {sequences * cfg.data.seq_len:,} tokens" in out
    assert f"tensorboard  {tmp_path / 'tb' / 'named'}" in out and f"checkpoints  {tmp_path / 'ckpt'}" in out
    assert "resumed from - (a fresh start)" in out and "step 1/1 |" in out and "| eta " in out


def test_val_loss_is_the_token_weighted_mean_of_the_channels_and_the_run_ends_evaluated(trained):
    run_dir, cfg, result = trained
    assert sorted(result.val_losses) == [EVAL_INTERVAL, STEPS]  # STEPS is not a multiple of the interval
    tokens = cfg.training.eval_iters * cfg.training.micro_batch_size * cfg.data.seq_len  # every label counts
    for step, per_channel in result.val_channel_losses.items():
        assert sorted(per_channel) == sorted(CHANNELS)
        weighted = sum(loss * tokens for loss in per_channel.values()) / (tokens * len(per_channel))
        assert result.val_losses[step] == pytest.approx(weighted, rel=1e-9)
        assert min(per_channel.values()) <= result.val_losses[step] <= max(per_channel.values())
    (name,) = run_names(run_dir / "tb")
    assert {EVAL_INTERVAL, STEPS} <= set(scalars(run_dir / "tb" / name)["val_loss"])  # (+ a resumed run's end)


def test_evaluate_tool_reproduces_the_trainers_validation_on_any_format(trained, tmp_path):
    run_dir, cfg, result = trained
    hf = tmp_path / "hf"
    convert = [sys.executable, "tools/convert_checkpoint.py", "--input", str(run_dir / "ckpt" / f"step_{STEPS:07d}"),
               "--input-format", "native", "--output", str(hf), "--output-format", "hf"]
    assert subprocess.run(convert, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    t = cfg.training
    for checkpoint in (run_dir / "ckpt" / f"step_{STEPS:07d}", hf):
        # The HF copy has no training config: the evaluation settings are given.
        settings = ["--seq-len", str(cfg.data.seq_len), "--micro-batch-size", str(t.micro_batch_size),
                    "--batches", str(t.eval_iters)] if checkpoint == hf else []
        out = subprocess.run(
            [sys.executable, "tools/evaluate.py", "--checkpoint", str(checkpoint), "--data", blend_of(cfg), *settings,
             "--tensorboard", str(tmp_path / "eval")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        rows = {line.split()[0]: float(line.split()[2]) for line in out.stdout.splitlines()[2:] if len(line.split()) == 4}
        for name, loss in result.val_channel_losses[STEPS].items():
            assert rows[name] == pytest.approx(loss, abs=1e-4), (checkpoint, name)
        assert rows["all"] == pytest.approx(result.val_losses[STEPS], abs=1e-4)
    logged = scalars(tmp_path / "eval")
    assert logged["eval_loss"][0] == pytest.approx(result.val_losses[STEPS], abs=1e-4)  # the HF copy has no step
    assert logged["eval_loss"][STEPS] == pytest.approx(result.val_losses[STEPS], abs=1e-4)


def blend_of(cfg) -> str:
    return "[" + ", ".join(f"{{path: {spec.path}}}" for spec in cfg.data.blend) + "]"


def test_exported_byte_model_carries_its_token_ids_for_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _, _ = trained
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--input", str(run_dir / "ckpt"), "--input-format",
                    "native", "--output", str(hf), "--output-format", "hf"], cwd=ROOT, check=True, capture_output=True)
    eod = ByteTokenizer.eod
    generation = transformers.GenerationConfig.from_pretrained(hf)
    config = transformers.AutoConfig.from_pretrained(hf)
    assert (generation.eos_token_id, generation.pad_token_id, config.eos_token_id, config.pad_token_id) == (eod,) * 4
    # Greedy generation with no hand-set ids is our model's greedy continuation.
    prompt = torch.tensor([list(b"import socket\n")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).generate(prompt, max_new_tokens=8, do_sample=False)
    ours = megatron_llm.load_model(str(run_dir / "ckpt"))
    tokens = prompt
    with torch.no_grad():
        for _ in range(theirs.shape[1] - prompt.shape[1]):
            tokens = torch.cat([tokens, ours(tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(theirs, tokens)


def test_wandb_offline_gets_the_tensorboard_scalars(corpus_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: dict[int, dict] = {}
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(run, data, step=None, **kwargs):
        logged.setdefault(step, {}).update(data)
        return real_log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    cfg = tiny(corpus_dir, tmp_path, training__steps=4, logging__wandb_project="megatron_llm_test", logging__run_name="wb")
    train(cfg)
    tensorboard = scalars(tmp_path / "tb" / "wb")
    for tag, values in tensorboard.items():
        for step, value in values.items():
            assert logged[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)  # TB stores float32
    assert {f"loss/{name}" for name in CHANNELS} <= set(logged[4])
    assert list(tmp_path.glob("wandb/offline-run-*-wb/run-wb.wandb"))  # the offline run, id = run name


def test_wandb_that_cannot_start_a_run_is_one_clear_error(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from megatron_llm.logging.sinks import WandbSink

    wandb.teardown()  # wandb keeps the settings of an earlier run in this process (offline mode)

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: online mode cannot log in
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="wandb cannot start a run .*run `wandb login`, or set WANDB_MODE=offline"):
        WandbSink("megatron_llm_test", "nokey", {})


def test_wandb_project_without_wandb_is_one_clear_error(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UsageError, match="wandb is not installed: pip install wandb"):
        tiny(corpus_dir, tmp_path, logging__wandb_project="p")


def test_plot_picks_the_newest_run_or_the_named_one(corpus_dir, tmp_path):
    for name in ("first", "second"):
        train(tiny(corpus_dir, tmp_path / name, training__steps=2, training__eval_interval=0, logging__run_name=name,
                   logging__tensorboard_dir=str(tmp_path / "tb")))

    def plot(*extra):
        return subprocess.run([sys.executable, "tools/plot_channels.py", str(tmp_path / "tb"), "--output",
                               str(tmp_path / "out.png"), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert "run second," in plot().stdout
    assert "run first," in plot("--run", "first").stdout
    missing = plot("--run", "third")
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'tb'} has no run 'third'; its runs: first, second"


def test_preprocess_prints_a_blend_flag_weighted_by_tokens(tmp_path):
    src = tmp_path / "mixed.jsonl"
    docs = [("web", "hello world " * 40), ("code it's", "def f(x):\n    return x\n" * 90), ("web", "more " * 10)]
    src.write_text("".join(json.dumps({"text": t, "source": c}) + "\n" for c, t in docs))

    def flag(*extra) -> list:
        out = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix",
                              str(tmp_path / "mixed"), "--channel-field", "source", "--workers", "1", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        line = next(line for line in out.stdout.splitlines() if line.startswith("--data.blend "))
        _, value = shlex.split(line)  # as the shell would pass it
        return load_config(None, ["--data.blend", value, "--data.default_corpus", "false"]).data.blend

    by_tokens = flag()
    indexed = mcore("datasets.indexed_dataset")
    datasets = {spec.name: indexed.IndexedDataset(spec.path) for spec in by_tokens}  # alive: their arrays map the files
    tokens = {name: int(dataset.sequence_lengths.sum()) for name, dataset in datasets.items()}
    assert sorted(tokens) == ["code it's", "web"]
    for spec in by_tokens:
        assert spec.weight == pytest.approx(tokens[spec.name] / sum(tokens.values()), rel=1e-3)
    assert [spec.weight for spec in flag("--equal-weights")] == [1.0, 1.0]


def test_torchrun_sh_refuses_a_bad_layout_once_before_any_worker(corpus_dir, tmp_path):
    env = dict(os.environ, NPROC_PER_NODE="3", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", "launch/torchrun.sh", "configs/tiny.yaml", *tiny_overrides(corpus_dir, tmp_path),
                          "--parallel.tp", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "error: world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1"


@pytest.mark.parametrize("args, says", [
    (["--config", "configs/tiny.yaml", "--dp", "16"], "--measure runs 16 ranks"),
    (["--config", "configs/llama3_8b.yaml"], "this machine has"),
])
def test_estimate_memory_refuses_what_it_cannot_measure_here(args, says):
    out = subprocess.run([sys.executable, "tools/estimate_memory.py", *args, "--measure"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and says in out.stderr


def test_progress_prints_lines_where_stderr_is_not_a_terminal(capsys):
    progress = Progress("converting", 4, "groups", every_s=0)
    for done in range(1, 5):
        progress.update(done)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and lines[0].startswith("converting:  25.0% (1 of 4 groups)") and "100.0%" in lines[-1]


def test_benchmark_says_how_to_install_transformers(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert benchmark.main(["--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install transformers" in err
