"""Expert parallelism against one process, through the real entry point: one chain of multi-process runs,
each resuming from the checkpoint of the one before at another layout, reproduces a single-process run
step for step (losses, per-channel sums, validation losses, logged router losses, parameters), with the
tolerances of test_parallel.py. Layouts: ep 2 over dp 2 with FSDP2 (the experts in no data-parallel unit),
ep 2 x tp 2 with sequence parallelism and DDP, ep 2 x pp 2, ep 2 over dp 4 with FSDP2 (experts sharded over
the two ranks holding the same ones), then tp 2 x pp 2 at ep 1: a checkpoint written at ep 2 resumes at ep 1.
The tp links split every expert's inner width over tp (slices over (ep, tp) at ep 2 x tp 2; sequence parallelism
on in one, off in the other), the shared experts like the dense MLP.
The model is DeepSeek-V3's shape, multi-head latent attention with low-rank queries, so the tp links also check
MLA's tensor-parallel plan (heads split, the compressed projections and their norms replicated). A one-link chain
takes MLA's single query projection (no low-rank q) and the expert slices through tp 2 x FSDP2 dp 2 with sp; another
a sigmoid router with MiniMax-M2's softmax balance loss and Llama 4's router-weighted expert inputs through
pp 2 x dp 2 x ep 2. The short chains average the routed and shared experts (Cohere2-MoE).
"""

from __future__ import annotations

import pytest

from conftest import ROOT
from megatron_llm.config import load_config
from megatron_llm.errors import UsageError
from megatron_llm.parallel.dims import check_layout
from test_parallel import LOSS_RTOL, check_chain, overrides

# A MoE model whose every option that crosses ranks is on: a dense first layer, shared experts with a
# gate, the expert bias moved by the global load after each step, and both router losses per layer (so
# they work across pipeline stages) with f over the global micro-batch (so a data-parallel rank's loss
# averages to that of the whole micro-batch, which the single process routes at once). gpt-oss's pieces too: the
# router's bias, the experts' biases (split along E over ep and, w1's and w3's, along the inner width over tp; w2's
# added once over the tp ranks' partial sums) and the clamped SwiGLU in the experts and the dense MLPs.
# DeepSeek-V3's routed scale 2.5 makes the routed experts' share of the output large enough that a tp slice's
# missing sum shows: without the sum over tp of the expert rows' gradient the tp2-ep2 link's step-3 loss is off
# by 4.4e-5 relative (1.6e-5 at scale 1, tolerance 1e-5).
MOE = dict(model__moe_experts=4, model__moe_top_k=2, model__moe_ffn_hidden_size=32, model__moe_dense_layers="[0]",
           model__moe_shared_ffn_hidden_size=32, model__moe_shared_gate=True, model__moe_expert_bias=True,
           model__moe_bias_update_rate=0.01, model__moe_aux_loss_coeff=0.1, model__moe_z_loss_coeff=0.01,
           model__moe_routed_scale=2.5,
           model__moe_aux_loss_scope="layer", model__moe_aux_loss_global=True,
           model__moe_router_bias=True, model__moe_ffn_bias=True, model__mlp="swiglu_clamped",
           model__attention="mla", model__mla_q_lora_rank=48, model__mla_kv_lora_rank=32, model__mla_rope_head_dim=8,
           model__mla_v_head_dim=16)
EP_CHAIN = [
    ("dp2-ep2-fsdp", 1, 1, 2, dict(parallel__ep=2)),
    ("tp2-dp2-ep2-sp-ddp", 2, 1, 2, dict(parallel__ep=2, parallel__sp=True, parallel__data_parallel="ddp")),
    ("pp2-dp2-ep2", 1, 2, 2, dict(parallel__ep=2)),
    ("dp4-ep2-fsdp", 1, 1, 4, dict(parallel__ep=2)),
    ("tp2-pp2-ep1", 2, 2, 1, {}),
]
# The two short chains also take Cohere2-MoE's average of the routed and shared experts' outputs, through tp's
# partial sums in one and ep in the other. (Not in the long chain: there it put one token's top-2 choice 6.6e-7
# from its third at step 7, where the runs' rounding differences chose otherwise.) AdamW's eps is 1e-6 in the
# single-projection chain, as in test_parallel's output-norm and tied chains: at 1e-8 its link's parameters sat at
# 1.3e-5 (1.4e-5 with the average) against the 2e-5 tolerance, with losses within 2e-7; at 1e-6, 9.9e-7. That chain
# also takes A.X-K1's norm after each MoE layer (model.moe_post_norm) through sp: left off sp's norm plan, its
# weight's gradient is not summed over tp and the step-1 loss is off by 1.9e-5 relative.
SINGLE_WQ = {**MOE, "model__mla_q_lora_rank": None, "model__moe_shared_combine": "average", "optimizer__eps": 1e-6,
             "model__moe_post_norm": True}
SINGLE_WQ_CHAIN = [("tp2-dp2-fsdp-sp", 2, 1, 2, dict(parallel__sp=True))]
# A sigmoid router whose balance loss takes softmax(logits) (MiniMax-M2), and Llama 4's expert inputs scaled by the
# router's weights, which tp cannot split (refused below), so in a chain of its own through ep and pp. Each piece
# moves the one-process losses at step 1 (relative): softmax balance 1.3e-3 (the logged balance loss 7.5e-3 at step
# 0), weighted inputs 9.3e-4, the average 4.3e-3 here and 4.6e-3 in the single-projection chain.
WEIGHTED_INPUT = {**MOE, "model__moe_score": "sigmoid", "model__moe_aux_loss_probs": "softmax",
                  "model__moe_weight_input": True, "model__moe_shared_combine": "average"}
