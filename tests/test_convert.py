"""Checkpoint conversion against references we did not write: transformers models (tensors, logits and
loss) and megatron-core's GPTModel (strict loading, and its own forward at tp=pp=1). No downloads: tiny
random models are built from transformers config objects in temporary directories."""

import argparse
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import megatron_llm
from conftest import transformers_first_loss
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.hf import hf_config_from_model_config, model_config_from_hf
from megatron_llm.checkpoint.megatron import Layout, megatron_args, model_config_from_args
from megatron_llm.checkpoint.megatron_io import safe_load
from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

# megatron-core's constructors and imports warn about deprecations and CUDA-graph defaults we do not use.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning")]
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 101  # not a multiple of 128: the Megatron vocabulary padding is exercised
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)  # GQA: 4 kv heads < 8 heads
FAMILIES = {
    "llama": ("Llama", {}),
    "llama-bias": ("Llama", dict(attention_bias=True, mlp_bias=True)),  # every Megatron bias, o_proj's included
    "mistral": ("Mistral", dict(sliding_window=None)),
    "qwen2": ("Qwen2", {}),  # q/k/v bias
    "qwen3": ("Qwen3", dict(head_dim=24, tie_word_embeddings=True)),  # QK-norm, tied, head_dim != hidden/heads
    "llama3.2": ("Llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={  # Megatron's fixed bands
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
}
# Megatron's rotary_percent and rotary_interleaved, checked against megatron-core alone (test_families.py round-trips
# them at tp 2 x pp 2): half of each head rotated, in halves (LayerNorm with biases) or in interleaved pairs; YaRN.
ROPE_FAMILIES = {
    "stablelm": ("StableLm", dict(use_qkv_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                      "partial_rotary_factor": 0.5})),
    "glm": ("Glm", dict(head_dim=8, pad_token_id=0)),
    # YaRN (truncate by default) on grouped-query attention, megatron-core's position_embedding_type yarn; sliding
    # windows on the last two layers (window_attn_skip_freq as a list)
    "qwen3-yarn": ("Qwen3", dict(head_dim=24, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 16})),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
TOKENIZER = '{"version": "1.0", "model": {"type": "BPE"}}'  # carried through, never parsed


