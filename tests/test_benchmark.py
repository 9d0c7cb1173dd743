"""tools/benchmark.py end to end on a tiny shape: against Hugging Face both models must compute the
same first step; under torchrun the layout report has every rank's memory and pipeline bubble."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import benchmark  # noqa: E402
from conftest import free_port  # noqa: E402

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


def test_layout_reports_speed_memory_and_bubble_per_rank(tmp_path):
    """Two torchrun ranks at pp=2: both speeds, every rank's memory and bubble, and the theory line."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "tools" / "benchmark.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--parallel.pp", "2", "--parallel.schedule", "gpipe",
        *SHAPE,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"tokens/s +\d+ +\d+ +\d+\.\d+", text), text
    rows = re.findall(r"^ +(\d) +(\d) +0 +0 +(\d+\.\d) +(\d+\.\d)%$", text, re.M)
    assert [(r[0], r[1]) for r in rows] == [("0", "0"), ("1", "1")], text  # rank, pp rank
    assert all(float(r[2]) > 0 and 0 <= float(r[3]) < 100 for r in rows), text
    # gpipe, pp=2, m=2: (2 - 1) / (2 + 2 - 1)
    assert re.search(r"pipeline bubble: measured \d+\.\d% .* = 33\.3% with pp=2, m=2, v=1", text), text


def test_hf_reference_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert benchmark.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--reference", "hf"]) == 2
    assert "--reference hf runs in one process" in capsys.readouterr().err


def test_mixtral_benchmark_compares_the_same_step_aux_loss_included(capsys):
    """transformers' MixtralForCausalLM (8 experts, top-2, its router_aux_loss_coef) from our weights: the same
    first step, the load-balancing loss in both gradients."""
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "1", "--warmup", "0", "--device", "cpu",
            "--family", "mixtral"]
    assert benchmark.main(argv + SHAPE) == 0
    out = capsys.readouterr().out
    assert first_step(out, "loss")[0] == pytest.approx(first_step(out, "loss")[1], abs=1e-5)
    assert first_step(out, "grad norm")[0] == pytest.approx(first_step(out, "grad norm")[1], rel=1e-5)


def test_dense_reference_times_the_moe_against_its_active_flops(capsys):
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "2", "--warmup", "0", "--device", "cpu",
            "--reference", "dense", "--model.moe_experts", "4", "--model.moe_ffn_hidden_size", "32",
            "--model.moe_shared_ffn_hidden_size", "16"]
    assert benchmark.main(argv + SHAPE) == 0
    out = capsys.readouterr().out
    assert "dense twin" in out and "(ffn 80)" in out, out  # 2 routed experts x 32 + the shared 16
    assert re.search(r"tokens/s +\d+ +\d+ +\d+\.\d+", out) and "MoE overhead over the dense model" in out, out
    update = re.search(r"AdamW update \(CPU time\): MoE (\S+), dense (\S+) ms/step", out)
    assert update and float(update[1]) > 0 and float(update[2]) > 0, out
    slots = re.search(r"slots forward and backward: MoE (\S+) ms \(its routed experts (\S+), the rest (\S+)\), dense"
                      r" MLPs (\S+) ms", out)
    step_ms = re.search(r"ms/step +(\S+) +(\S+)", out)
    assert slots and 0 < float(slots[2]) < float(slots[1]) < float(step_ms[1]), out  # clocked inside the steps
    assert 0 < float(slots[4]) < float(step_ms[2]), out
    assert re.search(r"experts alone \(no routing; a micro-batch's \d+ rows, \d+ per expert\) \(CPU time\): [\d.]+ ms", out), out
    assert benchmark.main(argv[:-6] + SHAPE) == 2  # a dense config has no dense twin
    assert "set model.moe_experts" in capsys.readouterr().err


def test_a_family_benchmark_keeps_the_configs_experts():
    """--family on a MoE config keeps its experts' count, width, top-k and groups: DeepSeek-V3's defaults (256
    experts of 2048 in 8 groups) would not fit the machine at mixtral_tiny's hidden size, or not route at 8."""
    from megatron_llm.config import load_config

    cfg = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"))
    benchmark.family_model(cfg, "deepseek_v3")
    m = cfg.model
    assert (m.attention, m.moe_score, m.moe_shared_ffn_hidden_size) == ("mla", "sigmoid", 1024)  # the family's
    assert (m.moe_experts, m.moe_ffn_hidden_size, m.moe_top_k, m.moe_groups) == (8, 1024, 2, 1)  # the config's
    for model_type in ("qwen3_moe", "olmoe"):  # tables that derive the count (transformers' defaults: 128, 64)
        cfg = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"))
        benchmark.family_model(cfg, model_type)
        assert (cfg.model.moe_experts, cfg.model.moe_ffn_hidden_size) == (8, 1024), model_type
