"""trans_X_to_Y: `tools/convert_checkpoint.py --output-family` rewrites a Hugging Face checkpoint as another
family when that family can express it; transformers loads the result and its logits equal the source's.
Refusals name the blocking field and write nothing."""

import subprocess
import sys

import pytest
import torch
import transformers

from conftest import ROOT, perturb_norms_and_biases
from megatron_llm.checkpoint.convert import Options
from megatron_llm.checkpoint.convert import convert as convert_in_process

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def saved(tmp_path, model_type: str, **extra):
    config = transformers.AutoConfig.for_model(model_type, **SMALL, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb_norms_and_biases(model)
    model.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type, model


def convert_command(src, dst, family):
    """The command line a user types (one process each: a few seconds of imports, so only for refusals)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(src), "--input-format", "hf",
         "--output", str(dst), "--output-format", "hf", "--output-family", family],
        capture_output=True, text=True,
    )


@pytest.mark.parametrize("source,extra,target", [
    ("qwen2", {}, "llama"),  # q/k/v biases -> llama's attention_bias, with a zero o_proj bias
    ("llama", {}, "qwen2"),  # zero q/k/v biases
    ("mistral", dict(sliding_window=None), "llama"),
    ("llama", {}, "mistral"),
])
def test_rewritten_family_gives_the_same_logits(tmp_path, source, extra, target):
    src, model = saved(tmp_path, source, **extra)
    convert_in_process(str(src), "hf", str(tmp_path / "out"), "hf", Options(hf_family=target))
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert out.config.model_type == target
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source,extra,target,field", [
    ("mistral", dict(sliding_window=8), "llama", "sliding_window"),
    ("qwen3", {}, "llama", "qk_norm"),
    ("gemma", dict(head_dim=16), "llama", "norm_unit_offset|embedding_multiplier|mlp"),
])
def test_refusal_names_the_field_and_writes_nothing(tmp_path, source, extra, target, field):
    src, _ = saved(tmp_path, source, **extra)
    result = convert_command(src, tmp_path / "out", target)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert any(f"model.{name}=" in result.stderr for name in field.split("|")), result.stderr
    assert not (tmp_path / "out").exists()
