"""A checkpoint written before the architecture menu existed (its config.yaml lists only the old model keys)
still resumes and loads: the new fields take defaults that reproduce the old model."""

import yaml

import megatron_llm
from megatron_llm.training.trainer import train

# The model keys a checkpoint's config.yaml had before the menu (round 1).
ROUND1_MODEL_KEYS = {
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size", "mlp",
    "norm", "norm_eps", "max_seq_len", "rope_theta", "rope_scaling", "qk_norm", "qkv_bias", "linear_bias",
    "tie_embeddings", "logit_softcap", "init_std", "scaled_init",
}


def test_round1_checkpoint_resumes_and_loads(tiny_config, tmp_path):
    first = train(tiny_config(tmp_path, training__steps=4, training__eval_interval=0, model__linear_bias=True))
    step = tmp_path / "ckpt" / "step_0000004"
    config_file = step / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["model"] = {k: v for k, v in config["model"].items() if k in ROUND1_MODEL_KEYS}
    config_file.write_text(yaml.safe_dump(config))

    model = megatron_llm.load_model(str(step))  # the converter's reader fills the defaults too
    assert model.layers["0"].attention.wo.bias is not None and model.layers["0"].feed_forward.w2.bias is not None

    resumed = train(tiny_config(tmp_path, training__steps=6, training__eval_interval=0, model__linear_bias=True,
                                checkpoint__resume="auto"))
    assert sorted(resumed.losses) == [4, 5] and set(first.losses) == {0, 1, 2, 3}
