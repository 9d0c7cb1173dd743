"""DBRX (Databricks' mixture of experts) as a table: LayerNorms without bias, q/k/v fused in one Wqkv and clipped,
RoPE on whole heads, every layer a softmax top-k router whose weights are divided by their p-norm, and experts
stored flattened, one [E ffn, hidden] tensor per projection (w1 the gate, v1 the up, w2 the down projection
transposed). Its config.json nests the attention's keys under attn_config and the experts' under ffn_config."""

import torch

from megatron_llm.checkpoint.families.common import GATED_ACTIVATIONS, ROPE, activation
from megatron_llm.checkpoint.families.gpt import QKV
from megatron_llm.checkpoint.families.moe import EXPERTS_REQUIRED
from megatron_llm.checkpoint.families.table import Derived, Family, Fixed, Fused, Key, Mapped
from megatron_llm.errors import UsageError

EXPERTS = "layers.{i}.feed_forward.experts"
ACTIVATION = activation("ffn_config.ffn_act_fn.name", GATED_ACTIVATIONS)


def _read_attention(hf: dict) -> dict:
    """attn_config (DbrxAttentionConfig's fills where a key is absent); the RoPE base from rope_parameters (what
    transformers rotates with), else from attn_config.rope_theta."""
    attn = hf.get("attn_config") or {}
    rope = ROPE.read({"rope_theta": attn.get("rope_theta", 10000.0), **{k: v for k, v in hf.items() if v is not None}})
    return dict(num_kv_heads=attn.get("kv_n_heads", 1), qkv_clip=attn.get("clip_qkv"), **rope)


def _write_attention(cfg) -> dict:
    return {**ROPE.write(cfg), "attn_config": {"kv_n_heads": cfg.num_kv_heads, "clip_qkv": cfg.qkv_clip,
                                                "rope_theta": cfg.rope_theta}}  # DbrxAttention reads it (unused)


def _read_experts(hf: dict) -> dict:
    """ffn_config (DbrxFFNConfig's fills where a key is absent). The top-k softmax scores are divided by their
    p-norm, moe_normalize_expert_weights: p = 1 is our renormalisation (the scores are positive), null none."""
    ffn = hf.get("ffn_config") or {}
    if ffn.get("moe_jitter_eps"):
        raise UsageError(f"config.json ffn_config.moe_jitter_eps={ffn['moe_jitter_eps']!r} is not supported: the router "
                         "has no jitter")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1):
        raise UsageError(f"config.json ffn_config.moe_normalize_expert_weights={p!r} is not supported: the top-k weights "
                         "are divided by their sum (1) or left as they are (null)")
    width = ffn.get("ffn_hidden_size", 3584)
    return dict(ffn_hidden_size=width, moe_ffn_hidden_size=width, moe_experts=ffn.get("moe_num_experts", 4),
                moe_top_k=ffn.get("moe_top_k", 1), moe_aux_loss_coeff=ffn.get("moe_loss_weight", 0.01),
                moe_renormalize=p is not None, mlp=ACTIVATION.read((ffn.get("ffn_act_fn") or {}).get("name", "silu")))


def _write_experts(cfg) -> dict:
    return {"ffn_config": {
        "ffn_hidden_size": cfg.moe_ffn_hidden_size, "moe_num_experts": cfg.moe_experts, "moe_top_k": cfg.moe_top_k,
        "moe_loss_weight": cfg.moe_aux_loss_coeff, "moe_normalize_expert_weights": 1.0 if cfg.moe_renormalize else None,
        "ffn_act_fn": {"name": ACTIVATION.write(cfg.mlp)}}}


def flattened_experts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our w1 or w3 [E, ffn, hidden] -> DBRX's w1 or v1 [E ffn, hidden]."""
    (weight,) = parts
    return weight.reshape(-1, weight.shape[-1])


def stacked_experts(flat: torch.Tensor, cfg) -> list[torch.Tensor]:
    """flattened_experts' inverse: the expert count from the config."""
    return [flat.reshape(cfg.moe_experts, -1, flat.shape[-1])]


def flattened_down(parts: list[torch.Tensor]) -> torch.Tensor:
    """Our w2 [E, hidden, ffn] -> DBRX's w2 [E ffn, hidden] (each expert's matrix transposed: it computes h @ w2[e])."""
    (weight,) = parts
    return weight.transpose(1, 2).reshape(-1, weight.shape[1])


def stacked_down(flat: torch.Tensor, cfg) -> list[torch.Tensor]:
    return [flat.reshape(cfg.moe_experts, -1, flat.shape[-1]).transpose(1, 2).contiguous()]


BLOCK = "transformer.blocks.{i}"
DBRX = Family(
    "dbrx", "DbrxForCausalLM",
    (Key("vocab_size", "vocab_size"), Key("d_model", "hidden_size"), Key("n_layers", "num_layers"),
     Key("n_heads", "num_heads"), Key("max_seq_len", "max_seq_len", default=2048),
     Key("tie_word_embeddings", "tie_embeddings", default=False), Derived(_read_attention, _write_attention),
     Fixed("norm", "layernorm"), Fixed("norm_bias", False), Fixed("norm_eps", 1e-5),  # nn.LayerNorm's default
     Fixed("qkv_bias", False), Fixed("linear_bias", False), EXPERTS_REQUIRED, Fixed("moe_score", "softmax"),
     Derived(_read_experts, _write_experts)),
    {"transformer.wte.weight": "tok_embeddings.weight",
     f"{BLOCK}.norm_attn_norm.norm_1.weight": "layers.{i}.attention_norm.weight",
     f"{BLOCK}.norm_attn_norm.attn.Wqkv.weight": Fused(tuple(f"{w}.weight" for w in QKV)),
     f"{BLOCK}.norm_attn_norm.attn.out_proj.weight": "layers.{i}.attention.wo.weight",
     f"{BLOCK}.norm_attn_norm.norm_2.weight": "layers.{i}.ffn_norm.weight",
     f"{BLOCK}.ffn.router.layer.weight": "layers.{i}.feed_forward.router.weight",
     f"{BLOCK}.ffn.experts.mlp.w1": Mapped((f"{EXPERTS}.w1",), flattened_experts, stacked_experts, config=True),
     f"{BLOCK}.ffn.experts.mlp.v1": Mapped((f"{EXPERTS}.w3",), flattened_experts, stacked_experts, config=True),
     f"{BLOCK}.ffn.experts.mlp.w2": Mapped((f"{EXPERTS}.w2",), flattened_down, stacked_down, config=True),
     "transformer.norm_f.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
)

FAMILIES = (DBRX,)
