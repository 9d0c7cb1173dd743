"""Families transformers does not ship, read and written in the layout of their published checkpoints
(config.json and tensor names of the trust_remote_code models): Baichuan (v1 and 2) and InternLM2. Their
modeling code predates rope_parameters, so RoPE is written as rope_theta / rope_scaling, and it derives
head_dim from hidden_size, so a model whose heads do not fill the width is refused on export."""

from megatron_llm.checkpoint.families.common import GATED_ACTIVATIONS, KV_HEADS, ROPE, activation
from megatron_llm.checkpoint.families.fused import ATTENTION
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key
from megatron_llm.errors import UsageError

HEAD_DIM_FROM_WIDTH = Derived(lambda hf: dict(head_dim=hf["hidden_size"] // hf["num_attention_heads"]), lambda cfg: {})
REMOTE_CONFIG = (
    Key("vocab_size", "vocab_size"),
    Key("hidden_size", "hidden_size"),
    Key("num_hidden_layers", "num_layers"),
    Key("num_attention_heads", "num_heads"),
    HEAD_DIM_FROM_WIDTH,
    Key("intermediate_size", "ffn_hidden_size"),
    activation("hidden_act", GATED_ACTIVATIONS, default="silu"),
    Key("rms_norm_eps", "norm_eps", default=1e-6),
)

# Baichuan and Baichuan2 share model_type "baichuan" and four modeling files: the 13B's use ALiBi where the
# 7B's rotate (RoPE, base 10000), and only Baichuan2 normalises its head (NormHead). A config.json tells the
# sizes apart only by its shape (these are the published 13B's) or by Baichuan-7B's own architecture name.
BAICHUAN_ALIBI_SHAPES = [{"hidden_size": 5120, "num_hidden_layers": 40}]
BAICHUAN1_7B = "BaiChuanForCausalLM"  # Baichuan-7B (v1) spells its class so; every other one BaichuanForCausalLM
# Vocabulary sizes of the published checkpoints: Baichuan 64000, Baichuan2 125696.
BAICHUAN1_VOCAB, BAICHUAN2_VOCAB = 64000, 125696


def _read_baichuan_position(hf: dict) -> dict:
    alibi = any(all(hf.get(key) == value for key, value in shape.items()) for shape in BAICHUAN_ALIBI_SHAPES)
    return dict(position="alibi" if alibi and hf.get("architectures") != [BAICHUAN1_7B] else "rope")


def _read_baichuan_version(hf: dict) -> dict:
    """Baichuan2 (NormHead): its config class always writes z_loss_weight, and its vocabulary is 125696.
    Baichuan (v1, a plain head): neither, and Baichuan-7B's class name or the 64000 vocabulary say so."""
    v2 = "z_loss_weight" in hf or hf.get("vocab_size") == BAICHUAN2_VOCAB
    v1 = hf.get("architectures") == [BAICHUAN1_7B] or hf.get("vocab_size") == BAICHUAN1_VOCAB
    if v1 == v2:
        raise UsageError(f"config.json cannot tell Baichuan (plain head) from Baichuan2 (NormHead): add \"z_loss_weight\": 0 "
                         f"for Baichuan2, or \"architectures\": [\"{BAICHUAN1_7B}\"] for Baichuan-7B")
    return dict(norm_head=v2)


def _write_baichuan_version(cfg) -> dict:
    if cfg.norm_head:
        return {"z_loss_weight": 0}
    return {"architectures": [BAICHUAN1_7B if cfg.position == "rope" else "BaichuanForCausalLM"]}


BAICHUAN = Family(
    "baichuan", "BaichuanForCausalLM",
    (*REMOTE_CONFIG,
     Derived(lambda hf: dict(num_kv_heads=hf["num_attention_heads"]), lambda cfg: {}),  # no grouped-query attention
     # model_max_length sizes both the ALiBi mask (13B) and the RoPE cache (7B, which reads max_position_embeddings;
     # Baichuan-7B has only that).
     Derived(lambda hf: dict(max_seq_len=hf.get("model_max_length") or hf["max_position_embeddings"]),
             lambda cfg: {"model_max_length": cfg.max_seq_len, "max_position_embeddings": cfg.max_seq_len}),
     Derived(_read_baichuan_position, lambda cfg: {}), Fixed("rope_theta", 10000.0),
     Derived(_read_baichuan_version, _write_baichuan_version), Fixed("tie_embeddings", False),
     Fixed("qkv_bias", False), Fixed("out_bias", False), Fixed("mlp_bias", False)),
    {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
        "model.layers.{i}.self_attn.W_pack.weight": Fused(ATTENTION),
        "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
        "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
        "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
        "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    },
)


def _read_internlm2_rope(hf: dict) -> dict:
    """InternLM2's modeling code knows linear and dynamic scaling; dynamic (NTK) changes the base with the
    sequence length, which model.rope_scaling cannot hold."""
    kind = (hf.get("rope_scaling") or {}).get("type", "linear")
    if kind != "linear":
        raise UsageError(f"config.json rope_scaling type {kind!r} is not supported for internlm2; supported: linear")
    return ROPE.read(hf)


def _write_internlm2_rope(cfg) -> dict:
    scaling = cfg.rope_scaling and {"type": cfg.rope_scaling["rope_type"], "factor": cfg.rope_scaling.get("factor")}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


# InternLM2: q/k/v fused per key/value group (table.Fused "groups"); `bias` is on wqkv and wo only.
INTERNLM2 = Family(
    "internlm2", "InternLM2ForCausalLM",
    (*REMOTE_CONFIG, KV_HEADS, Key("max_position_embeddings", "max_seq_len", default=2048),
     Key("tie_word_embeddings", "tie_embeddings", default=False),
     Derived(_read_internlm2_rope, _write_internlm2_rope),
     Key("bias", "qkv_bias", default=True), Key("bias", "out_bias", default=True), Fixed("mlp_bias", False)),
    {
        "model.tok_embeddings.weight": "tok_embeddings.weight",
        "model.layers.{i}.attention_norm.weight": "layers.{i}.attention_norm.weight",
        "model.layers.{i}.attention.wqkv.weight": Fused(ATTENTION, layout="groups"),
        "model.layers.{i}.attention.wqkv.bias": Fused(tuple(p.replace(".weight", ".bias") for p in ATTENTION), layout="groups"),
        "model.layers.{i}.attention.wo.weight": "layers.{i}.attention.wo.weight",
        "model.layers.{i}.attention.wo.bias": "layers.{i}.attention.wo.bias",
        "model.layers.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
        "model.layers.{i}.feed_forward.w1.weight": "layers.{i}.feed_forward.w1.weight",
        "model.layers.{i}.feed_forward.w3.weight": "layers.{i}.feed_forward.w3.weight",
        "model.layers.{i}.feed_forward.w2.weight": "layers.{i}.feed_forward.w2.weight",
        "model.norm.weight": "norm.weight",
        "output.weight": "output.weight",
    },
)

FAMILIES = (BAICHUAN, INTERNLM2)
