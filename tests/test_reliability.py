"""Nothing lost, nothing executed: retention, divergence, concurrent runs, colliding names, stale
temporaries, crafted checkpoints, bad input and stop signals at start-up, on the tiny model."""

import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import megatron_llm
from megatron_llm.checkpoint.convert import convert
from megatron_llm.data.preprocess import preprocess
from megatron_llm.errors import UsageError
from megatron_llm.training import trainer
from megatron_llm.training.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(training__eval_interval=0, logging__interval=100)  # the cases below need no evaluation or log lines


def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"  # conftest.tiny_overrides' checkpoint.dir


def saves(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step_"))


def latest(directory: Path) -> str:
    return (directory / "latest").read_text().strip()


def finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def tool(name: str):
    """tools/NAME.py as a module, to call its main(argv) in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------
# 1. Retention keeps the newest saves, and always the one `latest` names


def test_a_run_resumed_from_an_earlier_step_keeps_its_own_checkpoints(tiny_config, tmp_path):
    train(tiny_config(tmp_path, training__steps=8, checkpoint__interval=2, checkpoint__keep=0, **QUIET))
    ckpt = ckpt_dir(tmp_path)
    assert saves(ckpt) == ["step_0000002", "step_0000004", "step_0000006", "step_0000008"]
    # From step 2 again: its saves (3, 4) carry lower numbers than the earlier run's 6 and 8.
    resumed = train(tiny_config(tmp_path, training__steps=4, checkpoint__interval=1, checkpoint__keep=2,
                                checkpoint__resume=str(ckpt / "step_0000002"), **QUIET))
    assert sorted(resumed.losses) == [2, 3]
    assert saves(ckpt) == ["step_0000003", "step_0000004"] and latest(ckpt) == "step_0000004"
    assert finite(megatron_llm.load_model(str(ckpt)))


def test_a_fresh_run_into_another_runs_directory_is_refused(tiny_config, tmp_path, monkeypatch):
    train(tiny_config(tmp_path, training__steps=2, **QUIET))
    ckpt = ckpt_dir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in files_under(ckpt)}
    with pytest.raises(UsageError, match=r"already holds another run's checkpoints \(up to step 2\).*"
                                         r"--checkpoint.resume auto.*--checkpoint.dir.*--checkpoint.overwrite true"):
        train(tiny_config(tmp_path, training__steps=3, **QUIET))
    assert {p: p.stat().st_mtime_ns for p in files_under(ckpt)} == before  # nothing touched

    # A launcher restart of the same command line continues the run instead.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = train(tiny_config(tmp_path, training__steps=3, **QUIET))
    assert sorted(restarted.losses) == [2] and latest(ckpt) == "step_0000003"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")

    fresh = train(tiny_config(tmp_path, training__steps=2, checkpoint__overwrite=True, **QUIET))
    assert sorted(fresh.losses) == [0, 1] and latest(ckpt) == "step_0000002"


# ---------------------------------------------------------------------------------------------------
# 2. Divergence: no checkpoint in a bad streak; the one named is finite, present and resumable


def test_after_a_divergence_the_named_checkpoint_is_the_last_finite_one(tiny_config, tmp_path, monkeypatch):
    real_step, calls = trainer.train_step, []

    def weights_blow_up_after_step_2(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 2 itself is finite; its update leaves NaN weights, so step 3 on is NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer, "train_step", weights_blow_up_after_step_2)
    cfg = dict(training__steps=12, checkpoint__interval=1, checkpoint__keep=2, training__max_bad_steps=3, **QUIET)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step_0000002:") as failure:
        train(tiny_config(tmp_path, **cfg))
    named = Path(str(failure.value).split("last good checkpoint is ")[1].split(":")[0])
    assert named.is_dir() and latest(ckpt_dir(tmp_path)) == named.name
    assert finite(megatron_llm.load_model(str(named)))
    monkeypatch.undo()
    resumed = train(tiny_config(tmp_path, **{**cfg, "training__steps": 4, "checkpoint__resume": "auto"}))
    assert sorted(resumed.losses) == [2, 3] and all(torch.isfinite(torch.tensor(list(resumed.losses.values()))))


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_non_finite_learning_rate_is_refused_at_config_time(tiny_config, value):
    with pytest.raises(UsageError, match="optimizer.lr must be a finite number"):
        tiny_config(optimizer__lr=value)


# ---------------------------------------------------------------------------------------------------
# 3. One run per checkpoint directory


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_config, tmp_path, monkeypatch, capsys):
    ckpt = ckpt_dir(tmp_path)
    ckpt.mkdir()
    holder = open(ckpt / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
    holder.write("pid 4242 on node7\n")
    holder.flush()
    with pytest.raises(UsageError, match=r"in use by another run \(pid 4242 on node7\)"):
        train(tiny_config(tmp_path, training__steps=2, **QUIET))
    assert saves(ckpt) == []
    holder.close()  # the other run dies: its line stays in the file, its flock goes with it

    temporaries = []
    real_dcp_save = dcp.save
    monkeypatch.setattr(dcp, "save", lambda state, checkpoint_id: temporaries.append(Path(checkpoint_id).name)
                        or real_dcp_save(state, checkpoint_id=checkpoint_id))
    train(tiny_config(tmp_path, training__steps=2, **QUIET))
    assert "took over the lock of" in capsys.readouterr().out and (ckpt / ".lock").read_text() == ""
    train(tiny_config(tmp_path / "other", training__steps=2, **QUIET))
    assert len(temporaries) == 2 and temporaries[0] != temporaries[1]  # no two runs share a temporary name


def test_every_rank_stops_when_the_writing_rank_finds_the_directory_locked(corpus_dir, tmp_path):
    """Only the writing rank takes the lock; its refusal must reach the other ranks, which would
    otherwise wait in their next collective until parallel.timeout_s."""
    from conftest import tiny_overrides
    from parallel_harness import Workers

    ckpt = ckpt_dir(tmp_path)
    ckpt.mkdir()
    holder = open(ckpt / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pool = Workers(2)
    try:
        with pytest.raises(AssertionError) as refused:
            pool.run(2, tiny_overrides(corpus_dir, tmp_path, parallel__timeout_s=300, **QUIET), tmp_path, timeout_s=120)
        # A data error every rank finds only after the lock: the writing rank removes the directories it made.
        blend = broken_dataset(corpus_dir, tmp_path / "t", "token")
        with pytest.raises(AssertionError) as broken:
            pool.run(2, tiny_overrides(corpus_dir, tmp_path / "new", data__blend=blend, parallel__timeout_s=300, **QUIET),
                     tmp_path, timeout_s=120)
    finally:
        pool.close()
        holder.close()
    for rank in (0, 1):
        assert f"rank {rank}: UsageError: checkpoint.dir {ckpt} is in use by another run" in str(refused.value)
        assert f"rank {rank}: UsageError: {tmp_path / 't.bin'} holds token id 9999" in str(broken.value)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------
# 4. Channel names that become one file name or one TensorBoard tag


def test_channel_values_that_share_a_file_name_are_refused_before_anything_is_written(tmp_path):
    source = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": f"doc {i}", "src": src}) for i, src in enumerate(["a/b", "x", "a_b"])]
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"values 'a/b' and 'a_b' both map to the file name out_a_b.bin"):
        preprocess(str(source), str(tmp_path / "out"), channel_field="src", progress=False)
    assert files_under(tmp_path) == {source}


def test_channel_names_that_share_a_tensorboard_tag_are_refused(tiny_config, corpus_dir):
    blend = f"[{{path: {corpus_dir / 'text'}, name: 'web/en'}}, {{path: {corpus_dir / 'networking'}, name: 'web en'}}]"
    with pytest.raises(UsageError, match=r"\['web/en', 'web en'\] would all be logged as loss/web_en"):
        tiny_config(data__blend=blend)


# ---------------------------------------------------------------------------------------------------
# 5. What a killed process left behind


def test_a_killed_save_is_cleaned_up_or_put_back_by_the_next_run(tiny_config, tmp_path, capsys):
    train(tiny_config(tmp_path, training__steps=2, **QUIET))
    ckpt = ckpt_dir(tmp_path)
    # Killed while saving step 4 over an older step 2... (native.Checkpointer._move_into_place)
    os.replace(ckpt / "step_0000002", ckpt / ".tmp-0badc0de-replaced-step_0000002")
    (ckpt / ".tmp-0badc0de-step_0000004").mkdir()
    (ckpt / ".tmp-0badc0de-step_0000004" / "__0_0.distcp").write_bytes(b"\0" * 2**20)
    capsys.readouterr()
    resumed = train(tiny_config(tmp_path, training__steps=3, checkpoint__resume="auto", **QUIET))
    out = capsys.readouterr().out
    assert f"restored {ckpt / 'step_0000002'}" in out
    assert f"removed {ckpt / '.tmp-0badc0de-step_0000004'} (1.0 MiB)" in out
    assert sorted(resumed.losses) == [2] and not list(ckpt.glob(".tmp-*"))


def test_a_killed_preprocess_leaves_nothing_the_next_run_keeps(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid belongs to no process now
    stale = tmp_path / f".out.tmp{dead.pid}.bin"
    stale.write_bytes(b"\0" * 1024)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "hello"}) + "\n")
    preprocess(str(source), str(tmp_path / "out"), progress=False)
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err


def test_a_preprocess_stopped_between_its_renames_leaves_no_mismatched_pair(tmp_path, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out"
    source.write_text(json.dumps({"text": "first"}) + "\n")
    preprocess(str(source), str(out), progress=False)
    first = Path(f"{out}.bin").read_bytes()
    source.write_text(json.dumps({"text": "a longer second document"}) + "\n")
    real_replace = os.replace

    def stopped_before_the_index(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_before_the_index)
    with pytest.raises(OSError):
        preprocess(str(source), str(out), progress=False)
    assert Path(f"{out}.bin").read_bytes() != first  # the new tokens...
    assert not Path(f"{out}.idx").exists()  # ...never read through the old index
    assert files_under(tmp_path) == {source, Path(f"{out}.bin")}


# ---------------------------------------------------------------------------------------------------
# 6. A crafted checkpoint runs nothing


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"megatron_llm-pwned-{os.getpid()}"


class Payload:
    """Unpickling this would touch MARKER: what a crafted checkpoint does instead of loading."""

    def __reduce__(self):
        return pathlib.Path.touch, (MARKER,)


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tiny_config, tmp_path, capsys):
    import pickle

    train(tiny_config(tmp_path, training__steps=2, **QUIET))
    step = ckpt_dir(tmp_path) / "step_0000002"
    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    MARKER.unlink(missing_ok=True)
    with pytest.raises(UsageError, match="refused to load .*.metadata: it would build .*nothing in it was run"):
        megatron_llm.load_model(str(step))
    with pytest.raises(UsageError, match="refused to load"):
        convert(str(step), "native", str(tmp_path / "hf"), "hf")
    with pytest.raises(UsageError, match="refused to load"):
        train(tiny_config(tmp_path, training__steps=3, checkpoint__resume="auto", **QUIET))
    assert not MARKER.exists() and not (tmp_path / "hf").exists()


def test_a_crafted_value_in_a_shard_is_refused_on_resume(tiny_config, tmp_path, monkeypatch):
    real_state = trainer.Trainer._trainer_state
    monkeypatch.setattr(trainer.Trainer, "_trainer_state", lambda self: {**real_state(self), "skipped": Payload()})
    train(tiny_config(tmp_path, training__steps=2, **QUIET))  # DCP pickles the value into the .distcp
    monkeypatch.undo()
    MARKER.unlink(missing_ok=True)
    with pytest.raises(UsageError, match="refused to load trainer.skipped of .*step_0000002: it would build"):
        train(tiny_config(tmp_path, training__steps=3, checkpoint__resume="auto", **QUIET))
    assert not MARKER.exists()


# ---------------------------------------------------------------------------------------------------
# 7. Bad input: one line, exit 2, nothing written


def test_a_truncated_shard_is_named_and_auto_resumes_from_the_previous_checkpoint(tiny_config, tmp_path, capsys):
    train(tiny_config(tmp_path, training__steps=4, checkpoint__interval=2, checkpoint__keep=0, **QUIET))
    ckpt = ckpt_dir(tmp_path)
    shard = ckpt / "step_0000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UsageError, match=f"{shard} is truncated"):
        train(tiny_config(tmp_path, training__steps=6, checkpoint__resume=str(shard.parent), **QUIET))
    capsys.readouterr()
    resumed = train(tiny_config(tmp_path, training__steps=6, checkpoint__resume="auto", **QUIET))
    assert f"{shard} is truncated" in capsys.readouterr().out
    assert sorted(resumed.losses) == [2, 3, 4, 5] and latest(ckpt) == "step_0000006"


def test_a_truncated_safetensors_file_and_a_malformed_config_json_are_named(tiny_config, tmp_path, capsys):
    train(tiny_config(tmp_path, training__steps=2, **QUIET))
    convert(str(ckpt_dir(tmp_path)), "native", str(tmp_path / "hf"), "hf")
    convert_tool = tool("convert_checkpoint")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    args = ["--input", str(tmp_path / "hf"), "--input-format", "hf",
            "--output", str(tmp_path / "out"), "--output-format", "native"]
    assert convert_tool.main(args) == 2 and str(weights) in one_error_line(capsys)
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",')
    assert convert_tool.main(args) == 2 and "config.json is not valid JSON" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def broken_dataset(corpus: Path, prefix: Path, breaks: str) -> str:
    """A copy of the corpus' smallest dataset at `prefix` with its .idx cut short ("idx"), its .bin cut short
    ("bin") or a token id beyond the byte vocabulary ("token"); returns the data.blend override."""
    idx, tokens = (corpus / "networking.idx").read_bytes(), (corpus / "networking.bin").read_bytes()
    cuts = {"idx": (idx[:30], tokens), "bin": (idx, tokens[:-2]), "token": (idx, (9999).to_bytes(2, "little") + tokens[2:])}
    for suffix, data in zip((".idx", ".bin"), cuts[breaks]):
        Path(f"{prefix}{suffix}").write_bytes(data)
    return f"[{{path: {prefix}}}]"


def bad_train_inputs(tmp_path: Path, corpus: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (overrides, what the error line says)"""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("training: {steps: 2}  # caf\xe9".encode("latin-1"))
    return {
        "config is a directory": (["--config", str(tmp_path)], "cannot read config file"),
        "config is not UTF-8": (["--config", str(latin1)], "is not UTF-8 text"),
        "negative seed": (["--training.seed", "-1"], "training.seed must be in [0, 2**32)"),
        "no eval batches": (["--training.eval_iters", "0"], "training.eval_iters must be positive"),
        "nan timeout": (["--parallel.timeout_s", ".nan"], "parallel.timeout_s must be a finite number"),
        "tensorboard under a file": (["--logging.tensorboard_dir", str(a_file / "tb")], "logging.tensorboard_dir"),
        "checkpoint.dir is a file": (["--checkpoint.dir", str(a_file)], "is a file, not a directory"),
        "checkpoint.dir under a file": (["--checkpoint.dir", str(a_file / "ckpt")], "ckpt is not writable"),
        "negative learning rate": (["--optimizer.lr", "-1", "--optimizer.min_lr", "-2"], "optimizer.lr must be >= 0"),
        "beta1 of 1": (["--optimizer.beta1", "1"], "optimizer.beta1 must be in [0, 1)"),
        "negative grad clip": (["--optimizer.grad_clip", "-1"], "optimizer.grad_clip must be >= 0"),
        "nan in the split": (["--data.split", "98,nan,0"], "data.split must be three non-negative weights"),
        "resume a Hugging Face model": (["--checkpoint.resume", str(hf)], "it is a Hugging Face one"),
        "a dataset not there": (["--data.blend", f"[{{path: {tmp_path / 'web'}}}]"], f"{tmp_path / 'web.bin'} not found"),
        "a truncated .idx": (["--data.blend", broken_dataset(corpus, tmp_path / "i", "idx")], f"index {tmp_path / 'i.idx'} is corrupt"),
        "a truncated .bin": (["--data.blend", broken_dataset(corpus, tmp_path / "b", "bin")],
                             f"{tmp_path / 'b.idx'} describes 3137550 bytes but {tmp_path / 'b.bin'} holds 3137548"),
        "a token id beyond the vocabulary": (["--data.blend", broken_dataset(corpus, tmp_path / "t", "token")],
                                             "t.bin holds token id 9999 but the vocabulary has 257 ids"),
    }


def test_bad_training_input_is_one_line_and_writes_nothing(corpus_dir, tmp_path, capsys):
    from conftest import tiny_overrides

    sys.path.insert(0, str(ROOT))
    import train as train_script  # train.py's main, in this process

    for case, (extra, says) in bad_train_inputs(tmp_path, corpus_dir).items():
        before = files_under(tmp_path)
        argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), *tiny_overrides(corpus_dir, tmp_path / "run"), *extra]
        if extra[0] == "--config":  # the later --config wins: drop the tiny one
            argv = argv[2:]
        assert train_script.main(argv) == 2, case
        line = one_error_line(capsys)
        assert says in line, (case, line)
        assert files_under(tmp_path) == before and not ckpt_dir(tmp_path / "run").exists(), case