def random_hf_model(prefix: str, seed: int = 0, **config) -> torch.nn.Module:
    hf_config = getattr(transformers, f"{prefix}Config")(**config, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(hf_config).eval()
    with torch.no_grad():  # noise on every tensor: HF initialises biases to 0 and norms to 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict:
    """family -> (saved directory, the transformers model)."""
    out = {}
    for name, (prefix, extra) in {**FAMILIES, **ROPE_FAMILIES}.items():
        model = random_hf_model(prefix, **SMALL, **extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        (path / "tokenizer.json").write_text(TOKENIZER)
        out[name] = (path, model)
    return out


def hf_tensors(path: Path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def megatron_shards(path: Path) -> dict:
    """shard directory name -> the file's dict, for every shard of a Megatron checkpoint."""
    return {f.parent.name: safe_load(f) for f in sorted((path / "release").glob("mp_rank_*/model_optim_rng.pt"))}


def load_to_memory(path: Path) -> dict:
    """A shard to edit and save again: read into memory, not memory-mapped (rewriting a mapped file
    under its own mapping would fault)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------
# Round trips are bit-exact.


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dirs, tmp_path, family, layout):
    src, _ = hf_dirs[family]
    tp, pp = layout
    convert(str(src), "hf", str(tmp_path / "mg"), "megatron", Options(tp=tp, pp=pp))
    assert len(megatron_shards(tmp_path / "mg")) == tp * pp
    # A small shard limit: the way back writes several safetensors files and an index.
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "hf"), "hf", Options(max_shard_bytes=200_000))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    back = transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    assert model_config_from_hf(back) == model_config_from_hf(transformers.AutoConfig.from_pretrained(src).to_dict())
    assert back["model_type"] == transformers.AutoConfig.from_pretrained(src).model_type
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == TOKENIZER


def test_megatron_reshard_round_trip_is_bit_exact(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama-bias"]
    convert(str(src), "hf", str(tmp_path / "a"), "megatron", Options(tp=4, pp=2))
    convert(str(tmp_path / "a"), "megatron", str(tmp_path / "b"), "megatron", Options(tp=2, pp=1))
    convert(str(tmp_path / "b"), "megatron", str(tmp_path / "c"), "megatron", Options(tp=4, pp=2))
    a, b, c = (megatron_shards(tmp_path / x) for x in "abc")
    assert sorted(b) == ["mp_rank_00", "mp_rank_01"] and len(a) == 8
    assert a.keys() == c.keys()
    for shard in a:
        assert_same_tensors(a[shard]["model"], c[shard]["model"])
        assert vars(a[shard]["args"]) == vars(c[shard]["args"])
    assert b["mp_rank_00"]["args"].padded_vocab_size == 256 and a["mp_rank_00_000"]["args"].padded_vocab_size == 512


def test_native_round_trips_and_reshard_is_a_copy(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen3"]
    convert(str(src), "hf", str(tmp_path / "n1"), "native")
    convert(str(tmp_path / "n1"), "native", str(tmp_path / "n2"), "native", Options(tp=2, pp=2))
    convert(str(tmp_path / "n2"), "native", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2))
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "n3"), "native")
    convert(str(tmp_path / "n3"), "native", str(tmp_path / "hf"), "hf")
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_reads_a_checkpoint_as_megatron_lm_saves_it(hf_dirs, tmp_path):
    """An iteration directory, optimizer and RNG state (numpy's included), a megatron-core enum in args,
    no _extra_state entries (older megatron-core): read as well as our own release checkpoints."""
    import random

    import numpy as np
    from megatron.core.transformer.enums import AttnBackend

    src, _ = hf_dirs["qwen2"]
    convert(str(src), "hf", str(tmp_path / "ours"), "megatron", Options(tp=2, pp=2))
    lm = tmp_path / "megatron-lm"
    for path in sorted((tmp_path / "ours" / "release").glob("*/model_optim_rng.pt")):
        state = load_to_memory(path)
        state["args"].attention_backend = AttnBackend.auto
        model = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
        state.update(
            iteration=100, model=model, num_floating_point_operations_so_far=1e15,
            optimizer={"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}},
            opt_param_scheduler={"num_steps": 100}, rng_state=[{
                "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
        )
        (lm / "iter_0000100" / path.parent.name).mkdir(parents=True)
        torch.save(state, lm / "iter_0000100" / path.parent.name / "model_optim_rng.pt")
    (lm / "latest_checkpointed_iteration.txt").write_text("100")
    convert(str(lm), "megatron", str(tmp_path / "hf"), "hf")
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------------
# Numerics: each converted checkpoint, loaded by megatron_llm.load_model, gives the transformers logits.

TARGETS = {
    "hf": ("hf", Options()),  # load_model reads the Hugging Face directory itself
    "megatron-tp2pp2": ("megatron", Options(tp=2, pp=2)),
    "megatron-te-tp4pp1": ("megatron", Options(tp=4, spec="te")),
    "native": ("native", Options()),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_match_transformers(hf_dirs, tmp_path, family, target):
    src, hf = hf_dirs[family]
    fmt, opts = TARGETS[target]
    path = src if target == "hf" else tmp_path / target
    if target != "hf":
        convert(str(src), "hf", str(path), fmt, opts)
    model = megatron_llm.load_model(str(path))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Compatibility with megatron-core itself.


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}")
def test_every_shard_loads_strictly_into_megatron_core(mcore, hf_dirs, tmp_path, layout, spec):
    tp, pp = layout
    for family in ("llama-bias", "qwen3", "glm"):  # between them: every bias, QK-norm, tied and untied heads, partial
        # interleaved RoPE
        out = tmp_path / family
        convert(str(hf_dirs[family][0]), "hf", str(out), "megatron", Options(tp=tp, pp=pp, spec=spec))
        for t in range(tp):
            for p in range(pp):
                shard = safe_load(out / "release" / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")) / "model_optim_rng.pt")
                model = mcore.gpt_model(shard["args"], t, p)  # the file's own args are the whole recipe
                state = mcore.te_to_local_names(shard["model"]) if spec == "te" else shard["model"]
                model.load_state_dict(state, strict=True)
                assert shard["checkpoint_version"] == 3.0


@pytest.mark.parametrize("family", [*FAMILIES, *ROPE_FAMILIES])
def test_megatron_core_forward_matches_transformers(mcore, hf_dirs, tmp_path, family):
    """megatron-core's own attention (fused QKV in grouped order), SwiGLU fc1 and RoPE (partial, interleaved) on
    our shard."""
    src, hf = hf_dirs[family]
    convert(str(src), "hf", str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = mcore.gpt_model(shard["args"], 0, 0).eval()
    model.load_state_dict(shard["model"], strict=True)
    x = tokens()
    logits = mcore.logits(model, x)[..., :VOCAB]  # drop the padding rows' logits
    torch.testing.assert_close(logits, hf(x).logits.detach(), atol=1e-5, rtol=1e-5)


def test_yarn_round_trips_at_tp2_pp2_with_its_windows(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen3-yarn"]
    convert(str(src), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2))
    args = megatron_shards(tmp_path / "mg")["mp_rank_01_001"]["args"]
    assert (args.position_embedding_type, args.yarn_correction_range_round_to_int, args.window_size,
            args.window_attn_skip_freq) == ("yarn", True, (7, 0), [0, 0, 1, 1])
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "hf"), "hf")
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    assert model_config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()) == \
        model_config_from_hf(transformers.AutoConfig.from_pretrained(src).to_dict())


# YaRN settings (rope_scaling over head_dim, rope_theta): gpt-oss's (truncate False), Qwen3's (truncate by default),
# DeepSeek's mscale pair, and an attention_factor equal to the one megatron-core derives.
YARN = {
    "gpt-oss": ({"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False}, 64, 150000.0),
    "qwen3": ({"factor": 4.0, "original_max_position_embeddings": 32768}, 128, 1000000.0),
    "mscale": ({"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 1.0}, 64,
               10000.0),
    "attention-factor": ({"factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0,
                          "attention_factor": 0.1 * math.log(8.0) + 1.0}, 32, 500000.0),
}


@pytest.mark.parametrize("case", YARN)
def test_yarn_args_give_megatron_cores_frequencies_and_factor(mcore, case):
    """megatron-core's YarnRotaryEmbedding, built from the yarn_* args we write, gives our model's angles and cos/sin
    factor exactly; an attention factor it does not derive, or YaRN on part of the head, is refused by name."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    from megatron_llm.checkpoint.megatron_attention import YARN_ARGS
    from megatron_llm.model.rope import rope_frequencies

    keys, head_dim, theta = YARN[case]
    cfg = ModelConfig(hidden_size=64, num_heads=2, head_dim=head_dim, rope_theta=theta, max_seq_len=64,
                      rope_scaling={"rope_type": "yarn", **keys})
    args = megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")
    assert model_config_from_args(args).rope_scaling is not None
    with mcore.patched([mcore.CPU_DEVICE]):
        theirs = YarnRotaryEmbedding(head_dim, rotary_base=args.rotary_base, use_cpu_initialization=True,
                                     **{k.replace("yarn_", "").replace("rotary_", ""): getattr(args, k) for k in YARN_ARGS})
        emb, factor = theirs.get_emb(64)
    inv_freq, ours = rope_frequencies(head_dim, theta, cfg.rope_scaling, 64)
    assert torch.equal(emb[:, 0, 0, : head_dim // 2], torch.outer(torch.arange(64.0), inv_freq)) and factor == ours
    with pytest.raises(UsageError, match=r"model\.rope_fraction=0\.5: megatron-core's YaRN takes its frequencies over "
                                         r"the whole kv_channels"):
        megatron_args(dataclasses.replace(cfg, rope_fraction=0.5), Layout.of(cfg, 1, 1), torch.float32, "local")
    other = dataclasses.replace(cfg, rope_scaling={**cfg.rope_scaling, "attention_factor": 1.25})
    with pytest.raises(UsageError, match=r"attention_factor 1\.25: megatron-core multiplies cos and sin by"):
        megatron_args(other, Layout.of(cfg, 1, 1), torch.float32, "local")


def test_an_odd_rotary_width_is_refused_both_ways():
    """megatron-core rotates int(head_dim * rotary_percent) dims, an odd count with frequencies over the odd width;
    ours the even count below: neither direction converts such a model."""
    cfg = ModelConfig(hidden_size=64, num_heads=8, rope_fraction=0.375)  # 3 of 8 dims there, 2 here
    with pytest.raises(UsageError, match=r"model\.rope_fraction=0\.375 of head_dim 8: it would rotate 3 dims, an odd"):
        megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")
    args = megatron_args(dataclasses.replace(cfg, rope_fraction=0.5), Layout.of(cfg, 1, 1), torch.float32, "local")
    args.rotary_percent = 0.375
    with pytest.raises(UsageError, match=r"rotary_percent=0\.375: it rotates 3 of kv_channels 8, an odd count"):
        model_config_from_args(args)


def test_tensor_parallel_shards_are_megatron_slices_of_the_tp1_tensors(hf_dirs, tmp_path):
    """At tp=2 each rank holds whole query groups of the tp=1 fused QKV (contiguous rows) and [gate_t; up_t]."""
    src, _ = hf_dirs["qwen2"]
    convert(str(src), "hf", str(tmp_path / "one"), "megatron")
    convert(str(src), "hf", str(tmp_path / "two"), "megatron", Options(tp=2))
    one = megatron_shards(tmp_path / "one")["mp_rank_00"]["model"]
    two = [megatron_shards(tmp_path / "two")[f"mp_rank_0{t}"]["model"] for t in range(2)]
    for key in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        full = one[f"decoder.layers.1.{key}"]
        assert all(torch.equal(two[t][f"decoder.layers.1.{key}"], full.chunk(2)[t]) for t in range(2))
    gate, up = one["decoder.layers.1.mlp.linear_fc1.weight"].chunk(2)
    for t in range(2):
        assert torch.equal(two[t]["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate.chunk(2)[t], up.chunk(2)[t]]))


def test_train_from_converted_hf_starts_at_the_transformers_loss_and_converts_back(tiny_config, tmp_path):
    from megatron_llm.training.trainer import train

    cfg = tiny_config(tmp_path, training__steps=1, training__eval_interval=0)
    hf = random_hf_model("Llama", seed=3, **hf_config_from_model_config(cfg.model, "llama"))
    hf.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), "hf", str(tmp_path / "native"), "native")
    resumed = tiny_config(tmp_path, training__steps=1, training__eval_interval=0,
                          checkpoint__resume=str(tmp_path / "native"))
    first_loss = train(resumed).losses[0]

    expected, batch = transformers_first_loss(hf, cfg)
    assert first_loss == pytest.approx(expected, abs=1e-5)

    # And back: the trainer's checkpoint (optimizer and all) -> Hugging Face, which transformers runs as
    # megatron_llm runs the trained weights.
    convert(resumed.checkpoint.dir, "native", str(tmp_path / "trained-hf"), "hf")
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained-hf", attn_implementation="eager")
    with torch.no_grad():
        ours = megatron_llm.load_model(resumed.checkpoint.dir)(batch["tokens"])
        torch.testing.assert_close(trained(batch["tokens"]).logits, ours, atol=1e-5, rtol=1e-5)
        assert not torch.equal(ours, hf(batch["tokens"]).logits)  # the step changed the weights


# ------------------------------------------------------------------------------------------------
# Safety and bad input: one line, exit code 2, nothing left behind.


def cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli().main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_not_run(hf_dirs, tmp_path, capsys):
    convert(str(hf_dirs["llama"][0]), "hf", str(tmp_path / "mg"), "megatron")
    shard = tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_to_memory(shard)
    state["args"].evil = RunsCode(tmp_path / "pwned")
    torch.save(state, shard)
    code, _, err = run_cli(capsys, "--input", tmp_path / "mg", "--input-format", "megatron",
                           "--output", tmp_path / "out", "--output-format", "hf")
    assert code == 2 and err.startswith("error: refused to load") and "system" in err and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def _break(kind: str, mg: Path, hf: Path) -> None:
    """Damages a converted checkpoint in one of the ways the converter must refuse."""
    release = mg / "release"
    if kind == "missing-shard":
        for f in (release / "mp_rank_01_001").iterdir():
            f.unlink()
        (release / "mp_rank_01_001").rmdir()
    elif kind == "extra-shard":
        (release / "mp_rank_02_000").mkdir()
        (release / "mp_rank_02_000" / "model_optim_rng.pt").write_bytes((release / "mp_rank_00_000" / "model_optim_rng.pt").read_bytes())
    elif kind == "shapes-disagree":  # rank 1 of the last stage: found mid-stream, after files were written
        path = release / "mp_rank_01_001" / "model_optim_rng.pt"
        state = load_to_memory(path)
        key = "decoder.layers.1.self_attention.linear_proj.weight"
        state["model"][key] = state["model"][key][:, :-8].clone()
        torch.save(state, path)
    elif kind == "hf-missing-tensor":
        tensors = load_file(hf / "model.safetensors")
        del tensors["model.layers.2.mlp.up_proj.weight"]
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    elif kind == "unknown-family":
        (hf / "config.json").write_text((hf / "config.json").read_text().replace('"llama"', '"t5"'))


BAD = {
    # name: (damage, input format, extra flags, words the one-line error must contain)
    "heads-not-divisible-by-tp": (None, "hf", ["--output-format", "megatron", "--tp", "3"], "--tp 3 does not divide the model's 8 attention heads"),
    "kv-heads-not-divisible-by-tp": (None, "hf", ["--output-format", "megatron", "--tp", "8"], "--tp 8 does not divide the model's 4 kv heads"),
    "layers-not-divisible-by-pp": (None, "hf", ["--output-format", "megatron", "--pp", "3"], "--pp 3 does not divide the model's 4 layers"),
    "missing-shard": ("missing-shard", "megatron", ["--output-format", "hf"], "missing shards ['mp_rank_01_001']"),
    "extra-shard": ("extra-shard", "megatron", ["--output-format", "hf"], "unexpected shards ['mp_rank_02_000']"),
    "shapes-disagree": ("shapes-disagree", "megatron", ["--output-format", "hf"], "shards disagree in shape"),
    "hf-missing-tensor": ("hf-missing-tensor", "hf", ["--output-format", "native"], "missing tensors ['model.layers.2.mlp.up_proj.weight']"),
    "unknown-family": ("unknown-family", "hf", ["--output-format", "native"], "model_type 't5' is not supported"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_in_one_line_without_output(hf_dirs, tmp_path, capsys, case):
    damage, input_format, flags, message = BAD[case]
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in hf_dirs["llama"][0].iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    convert(str(hf), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2))
    if damage:
        _break(damage, tmp_path / "mg", hf)
    src = hf if input_format == "hf" else tmp_path / "mg"
    code, out, err = run_cli(capsys, "--input", src, "--input-format", input_format, "--output", tmp_path / "out", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mg"]  # no output, no temporary directory


def test_existing_output_needs_overwrite(hf_dirs, tmp_path, capsys):
    src = hf_dirs["mistral"][0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    args = ["--input", src, "--input-format", "hf", "--output", tmp_path / "out", "--output-format", "megatron"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "already exists; pass --overwrite" in err and (tmp_path / "out" / "keep").exists()
    code, out, _ = run_cli(capsys, *args, "--overwrite", "--tp", "2")
    assert code == 0 and not (tmp_path / "out" / "keep").exists()
    assert "parameters" in out and "4 weight files" not in out and "2 weight files" in out


def test_cli_end_to_end(hf_dirs, tmp_path):
    """The real command line in a fresh process: summary on stdout, a loadable result."""
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(hf_dirs["qwen2"][0]),
           "--input-format", "hf", "--output", str(tmp_path / "mg"), "--output-format", "megatron",
           "--tp", "2", "--pp", "2", "--dtype", "bf16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "converted hf -> megatron (tp=2, pp=2, local spec)" in result.stdout and "4 weight files" in result.stdout
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert shard["args"].bf16 and shard["model"]["decoder.final_layernorm.weight"].dtype == torch.bfloat16
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "hf"), "hf")
    expected = {k: v.to(torch.bfloat16) for k, v in hf_tensors(hf_dirs["qwen2"][0]).items()}
    assert_same_tensors(expected, hf_tensors(tmp_path / "hf"))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
