"""megatron-core's own GPTModel on CPU, built from the `args` a Megatron checkpoint carries: the reference
our Megatron shards must load into with strict=True, and (at tp=pp=ep=1) run forward.

World size 1 cannot hold a tp=2 group, but GPTModel (megatron-core 0.16) asks its process groups only
for their size and rank while it allocates parameters. So each shard's model is built from the real
args (tp, pp and all) with stand-in tp and pp groups that report that shard's (size, rank): its
parameters then have exactly the shapes, names and local layer numbers megatron-core gives that rank.
A mixture-of-experts model gets stand-in expert groups the same way (ep, and expert tp: etp), and the
decoder block spec pretrain_gpt.py builds for it (dense and MoE layers by moe_layer_freq). gpt-oss's pieces come
from the args as Megatron-LM turns them into a config: quick_geglu's activation, and the yarn_* attributes set on
the config, which GPTModel reads with getattr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_llm.checkpoint.megatron_attention import YARN_ARGS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.fusions import fused_softmax
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.post_training.modelopt.gpt.state_dict_hooks import mcore_gpt_load_te_state_dict_pre_hook
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig


@contextlib.contextmanager
def megatron_core_world():
    """A gloo group of one and megatron-core's parallel state over it (GPTModel reads it when built)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class RankInGroup:
    """Stands in for a tp or pp process group: GPTModel only asks its size and this rank's place in it."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def transformer_config_from_args(args) -> TransformerConfig:
    """As Megatron-LM's core_transformer_config_from_args: every field named like an arg is copied (of
    MLATransformerConfig with multi_latent_attention, rope_type None left to its default), then the renamed
    and derived ones; use_cpu_initialization is the one setting of our own (no GPU)."""
    config_class = MLATransformerConfig if getattr(args, "multi_latent_attention", False) else TransformerConfig
    names = {f.name for f in dataclasses.fields(config_class)}
    kw = {name: value for name, value in vars(args).items() if name in names and not (name == "rope_type" and value is None)}
    kw.update(
        layernorm_epsilon=args.norm_epsilon,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        pipeline_dtype=args.params_dtype,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        num_moe_experts=getattr(args, "num_experts", None),
        use_cpu_initialization=True,
    )
    if args.swiglu:
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    if getattr(args, "quick_geglu", False):  # gpt-oss's clamped SwiGLU, with glu_linear_offset and the clamp value
        kw.update(activation_func=quick_gelu, gated_linear_unit=True)
    config = config_class(**kw)
    # YaRN's settings are no TransformerConfig fields: GPTModel and attention read them with getattr (Megatron-LM's
    # --enable-gpt-oss and Megatron-Bridge set them on the config the same way)
    for name in YARN_ARGS:
        if hasattr(args, name):
            setattr(config, name, getattr(args, name))
    return config


def gpt_model(args, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> GPTModel:
    """The GPTModel of pretrain_gpt.py's model_provider, as TP rank tp_rank of PP stage pp_rank (and EP
    rank ep_rank) holds it."""
    tp, ep = args.tensor_model_parallel_size, getattr(args, "expert_model_parallel_size", 1) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp  # a rank holds expert slice tp_rank % etp
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp = RankInGroup(tp, tp_rank)
    groups.expt_tp = RankInGroup(etp, tp_rank % etp)
    groups.pp = RankInGroup(args.pipeline_model_parallel_size, pp_rank)
    groups.ep = RankInGroup(ep, ep_rank)
    groups.tp_ep = RankInGroup(etp * ep, ep_rank * etp + tp_rank % etp)
    # The embedding group only all-reduces the tied head's initial copy between first and last stage (on
    # CUDA); megatron-core's documented way to go without it is None. The weights come from the shard.
    groups.embd = None
    config = transformer_config_from_args(args)
    if config.num_moe_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                          pp_rank=pp_rank)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization,
                                        multi_latent_attention=config.multi_latent_attention)
    # Multi-token prediction: megatron-core's MTP block of the decoder's last layer spec, on the last stage
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, pp_rank=pp_rank) if config.mtp_num_layers else None
    # A module built without a tp group (MLA's linear_q_proj) takes megatron-core's default one, the run's tp group.
    default_tp = (parallel_state, "get_tensor_model_parallel_group", lambda *a, **k: groups.tp)
    with patched([CPU_DEVICE, default_tp, *LATENT_ATTENTION]), grouped_gemm_on_cpu():
        return GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pp_rank == 0, post_process=pp_rank == args.pipeline_model_parallel_size - 1,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
            pg_collection=groups, mtp_block_spec=mtp,
        )


def te_to_local_names(state: dict) -> dict:
    """megatron-core's own rewrite of Transformer Engine spec names into the local spec's (the hook
    modelopt registers), minus core_attention's extra state, a Transformer Engine module of its own."""
    state = {k: v for k, v in state.items() if not k.endswith("core_attention._extra_state")}
    mcore_gpt_load_te_state_dict_pre_hook(state, "", {}, True, [], [], [])
    return state