def test_a_loss_mask_beyond_0_and_1_is_named_as_a_mask(corpus_dir, tmp_path):
    """A .mask.bin holding 2 or more is a broken preprocessing output, not a vocabulary too small."""
    from megatron_llm.data.datasets import check_indexed_dataset

    broken_dataset(corpus_dir, tmp_path / "chat.mask", "token")
    with pytest.raises(UsageError, match=r"chat\.mask\.bin holds 9999 where a loss mask holds only 0 and 1; rerun"):
        check_indexed_dataset(str(tmp_path / "chat.mask"), 2)


def test_a_data_error_found_after_the_lock_is_one_line_and_leaves_no_checkpoint_directory(corpus_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """A .bin over check_config.SCAN_TOKENS_UP_TO has its token ids read only when the datasets are built,
    after checkpoint.dir is locked: the run then removes the directory it made, lock and all."""
    from conftest import tiny_overrides
    from megatron_llm import check_config

    sys.path.insert(0, str(ROOT))
    import train as train_script

    monkeypatch.setattr(check_config, "SCAN_TOKENS_UP_TO", 2**20)  # the corpus' 3 MB .bin counts as big
    blend = broken_dataset(corpus_dir, tmp_path / "t", "token")
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), *tiny_overrides(corpus_dir, tmp_path / "run"), "--data.blend", blend]
    assert train_script.main(argv) == 2
    assert "t.bin holds token id 9999 but the vocabulary has 257 ids" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.idx"]


