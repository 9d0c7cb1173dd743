"""tools/benchmark.py end to end on a tiny shape: both models must compute the same first step."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import benchmark  # noqa: E402

SHAPE = [
    "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4", "--model.num_kv_heads", "2",
    "--model.ffn_hidden_size", "96", "--model.max_seq_len", "32", "--data.seq_len", "32",
    "--training.micro_batch_size", "2", "--training.grad_accum_steps", "2",
]


def first_step(out: str, what: str) -> tuple[float, float]:
    match = re.search(rf"first-step {what}: +ours (\S+) +HF (\S+)", out)
    assert match, out
    return float(match.group(1)), float(match.group(2))


def test_benchmark_compares_the_same_step(capsys):
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "2", "--warmup", "1", "--device", "cpu"]
    assert benchmark.main(argv + SHAPE) == 0
    out = capsys.readouterr().out
    ours, hf = first_step(out, "loss")
    assert ours == pytest.approx(hf, abs=1e-5)
    ours, hf = first_step(out, "grad norm")
    assert ours == pytest.approx(hf, rel=1e-5)
    assert re.search(r"tokens/s +\d+ +\d+ +\d+\.\d+", out), out
