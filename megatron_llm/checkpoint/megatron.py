"""Megatron-LM <-> native: one key table, the tensor-parallel split and merge, and the `args` mapping.

Facts from ../shared/MEGATRON_FORMAT.md: megatron-core GPTModel names; `{i}` is the layer index LOCAL
to its pipeline stage on the Megatron side and global on ours. Fused QKV rows go group by group
(r = heads / groups query heads, then k, then v, each head_dim rows) and TP cuts whole groups; fc1 on TP
rank t is cat([gate_t, up_t]); linear_proj and linear_fc2 split their input dim; the vocabulary is padded
to a multiple of 128 * tp with copies of the last row. RoPE needs no permutation (rotate-half on both sides).
Both directions read MEGATRON_TO_NATIVE; reading and writing files is megatron_io.py's job.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

# How tensor parallelism places a tensor: REPLICATED on every rank; ROW splits dim 1; VOCAB pads then
# splits dim 0; GATED holds [gate_t; up_t]; QKV holds whole query groups, fused.
REPLICATED, ROW, VOCAB, GATED, QKV = "replicated", "row", "vocab", "gated", "qkv"

# megatron-core name (local spec): (the native tensors it holds, in fused order; how TP places it)
MEGATRON_TO_NATIVE = {
    "embedding.word_embeddings.weight": (("tok_embeddings.weight",), VOCAB),
    "decoder.layers.{i}.input_layernorm.weight": (("layers.{i}.attention_norm.weight",), REPLICATED),
    "decoder.layers.{i}.input_layernorm.bias": (("layers.{i}.attention_norm.bias",), REPLICATED),
    "decoder.layers.{i}.self_attention.linear_qkv.weight": (
        ("layers.{i}.attention.wq.weight", "layers.{i}.attention.wk.weight", "layers.{i}.attention.wv.weight"), QKV),
    "decoder.layers.{i}.self_attention.linear_qkv.bias": (
        ("layers.{i}.attention.wq.bias", "layers.{i}.attention.wk.bias", "layers.{i}.attention.wv.bias"), QKV),
    "decoder.layers.{i}.self_attention.q_layernorm.weight": (("layers.{i}.attention.q_norm.weight",), REPLICATED),
    "decoder.layers.{i}.self_attention.k_layernorm.weight": (("layers.{i}.attention.k_norm.weight",), REPLICATED),
    "decoder.layers.{i}.self_attention.linear_proj.weight": (("layers.{i}.attention.wo.weight",), ROW),
    "decoder.layers.{i}.self_attention.linear_proj.bias": (("layers.{i}.attention.wo.bias",), REPLICATED),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": (("layers.{i}.ffn_norm.weight",), REPLICATED),
    "decoder.layers.{i}.pre_mlp_layernorm.bias": (("layers.{i}.ffn_norm.bias",), REPLICATED),
    "decoder.layers.{i}.mlp.linear_fc1.weight": (("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w3.weight"), GATED),
    "decoder.layers.{i}.mlp.linear_fc1.bias": (("layers.{i}.feed_forward.w1.bias", "layers.{i}.feed_forward.w3.bias"), GATED),
    "decoder.layers.{i}.mlp.linear_fc2.weight": (("layers.{i}.feed_forward.w2.weight",), ROW),
    "decoder.layers.{i}.mlp.linear_fc2.bias": (("layers.{i}.feed_forward.w2.bias",), REPLICATED),
    "decoder.final_layernorm.weight": (("norm.weight",), REPLICATED),
    "decoder.final_layernorm.bias": (("norm.bias",), REPLICATED),
    "output_layer.weight": (("output.weight",), VOCAB),
}
# The Transformer Engine spec fuses each pre-norm into the linear layer that follows it.
TE_NAMES = {
    "decoder.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.{i}.input_layernorm.bias": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_bias",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.{i}.pre_mlp_layernorm.bias": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_bias",
}
# Modules whose state dict carries an `_extra_state` entry (FP8 metadata; we write None, which both
# megatron-core and Transformer Engine accept). Missing ones fail Megatron's strict load.
EXTRA_STATE = {
    "local": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
    "te": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
           "self_attention.core_attention"),
}
SPECS = tuple(EXTRA_STATE)
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # Megatron-LM's default; the padded vocabulary is a multiple of this * tp
# Values an architecture arg may take for our model to express it (None: absent, Megatron's default).
SUPPORTED_ARGS = {
    "position_embedding_type": ("rope",), "swiglu": (True,), "normalization": ("RMSNorm", "LayerNorm", None),
    "apply_layernorm_1p": (False, None), "rotary_percent": (1.0, None), "rotary_interleaved": (False, None),
    "num_moe_experts": (None,), "virtual_pipeline_model_parallel_size": (None, 1),
}
# Megatron's Llama-3 RoPE scaling takes only the factor; the rest is fixed in megatron-core.
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _padded(vocab: int, tp: int) -> int:
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """A model at a (tp, pp) layout: the sizes the splits need and which stage holds what."""

    tp: int
    pp: int
    num_layers: int
    heads: int
    groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int, pp: int, padded_vocab_size: Optional[int] = None) -> "Layout":
        """Refuses layouts Megatron cannot hold (megatron-core < 0.16 needs whole query groups per rank,
        and so do we)."""
        for what, n, by in (("attention heads", cfg.num_heads, tp), ("kv heads (query groups)", cfg.num_kv_heads, tp),
                            ("MLP width", cfg.ffn_hidden_size, tp), ("layers", cfg.num_layers, pp)):
            if by < 1 or n % by:
                flag = "--pp" if what == "layers" else "--tp"
                raise UsageError(f"{flag} {by} does not divide the model's {n} {what}; choose a {flag} that divides {n}")
        padded = padded_vocab_size or _padded(cfg.vocab_size, tp)
        if padded < cfg.vocab_size or padded % tp:
            raise UsageError(f"padded_vocab_size {padded} cannot hold the vocabulary of {cfg.vocab_size} split {tp} ways")
        return cls(tp, pp, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, padded)

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def shard_dir(self, tp_rank: int, pp_rank: int) -> str:
        return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "")

    def extra_state_keys(self, stage: int, spec: str) -> list[str]:
        keys = [f"decoder.layers.{i}.{module}._extra_state" for i in range(self.layers_per_stage) for module in EXTRA_STATE[spec]]
        return keys + (["output_layer._extra_state"] if stage == self.pp - 1 else [])


@dataclass(frozen=True)
class Entry:
    """One megatron-core tensor of one stage and the native tensors it holds."""

    key: str
    sources: tuple[str, ...]
    kind: str
    stage: int


def entries(shapes: dict, layout: Layout, spec: str, tied: bool) -> list[Entry]:
    """Every tensor Megatron stores for a model whose native state-dict shapes are `shapes`. A tied head
    is stored only when pipelining: megatron-core's last stage keeps its own copy of the embedding."""
    out = []
    for template, (sources, kind) in MEGATRON_TO_NATIVE.items():
        name = TE_NAMES.get(template, template) if spec == "te" else template
        for i in range(layout.num_layers) if "{i}" in template else [None]:
            names = tuple(s.format(i=i) for s in sources)
            if names[0] not in shapes or (template == "output_layer.weight" and tied and layout.pp == 1):
                continue
            if i is None:
                stage = 0 if template.startswith("embedding.") else layout.pp - 1
                out.append(Entry(name, names, kind, stage))
            else:
                stage, local = divmod(i, layout.layers_per_stage)
                out.append(Entry(name.format(i=local), names, kind, stage))
    return out