def test_bad_tool_input_is_one_line_and_a_missing_plot_directory_is_created(tiny_config, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "hello"}) + "\n")
    assert tool("preprocess_data").main(["--input", str(source), "--output-prefix", str(a_file / "out")]) == 2
    assert f"the directory of --output-prefix {a_file} is a file" in one_error_line(capsys)
    for dp in ("0", "-2"):
        assert tool("estimate_memory").main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--dp", dp]) == 2
        assert "--dp must be positive" in one_error_line(capsys)
    assert files_under(tmp_path) == {a_file, source}
    from megatron_llm.data import synthetic_chat

    assert synthetic_chat.main([str(a_file / "post")]) == 2
    assert f"the directory {a_file / 'post'} is not writable" in one_error_line(capsys)
    assert synthetic_chat.main([str(tmp_path / "post"), "--conversations", "5", "--pairs", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "post").iterdir()) == ["chats.jsonl", "pairs.jsonl"]  # no temporary left
    assert len((tmp_path / "post" / "pairs.jsonl").read_text().splitlines()) == 3

    train(tiny_config(tmp_path, training__steps=2))
    picture = tmp_path / "new" / "dir" / "channels.png"
    assert tool("plot_channels").main([str(tmp_path / "tb"), "--output", str(picture)]) == 0 and picture.is_file()


