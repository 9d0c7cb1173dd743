"""The families transformers does not ship (Baichuan v1 and 2, InternLM2), against their published equations.

Each test writes a tiny random checkpoint in the published layout (config.json keys and tensor names of
the trust_remote_code models, safetensors), loads it with `megatron_llm.load_model` and compares the
logits with a forward written here from the modeling code's equations: embeddings, RMSNorm, the fused
q/k/v projection split per its layout, RoPE (rotate-half) or ALiBi, causal softmax attention, SwiGLU and
Baichuan2's NormHead. The Hugging Face round trip through native is bit-exact and keeps the config keys.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import megatron_llm
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.families import remote
from megatron_llm.checkpoint.hf import model_config_from_hf
from megatron_llm.errors import UsageError

VOCAB, SEQ = 101, 24
BAICHUAN_7B = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", vocab_size=VOCAB, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, hidden_act="silu",
                   max_position_embeddings=64, model_max_length=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   z_loss_weight=0)  # Baichuan2's config class always writes it: the NormHead's mark
# The 13B's config.json has no max_position_embeddings; its shape is what marks it (made tiny below).
BAICHUAN_13B = {**{k: v for k, v in BAICHUAN_7B.items() if k != "max_position_embeddings"}, "num_hidden_layers": 3}
# Baichuan-7B (v1): its own class name, no model_max_length, no NormHead (no z_loss_weight).
BAICHUAN1_7B = {**{k: v for k, v in BAICHUAN_7B.items() if k not in ("model_max_length", "z_loss_weight")},
                "architectures": ["BaiChuanForCausalLM"]}
INTERNLM2 = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=VOCAB, hidden_size=64,
                 intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bias=True,
                 hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1000000,
                 rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=False)
CASES = {"baichuan_7b": BAICHUAN_7B, "baichuan_13b": BAICHUAN_13B, "baichuan1_7b": BAICHUAN1_7B, "internlm2": INTERNLM2}
FAMILIES_TESTED = {case["model_type"] for case in CASES.values()}  # tests/test_family_coverage.py gathers these

# Tensor names of each published layout ({i} is the layer) and how its fused q/k/v rows are ordered.
LAYOUTS = {
    "baichuan": dict(embed="model.embed_tokens", attn_norm="input_layernorm", qkv="self_attn.W_pack",
                     out="self_attn.o_proj", ffn_norm="post_attention_layernorm", gate="mlp.gate_proj",
                     up="mlp.up_proj", down="mlp.down_proj", head="lm_head", split="concat"),
    "internlm2": dict(embed="model.tok_embeddings", attn_norm="attention_norm", qkv="attention.wqkv",
                      out="attention.wo", ffn_norm="ffn_norm", gate="feed_forward.w1", up="feed_forward.w3",
                      down="feed_forward.w2", head="output", split="groups"),
}


@pytest.fixture
def tiny_13b(monkeypatch):
    """A tiny Baichuan2-13B: its shape stands in for the published one (5120 wide, 40 layers)."""
    monkeypatch.setattr(remote, "BAICHUAN_ALIBI_SHAPES", [{"hidden_size": 64, "num_hidden_layers": 3}])


def shapes(c: dict) -> dict[str, tuple]:
    n = LAYOUTS[c["model_type"]]
    h, f, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    d, kv = h // heads, c.get("num_key_value_heads", heads)
    layer = {n["attn_norm"]: (h,), n["qkv"]: ((heads + 2 * kv) * d, h), n["out"]: (h, heads * d), n["ffn_norm"]: (h,),
             n["gate"]: (f, h), n["up"]: (f, h), n["down"]: (h, f)}
    if c.get("bias"):
        layer.update({f"{n['qkv']}.bias": ((heads + 2 * kv) * d,), f"{n['out']}.bias": (h,)})
    out = {f"{n['embed']}.weight": (c["vocab_size"], h), "model.norm.weight": (h,), f"{n['head']}.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k if k.endswith('bias') else k + '.weight'}": s for k, s in layer.items()})
    return out


def write_checkpoint(c: dict, path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=g) * 0.1 + ("norm" in name) for name, shape in shapes(c).items()}
    path.mkdir()
    save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(c))
    return weights


# ------------------------------------------------------------------------------------------------------
# The published equations.


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, theta, factor):
    """RoPE on x [b, heads, s, d], rotate-half; linear scaling divides the positions by `factor`."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(x.shape[2]).float() / factor, inv_freq)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def alibi_slopes(n: int) -> list[float]:
    """Baichuan's _get_interleave: 2^(-8/n) geometric; odd terms of the next power of two fill a remainder."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def split_qkv(qkv, c):
    """[b, s, fused] -> q [b, heads, s, d] and k, v [b, kv_heads, s, d]."""
    heads = c["num_attention_heads"]
    d, kv = c["hidden_size"] // heads, c.get("num_key_value_heads", heads)
    if LAYOUTS[c["model_type"]]["split"] == "concat":  # W_pack rows: all of q, then k, then v
        q, k, v = qkv.unflatten(-1, (3, heads, d)).unbind(2)
    else:  # wqkv rows: per key/value group, its queries, then its key, then its value
        grouped = qkv.unflatten(-1, (kv, heads // kv + 2, d))
        q, k, v = grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
    return (t.transpose(1, 2) for t in (q, k, v))


def reference_logits(c: dict, w: dict, tokens: torch.Tensor, alibi: bool) -> torch.Tensor:
    n, eps = LAYOUTS[c["model_type"]], c["rms_norm_eps"]
    theta, factor = c.get("rope_theta", 10000.0), (c.get("rope_scaling") or {"factor": 1.0})["factor"]
    h = w[f"{n['embed']}.weight"][tokens]  # [b, s, hidden]
    s = tokens.shape[1]
    mask = torch.full((s, s), -math.inf).triu(1)
    if alibi:  # slope * key position: per query row a shift of slope * (j - i), which softmax does not see
        mask = mask + torch.tensor(alibi_slopes(c["num_attention_heads"]))[:, None, None] * torch.arange(s)
    for i in range(c["num_hidden_layers"]):
        def linear(x, name):
            return F.linear(x, w[f"model.layers.{i}.{n[name]}.weight"], w.get(f"model.layers.{i}.{n[name]}.bias"))

        def norm(x, name):
            return rms_norm(x, w[f"model.layers.{i}.{n[name]}.weight"], eps)

        q, k, v = split_qkv(linear(norm(h, "attn_norm"), "qkv"), c)
        if not alibi:
            q, k = rotate(q, theta, factor), rotate(k, theta, factor)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # each kv head serves a group
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask  # [b, heads, s, s]
        h = h + linear((scores.softmax(-1) @ v).transpose(1, 2).flatten(2), "out")
        x = norm(h, "ffn_norm")
        h = h + linear(F.silu(linear(x, "gate")) * linear(x, "up"), "down")
    head = w[f"{n['head']}.weight"]
    head = F.normalize(head, dim=-1) if "z_loss_weight" in c else head  # Baichuan2's NormHead: unit rows
    return rms_norm(h, w["model.norm.weight"], eps) @ head.T


# ------------------------------------------------------------------------------------------------------


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.usefixtures("tiny_13b")
@pytest.mark.parametrize("case", CASES)
def test_logits_match_the_published_equations(tmp_path, case):
    c = CASES[case]
    weights = write_checkpoint(c, tmp_path / "hf")
    model = megatron_llm.load_model(tmp_path / "hf")
    assert (model.cfg.position == "alibi") == (case == "baichuan_13b")
    with torch.no_grad():
        expected = reference_logits(c, weights, tokens(), alibi=case == "baichuan_13b")
        torch.testing.assert_close(model(tokens()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("tiny_13b")
@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_round_trip(tmp_path, case):
    c = CASES[case]
    before = write_checkpoint(c, tmp_path / "hf")
    convert(str(tmp_path / "hf"), "hf", str(tmp_path / "native"), "native")
    convert(str(tmp_path / "native"), "native", str(tmp_path / "back"), "hf")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: written.get(k) for k in c} == c


def test_published_13b_shape_uses_alibi():
    """The published config.json files, as Baichuan2-7B-Base and -13B-Base ship them."""
    common = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", vocab_size=125696, hidden_act="silu",
                  model_max_length=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base_7b = dict(common, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   max_position_embeddings=4096)
    base_13b = dict(common, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40)
    assert model_config_from_hf(base_13b).position == "alibi" and model_config_from_hf(base_7b).position == "rope"
    assert model_config_from_hf(base_13b).norm_head


def test_baichuan_version_from_the_config():
    """Baichuan-13B (v1, as published: 64000 tokens, no z_loss_weight) has ALiBi and a plain head; a config
    with neither mark is refused in one line, and so is one with both."""
    base_13b = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", vocab_size=64000, hidden_act="silu",
                    hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                    model_max_length=4096, rms_norm_eps=1e-6)
    cfg = model_config_from_hf(base_13b)
    assert cfg.position == "alibi" and not cfg.norm_head
    for config in ({**base_13b, "vocab_size": 65000}, {**base_13b, "z_loss_weight": 0}):
        with pytest.raises(UsageError, match="^config.json cannot tell Baichuan .plain head. from Baichuan2"):
            model_config_from_hf(config)


def test_internlm2_dynamic_rope_is_refused():
    with pytest.raises(UsageError, match="rope_scaling type 'dynamic'"):
        model_config_from_hf({**INTERNLM2, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_grouped_query_model_is_refused_as_baichuan(tmp_path):
    write_checkpoint(INTERNLM2, tmp_path / "hf")
    with pytest.raises(UsageError, match=r"cannot express .*num_kv_heads"):
        convert(str(tmp_path / "hf"), "hf", str(tmp_path / "out"), "hf", Options(hf_family="baichuan"))
    assert not (tmp_path / "out").exists()
