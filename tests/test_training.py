"""The training loop on one process: resume is exact, accumulation is exact, bad steps are skipped."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import megatron_llm
from megatron_llm.checkpoint import native
from megatron_llm.errors import UsageError
from megatron_llm.logging.runs import find_run
from megatron_llm.parallel import ParallelDims, parallelize
from megatron_llm.training import step as step_module
from megatron_llm.training.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ParallelDims(world_size=1, rank=0, tp=1, pp=1, dp=1)


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(find_run(str(tb_dir))))  # the run's own directory under tensorboard_dir
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_trains_logs_and_resumes_bit_for_bit(tiny_config, tmp_path):
    full = train(tiny_config(tmp_path / "a", training__steps=8))
    assert sorted(full.losses) == list(range(8))
    assert full.losses[7] < full.losses[0] - 0.3  # it learns

    # TensorBoard holds the interval means of exactly these losses (one token count per step here).
    logged = scalars(tmp_path / "a" / "tb", "loss")
    assert sorted(logged) == [2, 4, 6, 8]
    for step, value in logged.items():
        assert value == pytest.approx((full.losses[step - 2] + full.losses[step - 1]) / 2, rel=1e-6)
    assert set(scalars(tmp_path / "a" / "tb", "val_loss")) == {4, 8}

    # Resume from the step-4 checkpoint in a fresh directory: steps 4..7 repeat bit for bit.
    step4 = tmp_path / "a" / "ckpt" / "step_0000004"
    resumed = train(tiny_config(tmp_path / "b", training__steps=8, checkpoint__resume=str(step4)))
    assert sorted(resumed.losses) == [4, 5, 6, 7]
    assert all(resumed.losses[s] == full.losses[s] for s in range(4, 8))  # bitwise equal floats

    # `auto` picks up `latest` (step 8 here): nothing left to run.
    again = train(tiny_config(tmp_path / "b", training__steps=8, checkpoint__resume="auto"))
    assert again.losses == {} and again.final_step == 8


def test_gradient_accumulation_equals_one_big_batch(tiny_config, tmp_path):
    big = train(tiny_config(tmp_path / "big", training__steps=3, training__micro_batch_size=8))
    accumulated = train(
        tiny_config(tmp_path / "acc", training__steps=3, training__micro_batch_size=2, training__grad_accum_steps=4)
    )
    for step in range(3):
        assert accumulated.losses[step] == pytest.approx(big.losses[step], rel=1e-5)
    a, b = megatron_llm.load_model(str(tmp_path / "big" / "ckpt")), megatron_llm.load_model(str(tmp_path / "acc" / "ckpt"))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_recomputes_each_block_and_changes_nothing(tiny_config):
    cfg = tiny_config()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, dims=1)

    def step(recompute: bool):
        model = parallelize(cfg.model, SINGLE, cfg.parallel, device=torch.device("cpu"), seed=0, compile=False,
                            micro_batches=1, recompute=recompute)
        attention_calls = []
        model.layers["0"].attention.register_forward_hook(lambda *_: attention_calls.append(1))
        saved = []  # elements autograd keeps for the backward, outside the recomputed blocks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(tokens, labels=labels).mean()
        loss.backward()
        return loss, [p.grad for p in model.parameters()], len(attention_calls), sum(saved)

    loss, grads, calls, saved = step(recompute=False)
    loss_r, grads_r, calls_r, saved_r = step(recompute=True)
    assert (calls, calls_r) == (1, 2)  # forward, then once more in the backward
    assert saved_r < saved / 2
    assert torch.equal(loss, loss_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r))


def test_activation_checkpointing_compiles(tiny_config):
    """torch.compile traces the recomputed blocks (a wrapper it cannot trace would silently run eager)."""
    from torch._dynamo.utils import counters

    cfg = tiny_config()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for compile in (True, False):
        model = parallelize(cfg.model, SINGLE, cfg.parallel, device=torch.device("cpu"), seed=0, compile=compile,
                            micro_batches=1, recompute=True)
        loss = model(tokens, labels=tokens.roll(-1, dims=1)).mean()
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] >= 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_nan_steps_are_skipped_then_the_run_stops(tiny_config, tmp_path, monkeypatch):
    real_loss = step_module.micro_batch_loss
    calls = {"n": 0}

    def poisoned(logits, *args):
        calls["n"] += 1
        loss, token_ce = real_loss(logits, *args)
        # Step 2 alone is bad (skipped, training continues); from step 5 every step is bad.
        if calls["n"] == 3 or calls["n"] >= 6:
            loss = loss * float("nan")
        return loss, token_ce

    monkeypatch.setattr(step_module, "micro_batch_loss", poisoned)
    cfg = tiny_config(tmp_path, training__steps=20, training__max_bad_steps=3, checkpoint__interval=2, training__eval_interval=0)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(cfg)
    latest = native.Checkpointer(cfg.checkpoint.dir, keep=0, is_writer=False).latest()
    assert latest.name == "step_0000004"  # the last save before the streak: none is written during one
    model = megatron_llm.load_model(str(latest))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_save_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, training__steps=4, checkpoint__interval=2)
    real_save = dcp.save

    def failing_save(state, checkpoint_id):
        if Path(checkpoint_id).name.endswith("0000004"):
            real_save(state, checkpoint_id=checkpoint_id)  # half the work is on disk...
            raise OSError(28, "No space left on device")  # ...when the disk fills
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(UsageError, match="No space left on device.*previous checkpoint is intact"):
        train(cfg)
    ckpt = Path(cfg.checkpoint.dir)
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "latest", "step_0000002"]
    megatron_llm.load_model(str(ckpt))


def test_load_model_gives_the_trained_logits(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, training__steps=2)
    train(cfg)
    model = megatron_llm.load_model(cfg.checkpoint.dir)
    tokens = torch.randint(0, 257, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 257) and not model.training
    # The same weights in a freshly built model reproduce the logits.
    from megatron_llm.model import build_model

    other = build_model(cfg.model, torch.device("cpu"))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(tokens), logits, rtol=0, atol=0)


def test_cli_runs_end_to_end_and_refuses_bad_data(corpus_dir, tmp_path):
    from conftest import tiny_overrides

    args = [sys.executable, "train.py", "--config", "configs/tiny.yaml", *tiny_overrides(corpus_dir, tmp_path)]
    out = subprocess.run(args + ["--training.steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step 2/2 | loss" in out.stdout and "tokens_per_s" in out.stdout and "| eta " in out.stdout

    bad = subprocess.run(
        args + ["--data.blend", f"[{{path: {tmp_path / 'missing'}}}]", "--checkpoint.dir", str(tmp_path / "other")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert str(tmp_path / "missing") in bad.stderr and bad.stderr.strip().count("\n") == 0
