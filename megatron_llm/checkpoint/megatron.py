"""Megatron-LM <-> native: one key table, the tensor-parallel split and merge, and the `args` mapping.

Facts from ../shared/MEGATRON_FORMAT.md: megatron-core GPTModel names; `{i}` is the layer index LOCAL
to its pipeline stage on the Megatron side and global on ours. Fused QKV rows go group by group
(r = heads / groups query heads, then k, then v, each head_dim rows) and TP cuts whole groups; fc1 on TP
rank t is cat([gate_t, up_t]); linear_proj and linear_fc2 split their input dim; the vocabulary is padded
to a multiple of 128 * tp with copies of the last row. RoPE needs no permutation (rotate-half or interleaved pairs
over the same leading dims on both sides: rotary_interleaved, rotary_percent). Latent attention's projections
(LATENT_TO_NATIVE) are all column-parallel: dim 0 in contiguous blocks, whole heads for the up projections.
Both directions read MEGATRON_TO_NATIVE; the MoE, latent-attention, YaRN and sliding-window args are megatron_moe.py's,
megatron_mla.py's and megatron_attention.py's; reading and writing files is megatron_io.py's job. gpt-oss's pieces:
attention sinks are DotProductAttention's learnable softmax_offset (softmax_type learnable), its clamped SwiGLU is
quick_gelu with glu_linear_offset 1 and activation_func_clamp_value, and add_bias_linear gives the router and the
experts biases (megatron-core: at expert tensor parallelism 1 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_llm.checkpoint.megatron_attention import (
    as_built,
    window_args,
    window_config,
    windows,
    yarn_args,
    yarn_scaling,
)
from megatron_llm.checkpoint.megatron_mla import latent_config, mla_args
from megatron_llm.checkpoint.megatron_moe import check_linear_biases, dense_mlps, moe_args, moe_config, moe_pattern
from megatron_llm.checkpoint.megatron_mtp import check_mtp_layout, mtp_depths, mtp_templates
from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError
from megatron_llm.model.rope import rope_frequencies

# How tensor parallelism places a tensor: REPLICATED on every rank; ROW splits dim 1; COLUMN splits dim 0; VOCAB
# pads then splits dim 0; GATED holds [gate_t; up_t]; QKV holds whole query groups, fused.
REPLICATED, ROW, COLUMN, VOCAB, GATED, QKV = "replicated", "row", "column", "vocab", "gated", "qkv"

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
    # softmax_type learnable: one sink logit per head (DotProductAttention's), split with the heads
    "decoder.layers.{i}.self_attention.core_attention.softmax_offset": (("layers.{i}.attention.sinks.weight",), COLUMN),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": (("layers.{i}.ffn_norm.weight",), REPLICATED),
    "decoder.layers.{i}.pre_mlp_layernorm.bias": (("layers.{i}.ffn_norm.bias",), REPLICATED),
    "decoder.layers.{i}.mlp.linear_fc1.weight": (("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w3.weight"), GATED),
    "decoder.layers.{i}.mlp.linear_fc1.bias": (("layers.{i}.feed_forward.w1.bias", "layers.{i}.feed_forward.w3.bias"), GATED),
    "decoder.layers.{i}.mlp.linear_fc2.weight": (("layers.{i}.feed_forward.w2.weight",), ROW),
    "decoder.layers.{i}.mlp.linear_fc2.bias": (("layers.{i}.feed_forward.w2.bias",), REPLICATED),
    # Mixture-of-experts layers (megatron-core's MoELayer, SequentialMLP experts). `{l}` is the expert index
    # LOCAL to its expert-parallel rank; ours are stacked [E, ...] tensors, one entry per expert (Entry.expert).
    "decoder.layers.{i}.mlp.router.weight": (("layers.{i}.feed_forward.router.weight",), REPLICATED),
    "decoder.layers.{i}.mlp.router.expert_bias": (("layers.{i}.feed_forward.router.expert_bias",), REPLICATED),
    # add_bias_linear: the router's logits, each expert's fc1 (gate then up, as the weight) and fc2, whose bias a
    # row-parallel layer adds once, after its sum over the ranks
    "decoder.layers.{i}.mlp.router.bias": (("layers.{i}.feed_forward.router.bias",), REPLICATED),
    "decoder.layers.{i}.mlp.experts.local_experts.{l}.linear_fc1.weight": (
        ("layers.{i}.feed_forward.experts.w1", "layers.{i}.feed_forward.experts.w3"), GATED),
    "decoder.layers.{i}.mlp.experts.local_experts.{l}.linear_fc1.bias": (
        ("layers.{i}.feed_forward.experts.w1_bias", "layers.{i}.feed_forward.experts.w3_bias"), GATED),
    "decoder.layers.{i}.mlp.experts.local_experts.{l}.linear_fc2.weight": (("layers.{i}.feed_forward.experts.w2",), ROW),
    "decoder.layers.{i}.mlp.experts.local_experts.{l}.linear_fc2.bias": (("layers.{i}.feed_forward.experts.w2_bias",), REPLICATED),
    "decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight": (
        ("layers.{i}.feed_forward.shared_experts.w1.weight", "layers.{i}.feed_forward.shared_experts.w3.weight"), GATED),
    "decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight": (("layers.{i}.feed_forward.shared_experts.w2.weight",), ROW),
    "decoder.layers.{i}.mlp.shared_experts.gate_weight": (("layers.{i}.feed_forward.shared_gate.weight",), REPLICATED),
    "decoder.final_layernorm.weight": (("norm.weight",), REPLICATED),
    "decoder.final_layernorm.bias": (("norm.bias",), REPLICATED),
    "output_layer.weight": (("output.weight",), VOCAB),
}
# Multi-head latent attention (megatron-core's MLASelfAttention, local spec), beside linear_proj above. Every projection
# is a ColumnParallelLinear, the down projections too (their outputs are gathered before the latent norms, so the
# split is ours to undo, not a choice of megatron-core's heads); the up projections' rows are whole heads, each
# [qk_head_dim | qk_pos_emb_head_dim] (queries) or [qk_head_dim | v_head_dim] (keys, values), as ours are.
# q_layernorm / kv_layernorm are the latent norms (args.qk_layernorm builds them); a GQA model's q_layernorm is
# its QK-norm instead (MEGATRON_TO_NATIVE): a model has one or the other, never both.
LATENT_TO_NATIVE = {
    f"decoder.layers.{{i}}.self_attention.{theirs}": ((f"layers.{{i}}.attention.{ours}",), kind) for theirs, ours, kind in (
        ("linear_q_proj.weight", "wq.weight", COLUMN), ("linear_q_down_proj.weight", "wq_a.weight", COLUMN),
        ("q_layernorm.weight", "q_a_norm.weight", REPLICATED), ("q_layernorm.bias", "q_a_norm.bias", REPLICATED),
        ("linear_q_up_proj.weight", "wq_b.weight", COLUMN), ("linear_kv_down_proj.weight", "wkv_a.weight", COLUMN),
        ("kv_layernorm.weight", "kv_a_norm.weight", REPLICATED), ("kv_layernorm.bias", "kv_a_norm.bias", REPLICATED),
        ("linear_kv_up_proj.weight", "wkv_b.weight", COLUMN))
}
# The Transformer Engine spec fuses each pre-norm into the linear layer that follows it.
TE_NAMES = {
    "decoder.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.{i}.input_layernorm.bias": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_bias",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.{i}.pre_mlp_layernorm.bias": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_bias",
}
# Every linear module but the router carries an `_extra_state` entry (FP8 metadata; we write None, which
# both megatron-core and Transformer Engine accept), and so does the Transformer Engine spec's core
# attention. Missing ones fail Megatron's strict load.
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj", "linear_q_down_proj",
           "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "eh_proj")
TE_EXTRA_STATE = "self_attention.core_attention"
SPECS = ("local", "te")
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # Megatron-LM's default; the padded vocabulary is a multiple of this * tp
# Values an architecture arg may take for our model to express it (None: absent, Megatron's default).
SUPPORTED_ARGS = {
    "position_embedding_type": ("rope", "yarn"), "normalization": ("RMSNorm", "LayerNorm", None),
    "softmax_type": ("vanilla", "learnable", None),  # off-by-one: a sink fixed at 0, not a parameter of ours
    "apply_layernorm_1p": (False, None),
    "virtual_pipeline_model_parallel_size": (None, 1),
    "experimental_attention_variant": (None,),  # e.g. DeepSeek-V3.2's sparse attention (dsa)
}
QUICK_GELU_ALPHA = 1.702  # megatron-core's quick_gelu: x * sigmoid(1.702 x), gpt-oss's swiglu_alpha
# Megatron's Llama-3 RoPE scaling takes only the factor; the rest is fixed in megatron-core.
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def megatron_rope_dims(head_dim: int, fraction: float) -> int:
    """The dims megatron-core's RotaryEmbedding rotates: the first int(head_dim * rotary_percent) of each head, in
    halves or (rotary_interleaved) pairs, as ours; an odd count it rounds up with frequencies over the odd width,
    where ours rotates the even count below (model.rope_dim)."""
    return int(head_dim * fraction) if fraction < 1.0 else head_dim


def _padded(vocab: int, tp: int) -> int:
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """A model at a (tp, pp, ep) layout: the sizes the splits need and which file holds what."""

    tp: int
    pp: int
    num_layers: int
    heads: int
    groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    ep: int = 1
    experts: int = 0
    etp: int = 1  # experts' tensor-parallel size (expert_tensor_parallel_size), dividing tp; `of` sets it
    latent: bool = False  # multi-head latent attention (LATENT_TO_NATIVE; its wq is no fused QKV's, nor a GQA one's)

    @classmethod
    def of(cls, cfg: ModelConfig, tp: int, pp: int, padded_vocab_size: Optional[int] = None, ep: int = 1,
           etp: Optional[int] = None) -> "Layout":
        """Refuses layouts Megatron cannot hold (megatron-core < 0.16 needs whole query groups per rank,
        and so do we; an expert's width is split over etp, by default tp, as the dense MLP's is)."""
        check_mtp_layout(cfg.mtp_layers, pp)
        if ep > 1 and not cfg.moe_experts:
            raise UsageError(f"--ep {ep} splits the experts of a mixture-of-experts model, and this model has none; drop --ep")
        if etp not in (None, tp) and not cfg.moe_experts:
            raise UsageError(f"--etp {etp} splits the experts of a mixture-of-experts model, and this model has none; drop --etp")
        if cfg.moe_ffn_bias and etp not in (None, 1):
            raise UsageError(f"--etp {etp}: megatron-core gives experts biases only at expert tensor parallelism 1 "
                             "(its TransformerConfig asserts it); use --etp 1")
        etp = (1 if cfg.moe_ffn_bias else tp) if etp is None else etp  # biased experts: whole experts per rank
        if etp < 1 or tp % etp:
            # A legacy file is named by its dense tp rank t and holds expert slice (rank % etp), which is t % etp
            # only when etp divides tp; otherwise files of different slices share a name (Megatron overwrites them).
            raise UsageError(f"expert tensor parallelism {etp} does not divide tp {tp}: Megatron's legacy files, named by "
                             f"the tp rank, cannot tell which expert slice they hold; use expert tensor parallelism 1 or {tp} (--etp)")
        for what, n, by, flag in (
                ("attention heads", cfg.num_heads, tp, "--tp"), ("kv heads (query groups)", cfg.num_kv_heads, tp, "--tp"),
                ("MLP width", cfg.ffn_hidden_size, tp, "--tp"), ("layers", cfg.num_layers, pp, "--pp"),
                ("expert width", cfg.moe_ffn_hidden_size or 0, etp, "--etp"),
                ("shared-expert width", cfg.moe_shared_ffn_hidden_size, tp, "--tp"),
                ("latent query rank", cfg.mla_q_lora_rank or 0, tp, "--tp"),
                ("latent key/value rank plus RoPE dims", cfg.mla_kv_lora_rank + cfg.mla_rope_head_dim, tp, "--tp"),
                ("experts", cfg.moe_experts, ep, "--ep")):
            if by < 1 or n % by:
                raise UsageError(f"{flag} {by} does not divide the model's {n} {what}; choose a {flag} that divides {n}")
        padded = padded_vocab_size or _padded(cfg.vocab_size, tp)
        if padded < cfg.vocab_size or padded % tp:
            raise UsageError(f"padded_vocab_size {padded} cannot hold the vocabulary of {cfg.vocab_size} split {tp} ways")
        return cls(tp, pp, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, padded,
                   ep, cfg.moe_experts, etp, cfg.attention == "mla")

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    @property
    def experts_per_rank(self) -> int:
        return self.experts // self.ep

    def files(self) -> list[tuple[int, int]]:
        """(tp rank, ep rank) of every file of one stage: megatron-core orders a stage's ranks tp fastest for the
        dense layers and etp fastest, then ep, for the experts, so rank r is tp rank r % tp, ep rank r // etp % ep
        (parallel_state.RankGenerator) and holds expert slice r % etp = t % etp. These pairs repeat every
        lcm(tp, etp * ep) ranks: every file Megatron-LM's loader asks for at any world size. At etp = tp, every
        (t, e); at etp = 1 ("parallel folding", tp2 ep2) only (0, 0) and (1, 1)."""
        return sorted({(r % self.tp, r // self.etp % self.ep) for r in range(math.lcm(self.tp, self.etp * self.ep))})

    def sources(self, entry: "Entry") -> list[tuple[int, int]]:
        """The files to read an entry's tensor-parallel slices from, in slice order: for tp slice t of a dense
        tensor any file (t, e); for etp slice s of an expert of ep rank e any file (t, e) with t % etp = s."""
        ranks = self.tp if entry.expert is None else self.etp
        files = self.files()
        return [next(f for f in files if f[0] % ranks == s and entry.ep_rank in (None, f[1])) for s in range(ranks)]

    def slicing(self, entry: "Entry") -> "Layout":
        """The layout `split` and `merge` take for an entry: tp = etp for expert tensors."""
        return self if entry.expert is None else dataclasses.replace(self, tp=self.etp)

    def shard_dir(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """Megatron-LM's get_checkpoint_name: the pp and ep suffixes appear only when that size is > 1."""
        return (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "")
                + (f"_{ep_rank:03d}" if self.ep > 1 else ""))


