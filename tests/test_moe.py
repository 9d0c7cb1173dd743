"""The mixture-of-experts layer against a per-token reference (every router option), the grouped matrix
multiply against its loop, capacity dropping, expert-bias balancing, the config's refusals, and a MoE
run through the trainer that logs its router losses and expert loads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.checkpoint.megatron import Layout, megatron_args
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model.moe import MoE, grouped_mm
from megatron_llm.model_config import ModelConfig
from megatron_llm.parallel import ParallelDims, recompute_in_backward
from megatron_llm.training.moe_loss import router_collector
from megatron_llm.training.step import train_step
from tests.test_reliability import tool

E = 8


def moe_cfg(**overrides) -> ModelConfig:
    values = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48, max_seq_len=32,
                  moe_experts=E, moe_top_k=2, moe_ffn_hidden_size=16)
    cfg = ModelConfig(**{**values, **overrides})
    cfg.validate()
    return cfg


def seeded_batch() -> dict:
    """One training micro-batch of 2 x 16 random tokens, the same every call."""
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    return dict(tokens=x, labels=x.roll(-1, 1), loss_mask=torch.ones(2, 16), channel=torch.zeros(2, dtype=torch.long))


def reference(moe: MoE, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The layer's equations token by token: scores, the (group-limited, biased) choice, the weights, and
    the weighted sum of the chosen experts' MLPs plus the (gated) shared experts."""
    r, ex = moe.router, moe.experts
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = r.weight @ t
        scores = logits.softmax(-1) if cfg.moe_score == "softmax" else logits.sigmoid()
        choice = scores + (r.expert_bias if r.expert_bias is not None else 0)
        if cfg.moe_groups > 1:
            groups = choice.view(cfg.moe_groups, -1)
            best = groups.topk(cfg.moe_group_rank_top, dim=-1).values.sum(-1).topk(cfg.moe_topk_groups).indices
            allowed = torch.zeros(cfg.moe_groups, dtype=torch.bool)
            allowed[best] = True
            choice = groups.masked_fill(~allowed[:, None], -math.inf).flatten()
        chosen = choice.topk(cfg.moe_top_k).indices
        w = scores[chosen] / (scores[chosen].sum() if cfg.moe_renormalize else 1) * cfg.moe_routed_scale
        y = sum(wi * (ex.w2[e] @ (F.silu(ex.w1[e] @ t) * (ex.w3[e] @ t))) for wi, e in zip(w, chosen.tolist()))
        if moe.shared_experts is not None:
            shared = moe.shared_experts(t)
            y = y + (torch.sigmoid(moe.shared_gate(t)) * shared if moe.shared_gate is not None else shared)
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_renormalize=False, moe_shared_ffn_hidden_size=24, moe_shared_gate=True),
    dict(moe_score="sigmoid", moe_routed_scale=2.5, moe_groups=4, moe_topk_groups=2, moe_expert_bias=True,
         moe_shared_ffn_hidden_size=32),
    # DeepSeek-V2's group_limited_greedy: groups ranked by their best score, a softmax not renormalised
    dict(moe_renormalize=False, moe_routed_scale=16.0, moe_groups=4, moe_topk_groups=2, moe_group_rank_top=1),
])
def test_moe_layer_equals_the_per_token_reference(overrides):
    cfg = moe_cfg(**overrides)
    model = build_model(cfg, "cpu", seed=0)
    moe = model.layers["1"].feed_forward
    if moe.router.expert_bias is not None:
        moe.router.expert_bias.copy_(torch.randn(E) * 0.1)  # the bias changes the choice, not the weights
    x = torch.randn(2, 12, cfg.hidden_size, requires_grad=True)
    out, want = moe(x), reference(moe, cfg, x)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert moe.stats.counts.sum() == 2 * 12 * cfg.moe_top_k and moe.stats.dropped == 0
    r = torch.randn_like(out)  # gradients too: the rows' moves between token and expert order are hand-written
    inputs = [x, *(p for p in moe.parameters() if p.requires_grad)]
    for got, expected in zip(torch.autograd.grad((out * r).sum(), inputs), torch.autograd.grad((want * r).sum(), inputs)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_moving_rows_to_expert_order_and_back_has_the_gradients_of_its_gathers():
    """SortRows and UnsortRows against autograd's numerical gradients, with a dropped assignment (position N)."""
    from megatron_llm.model.moe import SortRows, UnsortRows

    order = torch.tensor([1, 4, 0, 5, 3])  # 3 tokens x top-2 assignments sorted by expert; assignment 2 dropped
    position = torch.full((6,), 5).index_put_((order,), torch.arange(5))
    x, y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(SortRows.apply(x, order, position, 2), x[order // 2])
    assert torch.autograd.gradcheck(lambda x: SortRows.apply(x, order, position, 2), x)
    unsorted = UnsortRows.apply(y, order, position)
    torch.testing.assert_close(unsorted[order], y)
    assert unsorted[2].eq(0).all()
    assert torch.autograd.gradcheck(lambda y: UnsortRows.apply(y, order, position), y)


def test_groups_limit_the_experts_a_token_reaches():
    cfg = moe_cfg(moe_score="sigmoid", moe_groups=4, moe_topk_groups=1)
    router = build_model(cfg, "cpu", seed=0).layers["0"].feed_forward.router
    indices = router(torch.randn(64, cfg.hidden_size))[0]
    assert (indices // (E // 4)).unique(dim=1).shape[1] == 1  # both experts of every token in one group


@pytest.mark.parametrize("top_k, topk_groups", [(4, 2), (2, 2)])  # groups ranked by their top 2, and by their best
def test_group_limited_choice_equals_megatron_cores(top_k, topk_groups):
    """megatron-core's group_limited_topk ranks a group by the sum of its top_k / topk_groups best scores: ours with
    model.moe_group_rank_top set so picks the same experts (sigmoid scores, 8 experts in 4 groups)."""
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    cfg = moe_cfg(moe_score="sigmoid", moe_top_k=top_k, moe_groups=4, moe_topk_groups=topk_groups,
                  moe_group_rank_top=top_k // topk_groups)
    router = build_model(cfg, "cpu", seed=0).layers["0"].feed_forward.router
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, scores = router(x)[0], router(x)[3]
    _, theirs = group_limited_topk(scores, top_k, x.shape[0], E, num_groups=4, group_topk=topk_groups)
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)
    router.group_rank_top = 3 - cfg.moe_group_rank_top  # the other rule picks other experts for some tokens
    with torch.no_grad():
        assert not torch.equal(router(x)[0].sort(-1).values, theirs.sort(-1).values)


def test_grouped_mm_equals_a_loop_and_its_gradient():
    """torch._grouped_mm, the experts' matmul on CUDA in bf16, runs on CPU in fp32 too: checked here."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    counts = torch.tensor([2, 3, 0, 5])
    loop = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate([(0, 2), (2, 5), (5, 5), (5, 10)])])
    out = grouped_mm(x, w, counts)
    torch.testing.assert_close(out, loop)
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    for got, want in zip(grads, torch.autograd.grad(loop.square().sum(), (x, w))):
        torch.testing.assert_close(got, want)


# gated, plain, and gpt-oss's clamped SwiGLU (two-input activation) with the experts' biases; 6 fp32 columns are not
# 16-byte aligned
@pytest.mark.parametrize("mlp,bias", [("swiglu", False), ("relu2", False), ("swiglu_clamped", True)])
def test_expert_mlp_has_the_gradients_of_its_loop(mlp, bias):
    """The experts' hand-written backward (ExpertMLP, where torch._grouped_mm does not run) against autograd's
    numerical gradients, and its values against each expert's MLP on its rows, with an expert that got none."""
    from megatron_llm.model.mlp import activations
    from megatron_llm.model.moe import expert_mlp

    act, up_act = activations(ModelConfig(mlp=mlp, swiglu_limit=1.0))  # the clamps bite on ~half the values
    counts, dims = torch.tensor([2, 3, 0, 5]), dict(dtype=torch.float64, requires_grad=True)
    x, w1, w2 = torch.randn(10, 6, **dims), torch.randn(4, 5, 6, **dims), torch.randn(4, 6, 5, **dims)
    w3 = torch.randn(4, 5, 6, **dims) if mlp != "relu2" else None
    b1, b2, b3 = (torch.randn(4, n, **dims) if bias else None for n in (5, 6, 5))
    loop = []
    for e, rows in enumerate(x.split(counts.tolist())):
        h = act(rows @ w1[e].T + (b1[e] if bias else 0))
        if w3 is not None:
            up = rows @ w3[e].T + (b3[e] if bias else 0)
            h = h * (up if up_act is None else up_act(up))
        loop.append(h @ w2[e].T + (b2[e] if bias else 0))
    params = [w1, w2, w3, b1, b2, b3]
    torch.testing.assert_close(expert_mlp(x, counts, params, act, up_act), torch.cat(loop))
    given = [p for p in params if p is not None]

    def run(x, *tensors):
        it = iter(tensors)
        return expert_mlp(x, counts, [None if p is None else next(it) for p in params], act, up_act)

    assert torch.autograd.gradcheck(run, (x, *given))


def test_clamped_swiglu_is_transformers_gpt_oss_gate():
    """model.mlp swiglu_clamped against transformers' GptOssExperts._apply_gate on interleaved gate/up values that
    cross both clamps, and a dense MLP of the kind against the same gate on its projections."""
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from megatron_llm.model.mlp import FeedForward, activations

    cfg = ModelConfig(hidden_size=8, ffn_hidden_size=6, mlp="swiglu_clamped", swiglu_alpha=1.3, swiglu_limit=2.0)
    theirs = GptOssExperts(GptOssConfig(swiglu_alpha=1.3, swiglu_limit=2.0))
    act, up_act = activations(cfg)
    gate, up = torch.randn(2, 64, 6) * 4, torch.randn(2, 64, 6) * 4  # ~2/3 of them past the limit
    interleaved = torch.stack((gate, up), dim=-1).flatten(-2)  # [..., 12]: g0, u0, g1, u1, ...
    torch.testing.assert_close(act(gate) * up_act(up), theirs._apply_gate(interleaved), atol=0, rtol=0)
    mlp = FeedForward(cfg)
    x = torch.randn(3, 8)
    fused = torch.stack((mlp.w1(x), mlp.w3(x)), dim=-1).flatten(-2)
    torch.testing.assert_close(mlp(x), mlp.w2(theirs._apply_gate(fused)))


def test_capacity_drops_the_latest_assignments_and_counts_them():
    dropless = build_model(moe_cfg(), "cpu", seed=0).layers["0"].feed_forward
    x = torch.randn(1, 32, 32)
    with torch.no_grad():
        full = dropless(x)
        counts = dropless.stats.counts
        dropless.capacity_factor = 1.0  # capacity = ceil(32 tokens x 2 / 8) = 8 per expert
        capped = dropless(x)
    assert dropless.stats.dropped == (counts - 8).clamp(min=0).sum() > 0
    dropless.capacity_factor = 100.0
    with torch.no_grad():
        torch.testing.assert_close(dropless(x), full)  # nothing past capacity: the dropless result
    assert not torch.allclose(capped, full)


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["dropless", "capacity"])
def test_expert_bias_moves_towards_balance_and_training_logs_router_losses(capacity):
    """The bias moves by the assignments each expert kept (after dropping, as megatron-core counts them); the
    logged expert load is the routed one."""
    cfg = moe_cfg(moe_expert_bias=True, moe_bias_update_rate=0.01, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
                  moe_dense_layers=[0], moe_capacity_factor=capacity)
    model = build_model(cfg, "cpu", seed=0)
    moe = model.layers["1"].feed_forward
    kept = []
    moe.register_forward_hook(lambda module, args, out: kept.append(module.stats.kept))
    x = torch.randint(0, 101, (4, 16))
    batch = dict(tokens=x, labels=x.roll(-1, 1), loss_mask=torch.ones(4, 16), channel=torch.zeros(4, dtype=torch.long))
    result = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), [batch, batch], ParallelDims(1, 0, 1, 1, 1),
                        z_loss=0.0, grad_clip=1.0, autocast=None)
    loads = torch.tensor([result.moe[f"expert_load/layer1/expert{e}"] for e in range(E)])
    assert loads.sum().item() == pytest.approx(1.0) and "expert_load/layer0/expert0" not in result.moe
    kept = sum(kept)
    torch.testing.assert_close(moe.router.expert_bias, 0.01 * torch.sign(kept.mean() - kept))
    by_routed = 0.01 * torch.sign(loads.mean() - loads)
    assert torch.equal(moe.router.expert_bias, by_routed) == (capacity is None)
    assert result.moe["moe_dropped"] == (0 if capacity is None else 2 * 4 * 16 * cfg.moe_top_k - kept.sum().item())
    assert 1.0 <= result.moe["moe_aux_loss"] <= E and result.moe["moe_z_loss"] > 0
    assert router_collector(model).fresh == []


def test_moe_model_counts_and_initialises_every_parameter():
    cfg = moe_cfg(moe_shared_ffn_hidden_size=24, moe_shared_gate=True, moe_layer_freq=2)
    model = build_model(cfg, "cpu", seed=0)
    assert [cfg.layer(i).moe for i in range(2)] == [False, True]
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    experts = model.layers["1"].feed_forward.experts
    assert experts.w1.shape == (E, 16, 32) and experts.w2.shape == (E, 32, 16)
    assert experts.w2.std() < 0.6 * experts.w1.std()  # an output projection: scaled init
    again = build_model(cfg, "cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(experts.w1[0], experts.w1[1])


def test_gpt_oss_pieces_start_neutral_and_train():
    """The router's and experts' biases and the sink logits start at 0 (a bias-free router and experts, attention
    whose rows give exp(0) to the sink), are counted, and get gradients."""
    cfg = moe_cfg(moe_router_bias=True, moe_ffn_bias=True, attention_sinks=True, mlp="swiglu_clamped")
    model = build_model(cfg, "cpu", seed=0)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    new = {k: p for k, p in model.named_parameters() if k.endswith(("_bias", "router.bias", "sinks.weight"))}
    assert len(new) == 4 * 2 + 2  # per MoE layer the router's and three experts' biases; per layer the sinks
    assert all(not p.any() for p in new.values())
    x = torch.randint(0, 101, (2, 16))
    model(x, labels=x).mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in new.values())


@pytest.mark.parametrize("overrides,message", [
    (dict(moe_top_k=9), r"model\.moe_top_k \(9\) must be in 1\.\.model\.moe_experts \(8\)"),
    (dict(moe_groups=3), r"model\.moe_groups \(3\) must divide"),
    (dict(moe_groups=4, moe_topk_groups=1, moe_top_k=3), r"model\.moe_top_k \(3\) exceeds"),
    (dict(moe_shared_gate=True), r"model\.moe_shared_gate"),
    (dict(moe_shared_combine="average"), r"^model\.moe_shared_combine acts on the shared experts: set "),
    (dict(moe_capacity_factor=0.0), r"model\.moe_capacity_factor"),
    (dict(moe_dense_layers=[2]), r"model\.moe_dense_layers"),
    (dict(mlp="swiglu_clamped", swiglu_limit=0.0), r"^model\.swiglu_limit must be a positive finite number, got 0\.0$"),
])
def test_bad_moe_config_is_one_line(overrides, message):
    with pytest.raises(UsageError, match=message):
        moe_cfg(**overrides)


def test_softmax_balance_probabilities_and_the_averaged_shared_experts():
    """model.moe_aux_loss_probs softmax balances softmax(logits) of a sigmoid router (transformers' MiniMax-M2), and
    model.moe_shared_combine average halves routed + shared (Cohere2-MoE): each against its formula on the same
    weights, the defaults unchanged."""
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    layers = {}
    for key, value in (("default", None), ("moe_aux_loss_probs", "softmax"), ("moe_shared_combine", "average")):
        cfg = moe_cfg(moe_score="sigmoid", moe_shared_ffn_hidden_size=24, **({} if value is None else {key: value}))
        layers[key] = build_model(cfg, "cpu", seed=0).layers["1"].feed_forward
        layers[key].out = layers[key](x)
    default, softmax, average = layers.values()
    logits = F.linear(x.reshape(-1, 32), default.router.weight)
    scores = logits.sigmoid()
    torch.testing.assert_close(default.stats.prob_sum[0], (scores / scores.sum(-1, keepdim=True)).sum(0))
    torch.testing.assert_close(softmax.stats.prob_sum[0], logits.softmax(-1).sum(0))
    torch.testing.assert_close(softmax.out, default.out, rtol=0, atol=0)
    shared = default.shared_experts(x)
    routed = default.out - shared
    torch.testing.assert_close(average.out, (routed + shared) / 2)


@pytest.mark.parametrize("overrides", [dict(moe_aux_loss_probs="softmax"), dict(moe_shared_combine="average")])
def test_megatron_refuses_the_transformers_only_moe_options_by_name(overrides):
    """megatron-core balances a sigmoid router's normalised scores and adds its shared experts' output."""
    cfg = moe_cfg(moe_score="sigmoid", moe_shared_ffn_hidden_size=24, **overrides)
    (key,) = overrides
    with pytest.raises(UsageError, match=rf"^Megatron-LM cannot express model\.{key}="):
        megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")


def test_moe_trains_through_the_trainer_and_logs_expert_loads(tiny_config, tmp_path, capsys):
    from megatron_llm.training.trainer import train

    cfg = tiny_config(tmp_path, training__steps=4, training__eval_interval=0, model__moe_experts=4,
                      model__moe_ffn_hidden_size=32, model__moe_aux_loss_coeff=0.01, model__moe_capacity_factor=1.0)
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses.values())
    model = build_model(cfg.model, "cpu")  # the banner's active count: 2 of each layer's 4 experts
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters   {total / 1e3:.2f}k total, {(total - experts // 2) / 1e3:.2f}k active per token" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").iterdir()))).Reload()
    tags = events.Tags()["scalars"]
    assert {"moe_aux_loss", "moe_dropped", "expert_load/layer0/expert3", "expert_load/layer1/expert0"} <= set(tags)
    picture = tmp_path / "experts.png"
    assert tool("plot_experts").main([str(tmp_path / "tb"), "--output", str(picture)]) == 0
    assert picture.stat().st_size > 1000
    assert tool("plot_experts").main([str(tmp_path / "tb"), "--output", str(picture), "--run", "nope"]) == 2


def test_the_banner_names_expert_parallelism():
    from conftest import ROOT
    from megatron_llm.config import load_config
    from megatron_llm.logging.banner import banner

    cfg = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"), ["--parallel.ep", "2"])
    assert "2 ranks: tp=1 pp=1 dp=2 ep=2 (fsdp" in banner(cfg, 2, [1, 1], None, None, torch.device("cpu"))


def test_model_scope_router_losses_refuse_a_pipeline_before_any_process_group(tiny_config, tmp_path):
    settings = dict(model__moe_experts=4, model__moe_aux_loss_coeff=0.01, parallel__pp=2, training__grad_accum_steps=2)
    with pytest.raises(UsageError, match=r"model\.moe_aux_loss_scope model .* parallel\.pp splits: set model\.moe_aux_loss_scope layer"):
        tiny_config(tmp_path, **settings)
    assert tiny_config(tmp_path, model__moe_aux_loss_scope="layer", **settings).parallel.pp == 2


def megatron_router_losses(logits: torch.Tensor, top_k: int, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's load-balancing and z-loss from its router logits [T, E], as Megatron-core's
    switch_load_balancing_loss_func and z_loss_func write them: E / (k T^2) * sum_e probs_e * tokens_e and
    mean(logsumexp^2); a sigmoid router balances its scores normalised per token."""
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
    t, e = logits.shape
    tokens_per_expert = F.one_hot(scores.topk(top_k, dim=-1).indices, e).sum((0, 1)).float()
    aux = (probs.sum(0) * tokens_per_expert).sum() * e / (top_k * t * t)
    return aux, torch.logsumexp(logits, -1).square().mean()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_layer_scope_loss_gradient_equals_autograd_of_the_per_layer_formula(score):
    """model.moe_aux_loss_scope layer: the gradient each layer's losses send back through its output (no loss
    added to the step's) equals autograd of cross-entropy + sum over layers of coeff x Megatron's formula,
    per micro-batch averaged; the logged values are those losses' means over layers and micro-batches."""
    cfg = moe_cfg(moe_score=score, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, moe_aux_loss_scope="layer")
    x = torch.randint(0, 101, (2, 4, 16), generator=torch.Generator().manual_seed(0))  # 2 micro-batches
    ours, ref = build_model(cfg, "cpu", seed=0), build_model(cfg, "cpu", seed=0)
    routers = router_collector(ours)
    routers.start_step(ParallelDims(1, 0, 1, 1, 1), micro_batches=2)
    for mb in x:
        (ours(mb, labels=mb).mean() / 2).backward()  # the model's own test loss: cross-entropy only
    logged = routers.finish_step(ours, ParallelDims(1, 0, 1, 1, 1), 2, updated=True)

    logits = []
    for block in ref.layers.values():
        block.feed_forward.router.register_forward_hook(lambda m, args, out: logits.append(out[2]))
    values = []
    for mb in x:
        loss = ref(mb, labels=mb).mean()
        for layer_logits in logits:
            aux, z = megatron_router_losses(layer_logits, cfg.moe_top_k, score)
            loss = loss + cfg.moe_aux_loss_coeff * aux + cfg.moe_z_loss_coeff * z
            values.append(torch.stack([aux, z]).detach())
        (loss / 2).backward()
        logits.clear()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert ours.layers["0"].feed_forward.router.weight.grad.abs().max() > 0
    mean = torch.stack(values).mean(0)
    assert logged["moe_aux_loss"] == pytest.approx(mean[0].item(), rel=1e-6)
    assert logged["moe_z_loss"] == pytest.approx(mean[1].item(), rel=1e-6)


def test_latent_attention_model_builds_counts_and_trains():
    cfg = moe_cfg(attention="mla", head_dim=12, mla_rope_head_dim=4, mla_kv_lora_rank=16, mla_q_lora_rank=20,
                  mla_v_head_dim=6, rope_interleaved=True, moe_score="sigmoid", moe_expert_bias=True)
    model = build_model(cfg, "cpu", seed=0)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert model.rope_cos.shape == (cfg.max_seq_len, 2)  # the decoupled rope dims' frequencies
    x = torch.randint(0, 101, (2, 16))
    model(x, labels=x).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("overrides,message", [
    (dict(mla_kv_lora_rank=0), r"model\.attention mla needs positive model\.mla_kv_lora_rank"),
    (dict(mla_rope_head_dim=8), r"model\.mla_rope_head_dim \(8\) must be even and in 1\.\.model\.head_dim - 1 \(7\)"),
    (dict(qk_norm=True), r"no qk_norm"),
    (dict(attention_sinks=True), r"no qk_norm, qkv_clip or attention_sinks"),
])
def test_bad_latent_attention_config_is_one_line(overrides, message):
    with pytest.raises(UsageError, match=message):
        moe_cfg(**{**dict(attention="mla", mla_rope_head_dim=4, mla_kv_lora_rank=16, mla_v_head_dim=6), **overrides})


def test_latent_attention_splits_whole_heads_over_tp(tiny_config, tmp_path):
    """tp 2 is accepted (tests/test_expert_parallel.py runs it); heads that tp cannot split are refused by name."""
    mla = dict(model__attention="mla", model__mla_rope_head_dim=4, model__mla_kv_lora_rank=16, model__mla_v_head_dim=8)
    assert tiny_config(tmp_path, **mla, parallel__tp=2).parallel.tp == 2
    with pytest.raises(UsageError, match=r"model\.num_heads \(4\) is not divisible by parallel\.tp \(3\)"):
        tiny_config(tmp_path, **mla, parallel__tp=3)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_compiled_blocks_train_the_moe_as_eager_ones(scope):
    """training.compile: the experts' matmuls run eagerly inside the compiled block (ExpertMLP reads its rows
    per expert on the host), the router statistics still reach the step."""
    cfg = moe_cfg(moe_aux_loss_coeff=0.01, moe_aux_loss_scope=scope)
    batch = seeded_batch()
    runs = []
    for compiled in (False, True):
        model = build_model(cfg, "cpu", seed=0)
        for block in model.layers.values() if compiled else ():
            block.compile()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        runs.append([train_step(model, optimizer, [batch], ParallelDims(1, 0, 1, 1, 1), z_loss=0.0, grad_clip=0.0,
                                autocast=None) for _ in range(2)])
    for eager, compiled in zip(*runs):
        assert compiled.loss == pytest.approx(eager.loss, rel=1e-6)
        assert compiled.moe == pytest.approx(eager.moe, rel=1e-5)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_recomputed_blocks_give_the_same_router_losses_and_updates(scope):
    """training.activation_checkpointing full: a block's forward runs again in the backward; the router losses
    still reach the gradients (layer scope: through the first forward's graph, nothing saved for them) and the
    recomputation is not counted in the expert load."""
    cfg = moe_cfg(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, moe_aux_loss_scope=scope)
    batch = seeded_batch()
    runs = []
    for recompute in (False, True):
        model = build_model(cfg, "cpu", seed=0)
        for block in model.layers.values() if recompute else ():
            recompute_in_backward(block)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [batch, batch],
                            ParallelDims(1, 0, 1, 1, 1), z_loss=0.0, grad_clip=0.0, autocast=None)
        runs.append((result, {k: before[k] - v for k, v in model.state_dict().items()}))
    (plain, plain_update), (recomputed, recomputed_update) = runs
    assert recomputed.moe == plain.moe and recomputed.loss == plain.loss
    assert all(torch.equal(plain_update[k], recomputed_update[k]) for k in plain_update)
    assert plain_update["layers.0.feed_forward.router.weight"].abs().max() > 0