@pytest.mark.parametrize("flag", ["--pairs", "--conversations"])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_synthetic_chat_refuses_a_count_that_would_write_an_empty_file(flag, count, tmp_path, capsys):
    from megatron_llm.data import synthetic_chat

    with pytest.raises(SystemExit) as refused:
        synthetic_chat.main([str(tmp_path / "post"), flag, count])
    assert refused.value.code == 2 and f"{flag} must be a positive number of records, got {count}" in one_error_line(capsys)
    assert not (tmp_path / "post").exists()


@pytest.mark.parametrize("extra, says", [
    (["--data.default_corpus", "false", "--data.blend", "[{path: /nowhere/web}]"], "file /nowhere/web.bin not found"),
    (["--data.tokenizer", "/nowhere/tokenizer.json"], "tokenizer file /nowhere/tokenizer.json not found"),
    (["--checkpoint.resume", "/nowhere/step_0000002"], "/nowhere/step_0000002 is not a native checkpoint"),
])
def test_the_launchers_check_refuses_a_missing_input_once_before_any_worker(extra, says, capsys):
    """launch/torchrun.sh runs check_config first; without it every rank printed the line, then torchrun a traceback."""
    from megatron_llm import check_config

    assert check_config.main(["--world-size", "2", str(ROOT / "configs" / "tiny.yaml"), *extra]) == 2
    assert says in one_error_line(capsys)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> Path:
    """A 2-layer Llama in Hugging Face format on the byte vocabulary, with a 64-token context."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("small_hf")
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def bad_tool_inputs(model: str, here: Path, corpus: Path) -> dict[str, tuple[str, list[str], str]]:
    """case -> (tool, argv, what the error line says); `here` holds a_file and prompts.jsonl."""
    a_file, prompts, blend = here / "a_file", str(here / "prompts.jsonl"), f"[{{path: {corpus / 'text'}}}]"
    gen, infer = ["--model", model, "--prompt", "def "], ["--model", model, "--data", prompts]
    convert = ["--input", model, "--input-format", "hf", "--output-format", "native"]

    def infer_on(data: str) -> list[str]:
        return ["--model", model, "--data", str(here / data), "--output", str(here / "r.jsonl")]

    return {
        "generate: not a device name": ("generate", [*gen, "--device", "cpu0"], "device 'cpu0' is not a device name"),
        "generate: nan temperature": ("generate", [*gen, "--temperature", "nan"], "temperature must be a finite number"),
        "generate: not a number": ("generate", [*gen, "--max-new-tokens", "ten"], "--max-new-tokens: invalid int value"),
        "inspect_model: empty text": ("inspect_model", ["--model", model, "--text", "", "--output", str(here / "i.png")],
                                      "the text has 0 tokens"),
        "inspect_model: no such format": ("inspect_model", ["--model", model, "--text", "a", "--output",
                                                            str(here / "i.xyz")], "no picture format 'xyz'"),
        "plot_channels: --output a directory": ("plot_channels", [str(here), "--output", str(here)], "is a directory"),
        "infer: --output the prompt file": ("infer", [*infer, "--output", prompts], "is the prompt file --data"),
        "infer: --output under a file": ("infer", [*infer, "--output", str(a_file / "r.jsonl")], "the directory of --output"),
        "infer: --batch-size 0": ("infer", [*infer, "--output", str(here / "r.jsonl"), "--batch-size", "0"],
                                  "batch_size must be positive"),
        "infer: an empty prompt file": ("infer", infer_on("empty.jsonl"), "holds no prompts"),
        "infer: not UTF-8": ("infer", infer_on("latin1.jsonl"), "latin1.jsonl:1 is not UTF-8"),
        "infer: a number as the prompt": ("infer", infer_on("number.jsonl"), "number.jsonl:1 has no 'prompt'"),
        "infer: ids outside the vocabulary": ("infer", infer_on("ids.jsonl"), "outside the model's vocabulary of 257"),
        "infer: a device not here": ("infer", [*infer, "--output", str(here / "r.jsonl"), "--devices", "cuda:99"],
                                     "device cuda:99 is not on this machine"),
        "evaluate: not a split": ("evaluate", ["--checkpoint", model, "--data", blend, "--split", "a,b"],
                                  "--split must be three"),
        "evaluate: --tensorboard under a file": ("evaluate", ["--checkpoint", model, "--data", blend, "--tensorboard",
                                                              str(a_file / "tb")], "--tensorboard"),
        "preprocess_data: --workers 0": ("preprocess_data", ["--input", prompts, "--output-prefix", str(here / "out"),
                                                             "--workers", "0"], "--workers must be positive"),
        "preprocess_data: --output-prefix a directory": ("preprocess_data", ["--input", prompts, "--output-prefix",
                                                                             str(here)], "is a directory: give a name prefix"),
        "convert_checkpoint: Hugging Face as native": ("convert_checkpoint", [
            "--input", model, "--input-format", "native", "--output", str(here / "out"), "--output-format", "hf"],
            "it is a Hugging Face one: give its format, or start a run from it"),
        "convert_checkpoint: --tp 0": ("convert_checkpoint", [*convert, "--output", str(here / "out"), "--tp", "0"],
                                       "--tp must be a positive number"),
        "convert_checkpoint: --output under a file": ("convert_checkpoint", [*convert, "--output", str(a_file / "out")],
                                                      "the directory of --output"),
        "convert_checkpoint: a size of 0": ("convert_checkpoint", [*convert, "--output", str(here / "out"),
                                                                  "--max-shard-size", "0B"], "--max-shard-size: '0B'"),
        "benchmark: no such reference": ("benchmark", ["--config", "configs/tiny.yaml", "--reference", "nope"],
                                         "argument --reference: invalid choice: 'nope'"),
    }


@pytest.mark.parametrize("case", list(bad_tool_inputs("m", Path("h"), Path("c"))))
def test_bad_tool_input_is_refused_in_one_line_before_any_work(case, small_hf, corpus_dir, tmp_path, capfd):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "def ", "text": "def "}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "number.jsonl").write_text('{"prompt": 5}\n')
    (tmp_path / "ids.jsonl").write_text('{"prompt": [1, 99999]}\n')
    name, argv, says = bad_tool_inputs(str(small_hf), tmp_path, corpus_dir)[case]
    before = {p: p.read_bytes() for p in files_under(tmp_path)}
    try:
        status = tool(name).main(argv)
    except SystemExit as e:  # the command-line parser's refusal
        status = e.code
    assert status == 2 and says in one_error_line(capfd), case
    assert {p: p.read_bytes() for p in files_under(tmp_path)} == before, case


def test_a_broken_config_yaml_or_megatron_file_is_named_in_one_line(small_hf, tmp_path, capsys):
    for fmt in ("native", "megatron"):
        convert(str(small_hf), "hf", str(tmp_path / fmt), fmt)
    (tmp_path / "native" / "config.yaml").write_text("model: [\n")  # YAML's error message spans four lines
    (shard,) = (tmp_path / "megatron").rglob("*.pt")
    shard.write_bytes(shard.read_bytes()[:1000])  # torch's message goes on about its zip reader
    generate = tool("generate")
    for model, says in ((tmp_path / "native", "config.yaml (while parsing a flow node)"),
                        (shard.parents[2], f"{shard} as a torch checkpoint (PytorchStreamReader failed reading zip "
                                           "archive: failed finding central directory): it is truncated or not one")):
        assert generate.main(["--model", str(model), "--prompt", "a"]) == 2
        assert says in one_error_line(capsys), model


def test_an_overwrite_stopped_while_the_old_output_is_deleted_leaves_the_new_one_whole(small_hf, tmp_path, monkeypatch):
    from megatron_llm.checkpoint import stream
    from megatron_llm.checkpoint.convert import Options

    out = tmp_path / "out"
    convert(str(small_hf), "hf", str(out), "native")
    names = sorted(p.name for p in out.iterdir())
    real_rmtree = stream.shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        if not Path(path).exists():
            return real_rmtree(path, ignore_errors=ignore_errors)
        next(Path(path).glob("*.distcp")).unlink()  # the deletion has begun...
        raise KeyboardInterrupt  # ...when the process is stopped

    monkeypatch.setattr(stream.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        convert(str(small_hf), "hf", str(out), "native", Options(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == names
    assert finite(megatron_llm.load_model(str(out)))


def test_a_killed_converts_temporaries_are_removed_and_a_running_ones_kept(small_hf, tmp_path, capsys):
    """A convert killed with SIGKILL leaves `.tmp-NAME-HOST-PID` beside its output; the next convert to that
    output removes it, or puts back the old output it had moved aside, but keeps a running convert's."""
    from megatron_llm.checkpoint.convert import Options

    dead, alive = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "60"])
    dead.wait()
    out, host = tmp_path / "out", socket.gethostname()
    left, running, elsewhere, another_output = (tmp_path / f".tmp-{name}" for name in (
        f"out-{host}-{dead.pid}", f"out-{host}-{alive.pid}", f"out-elsewhere-{dead.pid}", f"out2-{host}-{dead.pid}"))
    for path in (left, running, elsewhere, another_output):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 100)
    try:
        convert(str(small_hf), "hf", str(out), "native")
        assert f"removed {left}, left unfinished by a killed process ({dead.pid})" in capsys.readouterr().out
        assert sorted(tmp_path.iterdir()) == sorted([out, running, elsewhere, another_output])

        names = sorted(p.name for p in out.iterdir())
        aside = tmp_path / f".tmp-out-{host}-{dead.pid}-replaced"  # killed between its two renames
        os.replace(out, aside)
        left.mkdir()
        with pytest.raises(UsageError, match="already exists"):  # the old output is back, and not overwritten
            convert(str(small_hf), "hf", str(out), "native", Options())
    finally:
        alive.kill()
        alive.wait()
    said = capsys.readouterr().out
    assert f"restored {out}, which a killed process ({dead.pid}) was replacing" in said and f"removed {left}" in said
    assert sorted(p.name for p in out.iterdir()) == names and not aside.exists() and not left.exists()


