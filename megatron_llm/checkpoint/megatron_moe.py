"""Mixture of experts in Megatron-LM's args, both directions: our router, experts, shared experts, dense layers,
capacity and router losses <-> num_experts, moe_* and the load-balancing type (megatron-core's TopKRouter,
MoELayer, and Megatron-LM's _add_moe_args); add_bias_linear's rule for the router's and the experts' biases. The
tensor names are megatron.py's MEGATRON_TO_NATIVE."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Optional

from megatron_llm.config import ModelConfig
from megatron_llm.errors import UsageError

if TYPE_CHECKING:
    from megatron_llm.checkpoint.megatron import Layout

# How each load-balancing type of Megatron-LM maps to (model.moe_aux_loss_scope, model.moe_aux_loss_global); the
# rest, and a list of types (several losses at once), have no equal here. The first of each pair is the one written.
LOAD_BALANCING = {"aux_loss": ("layer", False), "seq_aux_loss": ("sequence", False), "global_aux_loss": ("layer", True),
                  "none": ("layer", False)}


def moe_pattern(cfg: ModelConfig) -> list[int]:
    """1 for each mixture-of-experts layer, 0 for each dense one (Megatron-LM's list form of moe_layer_freq)."""
    return [int(cfg.layer(i).moe) for i in range(cfg.num_layers)]


def moe_args(cfg: ModelConfig, layout: Layout) -> dict:
    """The MoE fields of Megatron-LM's args (num_experts None: a dense model)."""
    if not cfg.moe_experts:
        return dict(num_experts=None)
    pattern = moe_pattern(cfg)
    return dict(
        num_experts=cfg.moe_experts, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size, moe_router_topk=cfg.moe_top_k,
        moe_layer_freq=1 if all(pattern) else pattern,  # an int N means layers 0, N, 2N, ...: not ours
        moe_shared_expert_intermediate_size=cfg.moe_shared_ffn_hidden_size or None,
        moe_shared_expert_gate=cfg.moe_shared_gate,
        **_router_args(cfg),
        moe_router_bias_update_rate=cfg.moe_bias_update_rate,
        moe_router_load_balancing_type=_load_balancing_type(cfg),
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_z_loss_coeff=cfg.moe_z_loss_coeff or None,
        # Both drop policies keep what megatron-core's apply_router_token_dropping keeps on CUDA (ties to the
        # earliest token, sequence-major) and where they still differ: model/moe_capacity.py.
        moe_expert_capacity_factor=cfg.moe_capacity_factor, moe_token_drop_policy=cfg.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=False,
        # megatron-core drops per tp rank's sequence shard under sequence parallelism (model/moe_capacity.py)
        sequence_parallel=cfg.moe_capacity_factor is not None and cfg.moe_capacity_sequence_shards == layout.tp > 1,
        moe_grouped_gemm=False, expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
    )


def dense_mlps(cfg: ModelConfig) -> bool:
    """Whether the model has an MLP outside its routed experts: a dense layer or shared experts."""
    return not cfg.moe_experts or cfg.moe_shared_ffn_hidden_size > 0 or not all(moe_pattern(cfg))


def check_linear_biases(cfg: ModelConfig) -> None:
    """Megatron-LM's add_bias_linear is one switch for every linear layer but the fused QKV: our biases on the
    attention output, the router, the experts and any dense MLP must be all on or all off, and off with shared
    experts."""
    if not cfg.moe_experts:
        return
    pieces = {"out_bias": cfg.out_bias, "moe_router_bias": cfg.moe_router_bias, "moe_ffn_bias": cfg.moe_ffn_bias,
              **({"mlp_bias": cfg.mlp_bias} if dense_mlps(cfg) else {})}
    if cfg.moe_shared_ffn_hidden_size and cfg.out_bias:
        raise UsageError("Megatron-LM's add_bias_linear also gives every expert biases, and megatron-core's shared "
                         "experts refuse them (SharedExpertMLP asserts add_bias_linear False): this model has "
                         "model.out_bias=True and shared experts; convert to native or hf instead")
    if len(set(pieces.values())) > 1:
        have = ", ".join(f"model.{k}={v}" for k, v in pieces.items())
        raise UsageError("Megatron-LM's add_bias_linear also gives every expert biases, the router one, the attention "
                         f"output and dense MLPs theirs, all or none: this model has {have}; convert to native or hf instead")


def _load_balancing_type(cfg: ModelConfig) -> str:
    """Megatron-LM's name for our router losses: the model scope trains as the layer scope there (Megatron
    takes every loss per layer)."""
    scope = "layer" if cfg.moe_aux_loss_scope == "model" else cfg.moe_aux_loss_scope
    return next(name for name, ours in LOAD_BALANCING.items() if ours == (scope, cfg.moe_aux_loss_global))


def drop_shards_note(cfg: ModelConfig, tp: int) -> Optional[str]:
    """One line when a Megatron-LM run continued at `tp` cannot drop tokens per our sequence shards."""
    shards = cfg.moe_capacity_sequence_shards
    if not cfg.moe_experts or cfg.moe_capacity_factor is None or shards == tp:
        return None
    megatron = f"per {tp} with --sequence-parallel, per 1 without" if tp > 1 else "per 1 (no sequence parallelism at tp 1)"
    return (f"note: this model drops tokens per {shards} sequence shard(s) (model.moe_capacity_sequence_shards); "
            f"Megatron-LM continued at tp {tp} drops {megatron}")


def _router_args(cfg: ModelConfig) -> dict:
    """Our router as megatron-core's topk_routing_with_score_function computes it: softmax then top-k is
    softmax(pre_softmax) without renormalising, top-k of the logits then softmax over the k is our
    renormalised softmax; sigmoid renormalises exactly when k > 1; the expert bias only with sigmoid;
    groups ranked by the sum of their top (topk / group_topk) scores, ours by their top moe_group_rank_top."""
    def refuse(what: str) -> UsageError:
        return UsageError(f"Megatron-LM cannot express {what}; convert to native or hf instead")

    pre_softmax = cfg.moe_score == "softmax" and not cfg.moe_renormalize
    if cfg.moe_score == "softmax" and cfg.moe_expert_bias:
        raise refuse("model.moe_expert_bias with model.moe_score softmax (its expert bias needs sigmoid scores)")
    if cfg.moe_score == "softmax" and cfg.moe_renormalize and cfg.moe_top_k == 1:
        raise refuse("a renormalised softmax router with model.moe_top_k 1 (it requires pre-softmax routing at k=1)")
    if cfg.moe_score == "sigmoid" and cfg.moe_renormalize != (cfg.moe_top_k > 1):
        raise refuse(f"model.moe_renormalize={cfg.moe_renormalize} with sigmoid scores at model.moe_top_k "
                     f"{cfg.moe_top_k} (its sigmoid router renormalises exactly when top-k > 1)")
    if not _groups_rank_as_ours(cfg.moe_groups, cfg.moe_topk_groups, cfg.moe_top_k, cfg.moe_score, pre_softmax,
                                cfg.moe_group_rank_top):
        raise refuse(f"model.moe_groups {cfg.moe_groups} with model.moe_topk_groups {cfg.moe_topk_groups}, top-k "
                     f"{cfg.moe_top_k} and model.moe_group_rank_top {cfg.moe_group_rank_top} (it ranks groups by their"
                     " top top_k/topk_groups scores, of the logits for a renormalised softmax)")
    grouped = cfg.moe_groups > 1
    return dict(
        moe_router_score_function=cfg.moe_score, moe_router_pre_softmax=pre_softmax,
        moe_router_enable_expert_bias=cfg.moe_expert_bias,
        moe_router_num_groups=cfg.moe_groups if grouped else None,
        moe_router_group_topk=cfg.moe_topk_groups if grouped else None,
        moe_router_topk_scaling_factor=cfg.moe_routed_scale if cfg.moe_routed_scale != 1.0 else None,
    )


def _groups_rank_as_ours(groups: int, group_topk: int, topk: int, score: str, pre_softmax: bool, rank_top: int) -> bool:
    """Whether megatron-core's group-limited routing picks the groups ours does: it ranks a group by the sum of
    its top topk / group_topk scores (of the logits for a renormalised softmax), ours by its top rank_top scores."""
    return groups <= 1 or (topk // group_topk == rank_top and (score != "softmax" or pre_softmax))


def moe_config(args: argparse.Namespace) -> dict:
    """The inverse of moe_args: ModelConfig's MoE fields, or UsageError naming what our MoE lacks."""
    def arg(name, default=None):
        value = getattr(args, name, default)
        return default if value is None else value

    def refuse(name: str, why: str) -> UsageError:
        return UsageError(f"Megatron checkpoint has {name}={getattr(args, name, None)!r}: {why}")

    experts = arg("num_experts")
    if not experts:
        return {}
    if arg("add_bias_linear", True) and arg("moe_shared_expert_intermediate_size"):
        raise refuse("add_bias_linear", "with shared experts, which megatron-core builds without biases (SharedExpertMLP "
                     "asserts add_bias_linear False), so no Megatron-LM run holds it")
    balancing = arg("moe_router_load_balancing_type", "aux_loss")
    if not isinstance(balancing, str) or balancing not in LOAD_BALANCING:
        raise refuse("moe_router_load_balancing_type", f"we read only one of {', '.join(LOAD_BALANCING)} (our router "
                     "losses); convert it with Megatron-LM's own tools")
    scope, balance_global = LOAD_BALANCING[balancing]
    padded = arg("moe_expert_capacity_factor") is not None and arg("moe_pad_expert_input_to_capacity")
    if padded and arg("moe_router_enable_expert_bias"):
        raise refuse("moe_pad_expert_input_to_capacity", "its expert-bias update counts the padding (every expert at "
                     "capacity), ours the kept assignments; convert it with the padding off")
    score, topk, pre_softmax = arg("moe_router_score_function", "softmax"), arg("moe_router_topk", 2), arg("moe_router_pre_softmax", False)
    groups, group_topk = (arg("moe_router_num_groups"), arg("moe_router_group_topk")) if arg("moe_router_group_topk") else (1, 1)
    rank_top = topk // group_topk if groups > 1 else ModelConfig.moe_group_rank_top
    if not _groups_rank_as_ours(groups, group_topk, topk, score, pre_softmax, rank_top) or rank_top < 1:
        raise refuse("moe_router_group_topk", "our group-limited routing ranks groups by the sum of their best "
                     "moe_router_topk / moe_router_group_topk (at least 1) sigmoid or pre-softmax scores")
    freq = arg("moe_layer_freq", 1)
    pattern = [int(i % freq == 0) for i in range(args.num_layers)] if isinstance(freq, int) else list(freq)
    if len(pattern) != args.num_layers or not any(pattern):
        raise refuse("moe_layer_freq", f"it names no mixture-of-experts layer of the {args.num_layers}")
    # Ours: layer i is sparse when (i + 1) % moe_layer_freq == 0 and i is not in moe_dense_layers. Dense first layers
    # then sparse ones read as that (DeepSeek's first_k_dense_replace, which the tables write), not as a step ([0, 1]
    # would read as moe_layer_freq 2).
    first_dense = pattern == sorted(pattern)
    step = 1 if first_dense else math.gcd(*(i + 1 for i, sparse in enumerate(pattern) if sparse))
    shared = arg("moe_shared_expert_intermediate_size", 0)
    factor, tp = arg("moe_expert_capacity_factor"), arg("tensor_model_parallel_size", 1)
    return dict(
        moe_experts=experts, moe_top_k=topk, moe_ffn_hidden_size=arg("moe_ffn_hidden_size") or args.ffn_hidden_size,
        moe_score=score, moe_renormalize=not pre_softmax if score == "softmax" else topk > 1,
        moe_routed_scale=float(arg("moe_router_topk_scaling_factor", 1.0)), moe_groups=groups, moe_topk_groups=group_topk,
        moe_group_rank_top=rank_top,
        moe_expert_bias=bool(arg("moe_router_enable_expert_bias")), moe_bias_update_rate=arg("moe_router_bias_update_rate", 1e-3),
        moe_shared_ffn_hidden_size=shared, moe_shared_gate=bool(shared and arg("moe_shared_expert_gate")),
        moe_layer_freq=step, moe_dense_layers=[i for i, sparse in enumerate(pattern) if not sparse and (i + 1) % step == 0],
        # moe_pad_expert_input_to_capacity adds to each expert's input the tokens not routed to it, up to its
        # capacity, with weight 0: the kept routed assignments, outputs and gradients are these, so it reads as ours.
        moe_capacity_factor=factor, moe_token_drop_policy=arg("moe_token_drop_policy", "probs"),
        # With sequence parallelism each tp rank routes, and drops, its own s / tp positions.
        moe_capacity_sequence_shards=tp if factor is not None and arg("sequence_parallel") and tp > 1 else 1,
        moe_aux_loss_coeff=float(arg("moe_aux_loss_coeff", 0.0)), moe_z_loss_coeff=float(arg("moe_z_loss_coeff", 0.0)),
        # Megatron-LM takes its router losses per layer, so training continues as it did (and with pp > 1).
        moe_aux_loss_scope=scope, moe_aux_loss_global=balance_global,
        # add_bias_linear gives the router's logits and every expert's projections biases too
        moe_router_bias=bool(arg("add_bias_linear", True)), moe_ffn_bias=bool(arg("add_bias_linear", True)),
    )