WEIGHTED_INPUT_CHAIN = [("pp2-dp2-ep2", 1, 2, 2, dict(parallel__ep=2))]


@pytest.fixture(scope="module")
def workers():
    from parallel_harness import Workers

    pool = Workers(4)
    yield pool
    pool.close()


def check_router_losses(ref, runs: dict) -> None:
    """The logged router losses, means over layers, micro-batches and ranks, against the single process's."""
    for name, got in runs.items():
        for step, logged in got.router_losses.items():
            assert logged.keys() == {"moe_aux_loss", "moe_z_loss"}, (name, step)
            assert logged == pytest.approx(ref.router_losses[step], rel=LOSS_RTOL), (name, step)


# DeepSeek Sparse Attention (model/sparse_attention.py) with its indexer frozen: each query keeps its top 12 of up to
# 32 keys. The indexer is replicated under tp (on the whole sequence under sp, beside wq_a), so every rank selects
# the same keys for its heads.
DSA = dict(model__dsa_index_topk=12, model__dsa_index_heads=8, model__dsa_index_head_dim=16,
           model__dsa_indexer_frozen=True)


def test_expert_parallel_chain_matches_one_process(workers, corpus_dir, tmp_path):
    check_router_losses(*check_chain(workers, corpus_dir, tmp_path, {**MOE, **DSA}, EP_CHAIN))


def test_single_query_projection_and_expert_slices_under_fsdp_match_one_process(workers, corpus_dir, tmp_path):
    check_chain(workers, corpus_dir, tmp_path, SINGLE_WQ, SINGLE_WQ_CHAIN)


def test_softmax_balance_and_weighted_expert_inputs_match_one_process(workers, corpus_dir, tmp_path):
    check_router_losses(*check_chain(workers, corpus_dir, tmp_path, WEIGHTED_INPUT, WEIGHTED_INPUT_CHAIN))


@pytest.mark.parametrize("settings, message", [
    (dict(parallel__tp=2, model__moe_ffn_hidden_size=33),
     r"model.moe_ffn_hidden_size \(33\) is not divisible by parallel.tp \(2\)"),
    (dict(parallel__tp=2, model__moe_shared_ffn_hidden_size=17),
     r"model.moe_shared_ffn_hidden_size \(17\) is not divisible by parallel.tp \(2\)"),
    (dict(parallel__ep=3), r"parallel.ep \(3\) must be positive and divide model.moe_experts \(4\)"),
    (dict(parallel__ep=2, model__moe_experts=0), r"parallel.ep \(2\) must be positive and divide model.moe_experts \(0\)"),
    (dict(parallel__tp=2, model__moe_weight_input=True),
     r"^model.moe_weight_input scales the experts' inputs, whose gradients parallel.tp splits: use tp 1$"),
])
def test_bad_expert_layouts_are_refused_by_the_config(corpus_dir, tmp_path, settings, message):
    with pytest.raises(UsageError, match=message):
        load_config(str(ROOT / "configs" / "tiny.yaml"), overrides(corpus_dir, tmp_path, 4, **{**MOE, **settings}))


def test_ep_must_divide_the_data_parallel_ranks(corpus_dir, tmp_path):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides(corpus_dir, tmp_path, 4, parallel__ep=2, **MOE))
    with pytest.raises(UsageError, match=r"parallel.ep \(2\) splits the data-parallel ranks: it must divide dp .* = 1"):
        check_layout(cfg.parallel, 1)
    assert check_layout(cfg.parallel, 4) == 4


def test_memory_estimate_holds_each_ranks_experts():
    """tools/estimate_memory.py: one process holds every parameter; at ep 2 over dp 2 each rank holds half the
    routed experts (DDP), and FSDP2 spreads the whole model over dp; at tp 2 a rank holds half of each expert, so
    adding ep 2 leaves it a quarter of them (the counts equal a parallelised model's local numels: 40,401,408 at
    tp 2 and 21,527,040 at tp 2 x ep 2, checked by hand)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from estimate_memory import estimate

    cfg = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"))
    m = cfg.model
    routed = m.num_layers * m.moe_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    assert estimate(cfg, dp=1, act_bytes=4)[0].params == m.num_params()
    ddp = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"), ["--parallel.ep", "2", "--parallel.data_parallel", "ddp"])
    assert estimate(ddp, dp=2, act_bytes=4)[0].params == m.num_params() - routed // 2
    fsdp = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"), ["--parallel.ep", "2"])
    assert estimate(fsdp, dp=2, act_bytes=4)[0].params == pytest.approx(m.num_params() / 2, abs=1)
    tp2 = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"), ["--parallel.tp", "2"])
    tp2_ep2 = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"),
                          ["--parallel.tp", "2", "--parallel.ep", "2", "--parallel.data_parallel", "ddp"])
    assert estimate(tp2, dp=1, act_bytes=4)[0].params - estimate(tp2_ep2, dp=2, act_bytes=4)[0].params == routed // 4