@dataclass(frozen=True)
class Entry:
    """One megatron-core tensor of one stage and the native tensors it holds."""

    key: str
    sources: tuple[str, ...]
    kind: str
    stage: int
    expert: Optional[int] = None  # an expert's tensor: its index in our stacked [E, ...] sources
    ep_rank: Optional[int] = None  # the expert-parallel rank whose files hold it; None: every rank's

    def part(self, tensor: torch.Tensor) -> torch.Tensor:
        """This entry's share of a native source tensor: one expert's slice, or the whole tensor."""
        return tensor if self.expert is None else tensor[self.expert]


def entries(shapes: dict, layout: Layout, spec: str, tied: bool) -> list[Entry]:
    """Every tensor Megatron stores for a model whose native state-dict shapes are `shapes`, experts in
    order. A tied head is stored only when pipelining: megatron-core's last stage keeps its own copy of
    the embedding."""
    out = []
    decoder = [(TE_NAMES.get(template, template) if spec == "te" else template, sources, kind) for template, (sources, kind)
               in [*MEGATRON_TO_NATIVE.items(), *(LATENT_TO_NATIVE.items() if layout.latent else ())]]
    for name, sources, kind in [*decoder, *mtp_templates(decoder, REPLICATED, COLUMN)]:
        mtp = name.startswith("mtp.")  # on the last stage, numbered 0..D-1 there
        for i in range(mtp_depths(shapes) if mtp else layout.num_layers) if "{i}" in name else [None]:
            names = tuple(s.format(i=i) for s in sources)
            # all its sources: latent attention's one query projection wq is no fused QKV's first part
            if any(n not in shapes for n in names) or (name == "output_layer.weight" and tied and layout.pp == 1):
                continue
            if i is None:
                stage = 0 if name.startswith("embedding.") else layout.pp - 1
                out.append(Entry(name, names, kind, stage))
                continue
            stage, local = (layout.pp - 1, i) if mtp else divmod(i, layout.layers_per_stage)
            if "{l}" not in name:
                out.append(Entry(name.format(i=local), names, kind, stage))
                continue
            for e in range(layout.experts):
                ep_rank, slot = divmod(e, layout.experts_per_rank)  # global expert = ep_rank * E/ep + local slot
                out.append(Entry(name.format(i=local, l=slot), names, kind, stage, e, ep_rank))
    return out