def split(entry: Entry, parts: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """Whole native tensors -> one tensor per TP rank, each with storage of its own (see own_storage)."""
    tp, kind = layout.tp, entry.kind
    if kind == REPLICATED:
        return [parts[0]] * tp
    if kind == ROW:
        return [c.contiguous() if tp > 1 else c for c in parts[0].chunk(tp, dim=1)]
    if kind == VOCAB:  # pad with copies of the last row, as Megatron-LM's own converter does
        full = parts[0]
        rows = layout.padded_vocab_size // tp
        out = []
        for t in range(tp):  # rows [t*rows, (t+1)*rows) of the padded table, built in one copy
            real = full[t * rows : (t + 1) * rows]
            out.append(torch.cat([real, full[-1:].expand(rows - real.shape[0], *full.shape[1:])]))
        return out
    if kind == GATED:
        gate, up = parts
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]  # [2*ffn/tp, ...]
    ng, r, d = layout.groups, layout.heads // layout.groups, layout.head_dim
    q, k, v = parts
    rest = q.shape[1:]
    q, k, v = q.view(ng, r * d, *rest), k.view(ng, d, *rest), v.view(ng, d, *rest)
    per = ng // tp
    # Rank t holds groups [t*per, (t+1)*per), each as its r query heads, then k, then v.
    return [torch.cat([q[s], k[s], v[s]], dim=1).reshape(-1, *rest) for s in (slice(t * per, (t + 1) * per) for t in range(tp))]


