"""Config: YAML + dotted overrides into typed dataclasses; bad input is one line and exit code 2."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llm.config import SECTIONS, Config, UsageError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_overrides_beat_the_file_and_keep_types():
    cfg = load_config(TINY, ["--training.steps", "50", "--parallel.tp=2", "--optimizer.lr", "1e-3", "--parallel.sp", "true"])
    assert (cfg.training.steps, cfg.parallel.tp, cfg.optimizer.lr, cfg.parallel.sp) == (50, 2, 1e-3, True)
    assert isinstance(cfg.optimizer.lr, float)
    assert cfg.model.hidden_size == 256  # from the file
    assert cfg.model.head_dim == 32 and cfg.model.num_kv_heads == 4  # derived


def test_blend_override_parses_yaml():
    cfg = load_config(TINY, ["--data.blend", "[{path: a/x, weight: 2}, {path: b/y, name: why}]"])
    assert [(d.path, d.weight, d.name) for d in cfg.data.blend] == [("a/x", 2.0, None), ("b/y", 1.0, "why")]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.stepz", "3"], "unknown key training.stepz"),
        (["--nosuch.key", "3"], "unknown section"),
        (["--training.steps", "ten"], "training.steps: expected int"),
        (["--model.mlp", "tanh"], "model.mlp: 'tanh' is not one of"),
        (["--model.num_kv_heads", "3"], "model.num_heads (8) is not divisible by model.num_kv_heads (3)"),
        (["--model.hidden_size", "100"], "model.hidden_size (100) is not divisible by model.num_heads (8)"),
        (["--data.seq_len", "1024"], "data.seq_len (1024) exceeds model.max_seq_len"),
        (["--optimizer.min_lr", "1.0"], "optimizer.min_lr"),
        (["--data.split", "1,2"], "data.split"),
        (["--model.qk_norm_after_rope", "true"], "model.qk_norm_after_rope moves the per-head norm: set model.qk_norm"),
        (["--model.mlp", "xielu", "--model.moe_experts", "4"], "model.mlp xielu learns scalars per MLP"),
        (["--model.moe_post_norm", "true", "--model.norm_placement", "sandwich"], "model.moe_post_norm adds a norm after"),
        (["--model.attention_gate_bias", "true"], "model.attention_gate_bias is the bias of the output gate"),
        (["--model.rope_local_fraction", "1.0"], "model.rope_local_fraction (1.0) must be in (0, 1] and is the sliding"),
        (["--model.moe_experts", "4", "--model.moe_expert_bias_on", "logits"],
         "model.moe_expert_bias_on says where the expert bias goes: set model.moe_expert_bias"),
        (["--model.moe_experts", "4", "--model.moe_router_softcap", "0"], "model.moe_router_softcap must be a positive"),
    ],
)
def test_bad_input_names_the_key(overrides, message):
    with pytest.raises(UsageError, match=None) as info:
        load_config(TINY, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_key_is_one_line_exit_2():
    out = run_train("--config", TINY, "--model.num_kv_heads", "3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "model.num_kv_heads" in out.stderr


def test_help_lists_every_key_with_type_and_default():
    out = run_train("--help")
    assert out.returncode == 0
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{name}.{f.name} (" in out.stdout
    assert "--training.steps (int, default 200)" in out.stdout


@pytest.mark.parametrize("name", ["tiny", "llama3.2_1b", "llama3_8b", "llama2_7b"])
def test_shipped_configs_load(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "name, params", [("llama3.2_1b", 1_235_814_400), ("llama3_8b", 8_030_261_248), ("llama2_7b", 6_738_415_616)]
)
def test_real_size_configs_have_the_published_parameter_counts(name, params):
    # Published counts of Meta's released checkpoints (their safetensors totals).
    assert load_config(str(ROOT / "configs" / f"{name}.yaml")).model.num_params() == params
