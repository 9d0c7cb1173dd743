"""Fine-tuning a downloaded model without writing its architecture: `--checkpoint.init_from` takes the model
section from the checkpoint, starts at step 0 with transformers' loss on the first batch, and refuses a
--model override that contradicts the checkpoint."""

import pytest
import torch
import transformers

from conftest import ROOT, tiny_overrides, transformers_first_loss
from megatron_llm.config import load_config
from megatron_llm.errors import UsageError

# A Gemma2 (sandwich norms, soft-caps, a sliding layer, GeGLU) that reads the byte tokenizer's corpus.
GEMMA2 = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
              attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0)


@pytest.fixture
def gemma2_dir(tmp_path):
    config = transformers.Gemma2Config(**GEMMA2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "gemma2")
    return tmp_path / "gemma2", model


def test_init_from_hugging_face_starts_at_the_transformers_loss(corpus_dir, tmp_path, gemma2_dir):
    from megatron_llm.training.trainer import train

    path, hf = gemma2_dir
    # The YAML's model (LLaMA-shaped, 4 layers) is replaced by the checkpoint's.
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(
        corpus_dir, tmp_path / "run", training__steps=1, training__eval_interval=0, checkpoint__init_from=str(path)))
    assert (cfg.model.norm_placement, cfg.model.attn_softcap, cfg.model.num_layers) == ("sandwich", 5.0, 2)
    first_loss = train(cfg).losses[0]

    expected, _ = transformers_first_loss(hf, cfg)
    assert first_loss == pytest.approx(expected, abs=1e-5)


def test_init_from_refuses_a_contradicting_model_override(corpus_dir, tmp_path, gemma2_dir):
    path, _ = gemma2_dir
    overrides = tiny_overrides(corpus_dir, tmp_path / "run", checkpoint__init_from=str(path))
    # tiny_overrides sets model.* values this checkpoint agrees with; num_heads 8 is not one of them.
    with pytest.raises(UsageError, match="--model.num_heads 8 contradicts checkpoint.init_from"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), overrides + ["--model.num_heads", "8"])