def merge(entry: Entry, shards: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """The inverse of split: one tensor per TP rank -> the whole native tensors, in entry.sources order."""
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) > 1:
        raise UsageError(f"{entry.key}: the tensor-parallel shards disagree in shape ({sorted(shapes)}); the checkpoint is inconsistent")
    kind = entry.kind
    if kind == REPLICATED:
        return [shards[0]]
    if kind == ROW:
        return [torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]]
    if kind == VOCAB:
        return [torch.cat(shards)[: layout.vocab_size]]  # drop the padding rows
    if kind == GATED:
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    ng, r, d = layout.groups, layout.heads // layout.groups, layout.head_dim
    rest = shards[0].shape[1:]
    # Each rank's groups split into q, k, v views; one cat per output copies each element once.
    views = [s.view(ng // len(shards), (r + 2) * d, *rest).split([r * d, d, d], dim=1) for s in shards]
    return [torch.cat([v[j] for v in views]).view(-1, *rest) for j in range(3)]


# ------------------------------------------------------------------------------------------------
# args: the Namespace Megatron-LM saves and reads back (load_args_from_checkpoint,
# core_transformer_config_from_args and the GPTModel arguments of pretrain_gpt.py).


def megatron_args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, spec: str) -> argparse.Namespace:
    """Every architecture field Megatron-LM reads, for `cfg` at `layout`; UsageError if Megatron cannot
    express the model."""
    scaling = cfg.rope_scaling
    if scaling is not None and (scaling["rope_type"] != "llama3" or
                                {k: float(scaling[k]) for k in MEGATRON_LLAMA3} != MEGATRON_LLAMA3):
        raise UsageError(f"Megatron-LM cannot express model.rope_scaling={scaling!r}: its RoPE scaling is Llama-3's "
                         f"with {MEGATRON_LLAMA3} fixed; convert to native or hf instead")
    args = _args(cfg, layout, dtype, spec)
    # Every field must survive a read back: what Megatron cannot express is refused here, by name.
    back = dataclasses.asdict(model_config_from_args(args))
    back["scaled_init"] = cfg.scaled_init  # an init choice Megatron records elsewhere
    for key, value in dataclasses.asdict(cfg).items():
        if back[key] != value:
            raise UsageError(f"Megatron-LM cannot express model.{key}={value!r}; convert to native or hf instead")
    return args


def _args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, spec: str) -> argparse.Namespace:
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.num_kv_heads,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads, kv_channels=cfg.head_dim,
        seq_length=cfg.max_seq_len, max_position_embeddings=cfg.max_seq_len,
        vocab_size=cfg.vocab_size, padded_vocab_size=layout.padded_vocab_size,
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm", norm_epsilon=cfg.norm_eps,
        apply_layernorm_1p=False, swiglu=True, qk_layernorm=cfg.qk_norm,
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=False,
        rotary_base=int(theta) if float(theta).is_integer() else theta, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=scaling is not None, rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        add_bias_linear=cfg.out_bias, add_qkv_bias=cfg.qkv_bias,
        init_method_std=cfg.init_std, hidden_dropout=0.0, attention_dropout=0.0,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True,
        transformer_impl="transformer_engine" if spec == "te" else "local",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type=None, ckpt_format="torch", use_dist_ckpt=False,
    )


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The inverse of megatron_args, for any Megatron-LM GPT checkpoint; refuses what our model lacks."""
    def arg(name, default=None):
        return getattr(args, name, default)

    for name, allowed in SUPPORTED_ARGS.items():
        if arg(name) not in allowed:
            raise UsageError(f"Megatron checkpoint has {name}={arg(name)!r}; our model supports {' or '.join(map(repr, allowed))}")
    heads = args.num_attention_heads
    groups = args.num_query_groups if arg("group_query_attention") else heads
    bias = bool(arg("add_bias_linear", True))
    scaling = (
        {"rope_type": "llama3", "factor": float(arg("rope_scaling_factor", 8.0)), **MEGATRON_LLAMA3}
        if arg("use_rope_scaling") else None
    )
    return ModelConfig(
        vocab_size=arg("vocab_size") or args.padded_vocab_size,  # Megatron-LM itself does not always record it
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=heads, num_kv_heads=groups,
        head_dim=arg("kv_channels") or args.hidden_size // heads,
        ffn_hidden_size=arg("ffn_hidden_size") or 4 * args.hidden_size, mlp="swiglu",
        norm="rmsnorm" if arg("normalization") == "RMSNorm" else "layernorm", norm_eps=arg("norm_epsilon", 1e-5),
        max_seq_len=arg("max_position_embeddings") or args.seq_length, rope_theta=float(arg("rotary_base", 10000)),
        rope_scaling=scaling, qk_norm=bool(arg("qk_layernorm")), qkv_bias=bias or bool(arg("add_qkv_bias")),
        linear_bias=bias, tie_embeddings=not arg("untie_embeddings_and_output_weights", False),
        init_std=arg("init_method_std", 0.02),
    )