def held_by(all_entries: list[Entry], stage: int, ep_rank: int) -> list[Entry]:
    """The entries one file holds: its stage's tensors, the experts only of its expert-parallel rank."""
    return [e for e in all_entries if e.stage == stage and e.ep_rank in (None, ep_rank)]


def extra_state_keys(stage_entries: list[Entry], layout: Layout, stage: int, spec: str) -> list[str]:
    """The `_extra_state` keys of one file whose tensors are `stage_entries`."""
    modules = dict.fromkeys(e.key.rsplit(".", 1)[0] for e in stage_entries if e.key.rsplit(".", 2)[-2] in LINEARS)
    if spec == "te":
        modules.update(dict.fromkeys(f"decoder.layers.{i}.{TE_EXTRA_STATE}" for i in range(layout.layers_per_stage)))
        modules.update(dict.fromkeys(e.key.split(".transformer_layer.")[0] + f".transformer_layer.{TE_EXTRA_STATE}"
                                     for e in stage_entries if ".transformer_layer." in e.key))
    if stage == layout.pp - 1:
        modules["output_layer"] = None
    return [f"{m}._extra_state" for m in modules]


def split(entry: Entry, parts: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """Whole native tensors -> one tensor per TP rank, each with storage of its own (see own_storage)."""
    tp, kind = layout.tp, entry.kind
    if kind == REPLICATED:
        return [parts[0]] * tp
    if kind == ROW:
        return [c.contiguous() if tp > 1 else c for c in parts[0].chunk(tp, dim=1)]
    if kind == COLUMN:
        return list(parts[0].chunk(tp))
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
    if kind == COLUMN:
        return [torch.cat(shards) if len(shards) > 1 else shards[0]]
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
    if cfg.attention == "mla" and spec == "te":
        raise UsageError("--megatron-spec te fuses latent attention's norms into its up projections, names we do not "
                         "write: use --megatron-spec local")
    if cfg.attention != "mla" and scaling is not None and scaling["rope_type"] != "yarn" and (
            scaling["rope_type"] != "llama3" or {k: float(scaling[k]) for k in MEGATRON_LLAMA3} != MEGATRON_LLAMA3):
        raise UsageError(f"Megatron-LM cannot express model.rope_scaling={scaling!r}: its RoPE scaling is YaRN or "
                         f"Llama-3's with {MEGATRON_LLAMA3} fixed; convert to native or hf instead")
    if cfg.attention != "mla" and cfg.position == "rope" and megatron_rope_dims(cfg.head_dim, cfg.rope_fraction) % 2:
        raise UsageError(f"Megatron-LM cannot express model.rope_fraction={cfg.rope_fraction} of head_dim {cfg.head_dim}: "
                         f"it would rotate {megatron_rope_dims(cfg.head_dim, cfg.rope_fraction)} dims, an odd count, "
                         f"with other frequencies than our {cfg.rope_dim}; convert to native or hf instead")
    if cfg.moe_experts and spec == "te":
        raise UsageError("--megatron-spec te has no mixture-of-experts names we write (its experts are grouped Transformer "
                         "Engine modules): use --megatron-spec local")
    check_linear_biases(cfg)
    if cfg.mlp == "swiglu_clamped" and cfg.swiglu_alpha != QUICK_GELU_ALPHA:
        raise UsageError(f"Megatron-LM cannot express model.swiglu_alpha={cfg.swiglu_alpha}: its clamped SwiGLU is "
                         f"quick_gelu, x * sigmoid({QUICK_GELU_ALPHA} x); convert to native or hf instead")
    extra = {**moe_args(cfg, layout), **mla_args(cfg)}
    if cfg.attention != "mla":
        extra.update(yarn_args(cfg))
    args = argparse.Namespace(**{**vars(_args(cfg, layout, dtype, spec)), **window_args(cfg), **extra})
    # Every field must survive a read back: what Megatron cannot express is refused here, by name.
    read_back = model_config_from_args(args)
    back = dataclasses.asdict(read_back)
    back["scaled_init"] = cfg.scaled_init  # an init choice Megatron records elsewhere
    back["moe_aux_loss_scope"] = cfg.moe_aux_loss_scope  # the model scope writes as the layer scope (_load_balancing_type)
    # Megatron's drop shards are its run's tp with sequence parallelism: written as such where they are (the
    # writer notes where not).
    back["moe_capacity_sequence_shards"] = cfg.moe_capacity_sequence_shards
    if moe_pattern(read_back) == moe_pattern(cfg):  # the same layers sparse, however the fields say it
        back.update(moe_layer_freq=cfg.moe_layer_freq, moe_dense_layers=cfg.moe_dense_layers)
    if not dense_mlps(cfg):  # add_bias_linear says nothing of MLPs the model does not have
        back.update(mlp_bias=cfg.mlp_bias, linear_bias=cfg.linear_bias)
    if windows(read_back) == windows(cfg):  # the same layers sliding, however the fields say it
        back.update(layer_types=cfg.layer_types, sliding_window=cfg.sliding_window)
    if _same_rotation(read_back, cfg):  # the same frequencies and factor, optional keys given or left to defaults
        back["rope_scaling"] = cfg.rope_scaling
    for key, value in dataclasses.asdict(cfg).items():
        if back[key] != value:
            raise UsageError(f"Megatron-LM cannot express model.{key}={value!r}; convert to native or hf instead")
    return args


def _same_rotation(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs' RoPE scalings give the same inverse frequencies and attention factor, bit for bit."""
    if (a.rope_scaling is None) != (b.rope_scaling is None):
        return False
    (fa, af_a), (fb, af_b) = (rope_frequencies(c.rope_dim, c.rope_theta, c.rope_scaling, c.max_seq_len) for c in (a, b))
    return af_a == af_b and torch.equal(fa, fb)


def _args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, spec: str) -> argparse.Namespace:
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    llama3 = scaling is not None and scaling["rope_type"] == "llama3"  # YaRN: yarn_args
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
        apply_layernorm_1p=False, qk_layernorm=cfg.qk_norm,
        # SwiGLU, or gpt-oss's clamped one: quick_gelu(min(g, c)) * (clamp(u, -c, c) + 1) (megatron-core's MLP glu)
        swiglu=cfg.mlp != "swiglu_clamped", quick_geglu=cfg.mlp == "swiglu_clamped",
        glu_linear_offset=1.0 if cfg.mlp == "swiglu_clamped" else 0.0,
        activation_func_clamp_value=cfg.swiglu_limit if cfg.mlp == "swiglu_clamped" else None,
        softmax_type="learnable" if cfg.attention_sinks else "vanilla",  # sinks: DotProductAttention's softmax_offset
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=False,
        rotary_base=int(theta) if float(theta).is_integer() else theta, rotary_percent=cfg.rope_fraction,
        rotary_interleaved=cfg.rope_interleaved,
        use_rope_scaling=llama3, rope_scaling_factor=float(scaling["factor"]) if llama3 else 8.0,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        add_bias_linear=cfg.out_bias, add_qkv_bias=cfg.qkv_bias,
        mtp_num_layers=cfg.mtp_layers or None, mtp_loss_scaling_factor=cfg.mtp_loss_coeff,
        init_method_std=cfg.init_std, hidden_dropout=0.0, attention_dropout=0.0,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True,
        transformer_impl="transformer_engine" if spec == "te" else "local",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type=None, ckpt_format="torch", use_dist_ckpt=False,
    )


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The inverse of megatron_args, for any Megatron-LM GPT checkpoint; refuses what our model lacks."""
    args = as_built(args)
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
        if arg("use_rope_scaling") else yarn_scaling(args) if arg("position_embedding_type") == "yarn" else None
    )
    head_dim, fraction = arg("kv_channels") or args.hidden_size // heads, float(arg("rotary_percent") or 1.0)
    if 0 < fraction < 1 and megatron_rope_dims(head_dim, fraction) % 2:
        raise UsageError(f"Megatron checkpoint has rotary_percent={fraction}: it rotates "
                         f"{megatron_rope_dims(head_dim, fraction)} of kv_channels {head_dim}, an odd count, with "
                         "frequencies our rotation (an even count) has no equal for")
    fields = dict(
        vocab_size=arg("vocab_size") or args.padded_vocab_size,  # Megatron-LM itself does not always record it
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=heads, num_kv_heads=groups,
        head_dim=head_dim,
        ffn_hidden_size=arg("ffn_hidden_size") or 4 * args.hidden_size, **_mlp_config(args),
        attention_sinks=arg("softmax_type") == "learnable",
        norm="rmsnorm" if arg("normalization") == "RMSNorm" else "layernorm", norm_eps=arg("norm_epsilon", 1e-5),
        max_seq_len=arg("max_position_embeddings") or args.seq_length, rope_theta=float(arg("rotary_base", 10000)),
        rope_scaling=scaling, rope_fraction=fraction, rope_interleaved=bool(arg("rotary_interleaved")),
        qk_norm=bool(arg("qk_layernorm")), qkv_bias=bias or bool(arg("add_qkv_bias")),
        linear_bias=bias, tie_embeddings=not arg("untie_embeddings_and_output_weights", False),
        init_std=arg("init_method_std", 0.02), **moe_config(args), **window_config(args),
        mtp_layers=arg("mtp_num_layers") or 0, mtp_loss_coeff=float(arg("mtp_loss_scaling_factor", 0.1)),
    )
    fields = {**fields, **latent_config(args)}
    if fields.get("moe_experts") and not dense_mlps(ModelConfig(**fields)):
        fields["mlp_bias"] = False  # no MLP to hold one: the form our tables give an all-MoE model with biases
    return ModelConfig(**fields)


def _mlp_config(args: argparse.Namespace) -> dict:
    """model.mlp (and the clamped SwiGLU's fields) from Megatron-LM's activation args, or UsageError."""
    offset, clamp = getattr(args, "glu_linear_offset", None) or 0.0, getattr(args, "activation_func_clamp_value", None)
    if getattr(args, "quick_geglu", False):
        if offset != 1.0 or clamp is None:
            raise UsageError(f"Megatron checkpoint has quick_geglu with glu_linear_offset={offset} and "
                             f"activation_func_clamp_value={clamp}: ours is gpt-oss's, offset 1.0 and a clamp")
        return dict(mlp="swiglu_clamped", swiglu_alpha=QUICK_GELU_ALPHA, swiglu_limit=float(clamp))
    if not getattr(args, "swiglu", False) or offset != 0.0 or clamp is not None:
        raise UsageError(f"Megatron checkpoint has swiglu={getattr(args, 'swiglu', None)!r} (glu_linear_offset={offset}, "
                         f"activation_func_clamp_value={clamp}): we read SwiGLU or gpt-oss's clamped quick GeGLU")
    return dict(mlp="swiglu")