@contextlib.contextmanager
def patched(patches: list):
    """Sets each (owner, name, value) for the duration, then restores it (removes it when it was absent)."""
    missing = object()
    saved = [(owner, name, owner.__dict__.get(name, missing)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


# RoPE's table and the router's expert-bias buffers go to torch.cuda.current_device(), even in a CPU model.
CPU_DEVICE = (torch.cuda, "current_device", lambda: "cpu")


def _latent_core_attention(init):
    """megatron-core 0.16.1's MLASelfAttention builds its core attention with k_channels (q_head_dim) and v_channels
    (v_head_dim), which only Transformer Engine's attention takes: the local spec's DotProductAttention raises
    TypeError, so no MLA GPTModel of the local spec can be built as shipped. Its forward already takes any query/key
    width (softmax_scale comes from MLA) and the values' own width; only the output's size, heads x v_channels,
    comes from the constructor. This takes the two and sets that size; the arithmetic stays DotProductAttention's."""
    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        init(self, *args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

    return __init__


# multi_latent_attention.py imports Transformer Engine's names from megatron-core's extension module, which without
# Transformer Engine defines them as MagicMocks (no ImportError), so it sets HAVE_TE and then fails isinstance(x,
# TELinear); the extension module's own HAVE_TE is False, as it is here.
LATENT_ATTENTION = [(DotProductAttention, "__init__", _latent_core_attention(DotProductAttention.__init__)),
                    (multi_latent_attention, "HAVE_TE", False)]


def _gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """grouped_gemm.ops.gmm by its definition: rows of a, batch_sizes[i] at a time, times b[i] (or b[i].T)."""
    parts = a.split(batch_sizes.tolist())
    return torch.cat([part @ (b[i].T if trans_b else b[i]) for i, part in enumerate(parts)])


def grouped_gemm_on_cpu():
    """The legacy GroupedMLP (moe_grouped_gemm) without the grouped_gemm CUDA package: the availability
    check passes and gmm is _gmm."""
    from megatron.core.transformer.moe import grouped_gemm_util

    return patched([(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None),
                    (grouped_gemm_util, "ops", types.SimpleNamespace(gmm=_gmm))])


def forward_on_cpu():
    """megatron-core's forward asks CUDA even in a CPU model: the current device (CPU_DEVICE), and core
    attention and the MoE layer fork the CUDA RNG tracker (for dropout and router noise, both off here):
    the forks become no-ops. The router's gating reads a Transformer Engine gemm whose import failed
    without defining the name: None selects its own torch.mm fallback. A sliding-window layer builds its mask
    on "cuda" (_sliding_window_causal_mask builds the same on the CPU). The arithmetic is untouched."""
    from megatron.core.transformer.moe import moe_utils

    tracker = lambda *a, **k: types.SimpleNamespace(fork=contextlib.nullcontext)  # noqa: E731
    return patched([CPU_DEVICE, (tensor_parallel, "get_cuda_rng_tracker", tracker),
                    (fused_softmax, "get_sliding_window_causal_mask", _sliding_window_causal_mask),
                    (moe_utils, "get_cuda_rng_tracker", tracker),
                    (moe_utils, "te_general_gemm", getattr(moe_utils, "te_general_gemm", None))])


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple) -> torch.Tensor:
    """megatron-core's get_sliding_window_causal_mask (transformer/utils.py), which builds its mask on "cuda", on
    the CPU: True where a query may not see a key, i.e. outside [i - left, i + right] (offset by skv - sq)."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s, padded vocab], with an explicit causal mask (the default one is built on CUDA)."""
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with forward_on_cpu(), torch.no_grad():
        return model(tokens, torch.arange(s)[None].expand_as(tokens), mask)