def test_small_files_are_written_through_a_temporary_of_their_own(tmp_path, capsys):
    """write_atomically (checkpoints' `latest`, infer's and synthetic_chat's outputs) writes through
    `.tmp-NAME-HOST-PID`: two writers of one file never share a temporary, and a killed writer's is removed
    by the next write while a running one's is kept."""
    from megatron_llm.paths import write_atomically

    dead, alive = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "60"])
    dead.wait()
    host = socket.gethostname()
    left, running = (tmp_path / f".tmp-latest-{host}-{pid}" for pid in (dead.pid, alive.pid))
    for path in (left, running):
        path.write_text("half a name")
    try:
        write_atomically(tmp_path / "latest", "step_0000004\n")
    finally:
        alive.kill()
        alive.wait()
    assert (tmp_path / "latest").read_text() == "step_0000004\n"
    assert f"removed {left}, left unfinished by a killed process ({dead.pid})" in capsys.readouterr().out
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "latest", running])


def test_a_picture_that_fails_to_save_leaves_the_one_before_whole(tmp_path):
    """plot_channels, plot_experts and inspect_model save through save_figure: a write that breaks off
    half-way (a full disk) leaves the earlier picture as it was and no temporary file beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = tmp_path / "channels.png"
    picture.write_bytes(b"the picture before")
    fig = plt.figure()

    def half_written(path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    fig.savefig = half_written
    with pytest.raises(OSError, match="No space left"):
        tool("plot_channels").save_figure(fig, str(picture))
    assert picture.read_bytes() == b"the picture before" and sorted(tmp_path.iterdir()) == [picture]


# ---------------------------------------------------------------------------------------------------
# 8. A stop signal during start-up asks for a requeue, like one during training


def handles(pid: int, sig: signal.Signals) -> bool:
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_start_up_exits_75(sig, corpus_dir, tmp_path):
    from conftest import tiny_overrides

    args = [sys.executable, "train.py", "--config", "configs/tiny.yaml", *tiny_overrides(corpus_dir, tmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # As soon as train.py's handler is in place (it is importing torch then), or at the latest after 1.5 s,
    # well inside the imports (before the fix, a signal there killed the process: -15, shell status 143).
    deadline = time.monotonic() + 1.5
    while not handles(proc.pid, sig) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
