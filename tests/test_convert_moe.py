"""Mixture of experts in Megatron-LM checkpoints, against megatron-core: its MoE names (router,
local_experts.{l}, shared experts, the grouped weight1/weight2 layout), expert-parallel files
mp_rank_TT[_PPP]_EEE, and the router's args, checked by round trips, strict loading into GPTModel, and
megatron-core's own MoE forward; DeepSeek-V3's multi-head latent attention (both query forms, YaRN) the same
way. Helpers and the dense checks are in test_convert.py."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import megatron_llm
from megatron_llm.checkpoint.convert import Options, checkpoint_model_config, convert
from megatron_llm.checkpoint.megatron_io import safe_load
from test_convert import (SMALL, VOCAB, assert_same_tensors, hf_tensors, load_to_memory, megatron_shards,
                          random_hf_model, run_cli, tokens)

# megatron-core's constructors and imports warn about deprecations and CUDA-graph defaults we do not use.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning"),
              pytest.mark.filterwarnings("ignore:When using expert parallelism and tensor parallelism:UserWarning")]


MOE_SMALL = {**SMALL, "intermediate_size": 64}
MOE_HF = {
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),  # renormalised softmax
    # pre-softmax top-k, a gated shared expert, layer 0 dense (pretrain_gpt's moe_layer_freq pattern)
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, mlp_only_layers=[0])),
    # latent attention with compressed queries (linear_q_down_proj / linear_q_up_proj) and DeepSeek-V3's published
    # YaRN (factor 40, mscale = mscale_all_dim = 1: the softmax scaled by 1.87); its router: 8 experts in 2 groups,
    # a token's top 2 in the best group (top-k / kept groups 2, as DeepSeek-V3's 8 / 4), a shared expert, layer 0 dense
    "deepseek_v3": ("DeepseekV3", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                       moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                       routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                       qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=8, rope_scaling=dict(
                                           type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                           beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
}
# DeepSeek's router (sigmoid scores, the expert bias, group-limited top-k ranked by each group's best 2, a routed
# scale, ungated shared experts, the first layer dense) on latent attention with one query projection
# (linear_q_proj, DeepSeek-V2-Lite's form) and plain RoPE, in our own config.
DEEPSEEK_LIKE = dict(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=8, ffn_hidden_size=64,
                     max_seq_len=64, moe_experts=8, moe_top_k=4, moe_ffn_hidden_size=32, moe_score="sigmoid",
                     moe_expert_bias=True, moe_groups=4, moe_topk_groups=2, moe_routed_scale=2.5,
                     moe_shared_ffn_hidden_size=64, moe_dense_layers=[0], attention="mla", head_dim=16,
                     mla_kv_lora_rank=16, mla_rope_head_dim=8, mla_v_head_dim=8, rope_interleaved=True)
MOE_LAYOUTS = [(2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory) -> dict:
    """name -> (directory, its format, a model giving the reference logits: transformers' or, for the
    DeepSeek-like checkpoint, ours)."""
    from megatron_llm.checkpoint.native import save_weights
    from megatron_llm.config import Config, ModelConfig
    from megatron_llm.model import build_model

    out = {}
    for name, (prefix, extra) in MOE_HF.items():
        model = random_hf_model(prefix, **{**MOE_SMALL, **extra})
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, "hf", model)
    cfg = ModelConfig(**DEEPSEEK_LIKE)
    model = build_model(cfg, "cpu", seed=0)
    with torch.no_grad():  # the expert bias starts at 0: noise makes it change which experts are chosen
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    path = tmp_path_factory.mktemp("deepseek-like") / "native"
    save_weights(path, model.state_dict(), Config(model=cfg).to_dict())
    out["deepseek-like"] = (path, "native", model.eval())
    return out


def native_tensors(path: Path) -> dict:
    return megatron_llm.load_model(str(path)).state_dict()


def shard_path(root: Path, t: int, p: int, e: int, pp: int, ep: int) -> Path:
    name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
    return root / "release" / name / "model_optim_rng.pt"


@pytest.mark.parametrize("layout", MOE_LAYOUTS, ids=lambda t: "tp{}pp{}ep{}".format(*t))
@pytest.mark.parametrize("name", [*MOE_HF, "deepseek-like"])
def test_moe_megatron_round_trip_is_bit_exact_and_files_hold_local_experts(moe_dirs, tmp_path, name, layout):
    src, fmt, _ = moe_dirs[name]
    tp, pp, ep = layout
    convert(str(src), fmt, str(tmp_path / "mg"), "megatron", Options(tp=tp, pp=pp, ep=ep))
    shards = megatron_shards(tmp_path / "mg")
    assert len(shards) == tp * pp * ep
    experts = shards[shard_path(tmp_path / "mg", 0, pp - 1, ep - 1, pp, ep).parent.name]["model"]
    per_rank = shards[next(iter(shards))]["args"].num_experts // ep
    layer = "decoder.layers.1.mlp.experts.local_experts"  # the last stage's first layer is sparse
    assert {k for k in experts if k.startswith(layer) and k.endswith("fc1.weight")} == {
        f"{layer}.{l}.linear_fc1.weight" for l in range(per_rank)}
    # Megatron-LM trains with per-layer router losses: the read continues so (the writers take either scope)
    assert checkpoint_model_config(str(tmp_path / "mg")).moe_aux_loss_scope == "layer"
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "back"), fmt)
    if fmt == "hf":
        assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "back"))
    else:
        assert_same_tensors(native_tensors(src), native_tensors(tmp_path / "back"))


def test_moe_megatron_reshard_ep2_ep1_ep2_is_bit_exact(moe_dirs, tmp_path):
    src, fmt, _ = moe_dirs["deepseek-like"]
    convert(str(src), fmt, str(tmp_path / "a"), "megatron", Options(tp=2, pp=2, ep=2))
    convert(str(tmp_path / "a"), "megatron", str(tmp_path / "b"), "megatron")
    convert(str(tmp_path / "b"), "megatron", str(tmp_path / "c"), "megatron", Options(tp=2, pp=2, ep=2))
    a, b, c = (megatron_shards(tmp_path / x) for x in "abc")
    assert sorted(b) == ["mp_rank_00"] and a.keys() == c.keys() and len(a) == 8
    for shard in a:
        assert_same_tensors(a[shard]["model"], c[shard]["model"])
        assert vars(a[shard]["args"]) == vars(c[shard]["args"])
    # Expert e of the whole model is local expert e % 4 of EP rank e // 4 (8 experts, ep 2).
    whole = b["mp_rank_00"]["model"]["decoder.layers.3.mlp.experts.local_experts.6.linear_fc2.weight"]
    ranks = [a[f"mp_rank_0{t}_001_001"]["model"]["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"]
             for t in range(2)]
    assert torch.equal(torch.cat(ranks, dim=1), whole)


def megatron_lm_files(tp: int, pp: int, ep: int, etp: int) -> list[str]:
    """The files Megatron-LM saves in the legacy format at the smallest world of a layout: rank r is placed by
    megatron-core's RankGenerator (dense: tp, dp, pp; experts: etp, ep, expert dp, pp) and writes
    mp_rank_{tp rank}[_{pp rank}][_{ep rank}] when its dp or expert-dp rank is 0 (training/checkpointing.py)."""
    from megatron.core.parallel_state import RankGenerator

    world = math.lcm(tp, etp * ep) * pp
    def place(generator, group: str) -> dict:
        return {r: i for ranks in generator.get_ranks(group) for i, r in enumerate(ranks)}
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    t, p, d = (place(dense, g) for g in ("tp", "pp", "dp"))
    e, ed = place(expert, "ep"), place(expert, "dp")
    return sorted({f"mp_rank_{t[r]:02d}" + (f"_{p[r]:03d}" if pp > 1 else "") + (f"_{e[r]:03d}" if ep > 1 else "")
                   for r in range(world) if d[r] == 0 or ed[r] == 0})


@pytest.mark.parametrize("name,layout", [("mixtral", (2, 2, 2, 1)), ("deepseek-like", (4, 1, 2, 2))],
                         ids=["tp2pp2ep2etp1", "tp4ep2etp2"])
def test_expert_tensor_parallel_below_tp_writes_megatron_lm_files_that_load_strictly(mcore, moe_dirs, tmp_path,
                                                                                     name, layout):
    """expert_tensor_parallel_size below tp (1: Megatron's parallel folding, each expert whole): the files are
    those Megatron-LM saves for the layout (at tp2 ep2 etp1 only (tp 0, ep 0) and (tp 1, ep 1) per stage);
    each strict-loads into the GPTModel megatron-core builds for its rank, each local expert holding the
    slice tp_rank % etp of the expert megatron-core assigns it; the round trip back is bit-exact."""
    src, fmt, _ = moe_dirs[name]
    tp, pp, ep, etp = layout
    out = tmp_path / "mg"
    convert(str(src), fmt, str(out), "megatron", Options(tp=tp, pp=pp, ep=ep, etp=etp))
    shards = megatron_shards(out)
    assert sorted(shards) == megatron_lm_files(tp, pp, ep, etp)
    whole, checked = megatron_llm.load_model(str(src)).state_dict(), 0
    for shard_name, shard in shards.items():
        t, p, e = int(shard_name[8:10]), int(shard_name[11:14]) if pp > 1 else 0, int(shard_name[-3:])
        assert shard["args"].expert_tensor_parallel_size == etp
        model = mcore.gpt_model(shard["args"], t, p, e)
        model.load_state_dict(shard["model"], strict=True)
        for i, layer in enumerate(model.decoder.layers):
            w1, w3 = (whole.get(f"layers.{p * len(model.decoder.layers) + i}.feed_forward.experts.{w}") for w in ("w1", "w3"))
            for slot, expert in enumerate(getattr(layer.mlp, "local_expert_indices", [])):
                fc1 = layer.mlp.experts.local_experts[slot].linear_fc1.weight  # [2 * ffn / etp, hidden]
                assert torch.equal(fc1, torch.cat([w[expert].chunk(etp)[t % etp] for w in (w1, w3)]))
                checked += 1
    cfg = checkpoint_model_config(str(src))
    assert checked == len(shards) // pp * sum(cfg.layer(i).moe for i in range(cfg.num_layers)) * cfg.moe_experts // ep
    convert(str(out), "megatron", str(tmp_path / "back"), fmt)
    assert_same_tensors(*((hf_tensors if fmt == "hf" else native_tensors)(d) for d in (src, tmp_path / "back")))


def test_megatron_lm_integer_moe_layer_freq_reads_as_its_pattern(mcore, tmp_path):
    """Megatron-LM's moe_layer_freq N makes layers 0, N, 2N ... sparse (ours counts (i + 1) % N): a
    checkpoint saved with 2 is the model whose odd layers are dense."""
    from megatron_llm.checkpoint.native import save_weights
    from megatron_llm.config import Config, ModelConfig
    from megatron_llm.model import build_model

    cfg = ModelConfig(**{**DEEPSEEK_LIKE, "moe_dense_layers": [1, 3]})
    model = build_model(cfg, "cpu", seed=1)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg"), "megatron")
    path = tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    assert safe_load(path)["args"].moe_layer_freq == [1, 0, 1, 0]
    _set_megatron_args(tmp_path / "mg", moe_layer_freq=2)
    shard = safe_load(path)
    mcore.gpt_model(shard["args"], 0, 0).load_state_dict(shard["model"], strict=True)
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "back"), "native")
    assert_same_tensors(native_tensors(tmp_path / "native"), native_tensors(tmp_path / "back"))


def test_moe_shards_load_strictly_into_megatron_core(mcore, moe_dirs, tmp_path):
    """Every file loads into the GPTModel megatron-core builds for its (tp, pp, ep) rank, each of its local
    experts holds the global expert megatron-core assigns that slot (MoELayer.local_expert_indices), and each
    attention tensor (latent attention's projections and norms, or the fused QKV) is the slice of the tp=1 tensor
    that megatron-core's own sharded_state_dict places on that rank (global offset and shape)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp, pp, ep = 2, 2, 2
    for name, (src, fmt, _) in moe_dirs.items():
        out = tmp_path / name
        convert(str(src), fmt, str(out), "megatron", Options(tp=tp, pp=pp, ep=ep))
        convert(str(src), fmt, str(tmp_path / f"{name}-tp1"), "megatron")
        unsplit = safe_load(tmp_path / f"{name}-tp1" / "release" / "mp_rank_00" / "model_optim_rng.pt")["model"]
        ours = megatron_llm.load_model(str(src))
        whole, checked, placed = ours.state_dict(), 0, 0
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    shard = safe_load(shard_path(out, t, p, e, pp, ep))
                    model = mcore.gpt_model(shard["args"], t, p, e)
                    model.load_state_dict(shard["model"], strict=True)
                    for sharded in model.sharded_state_dict().values():
                        # attention's linears (the local spec names its input norm linear_qkv.layer_norm_weight here)
                        if (not isinstance(sharded, ShardedTensor) or ".self_attention.linear" not in sharded.key
                                or ".layer_norm_" in sharded.key):
                            continue
                        key, offset = sharded.key, sharded.global_offset
                        if sharded.prepend_axis_num:  # a leading layer axis: the offset's first entry is the layer
                            key, offset = key.replace("decoder.layers.", f"decoder.layers.{offset[0]}.", 1), offset[1:]
                        where = tuple(slice(o, o + n) for o, n in zip(offset, sharded.data.shape))
                        assert torch.equal(sharded.data, unsplit[key][where]), key
                        placed += 1
                    for i, layer in enumerate(model.decoder.layers):
                        w2 = whole.get(f"layers.{p * len(model.decoder.layers) + i}.feed_forward.experts.w2")
                        for slot, expert in enumerate(getattr(layer.mlp, "local_expert_indices", [])):
                            fc2 = layer.mlp.experts.local_experts[slot].linear_fc2.weight  # [hidden, ffn / tp]
                            assert torch.equal(fc2, w2[expert].chunk(tp, dim=1)[t])
                            checked += 1
        sparse = sum(ours.cfg.layer(i).moe for i in range(ours.cfg.num_layers))
        assert checked == tp * ours.cfg.moe_experts * sparse  # every expert of every sparse layer, on each tp rank
        assert placed >= tp * ep * ours.cfg.num_layers * 2  # per file, each layer's linear_proj and one more at least


def routing_of_megatron_core(model) -> list:
    """Each MoE layer's routing map [tokens, E] of the next forward, tokens in batch-major order (megatron-core
    runs [s, b, h])."""
    maps, b = [], tokens().shape[0]
    for layer in model.decoder.layers:
        if hasattr(layer.mlp, "router"):
            layer.mlp.router.register_forward_hook(
                lambda m, i, out: maps.append(out[1].view(-1, b, out[1].shape[-1]).transpose(0, 1).flatten(0, 1)))
    return maps


def routing_of_ours(model) -> list:
    from megatron_llm.model.moe import Router

    maps = []
    for router in (m for m in model.modules() if isinstance(m, Router)):  # in layer order
        router.register_forward_hook(lambda m, i, out: maps.append(
            torch.zeros(out[0].shape[0], m.weight.shape[0], dtype=torch.bool).scatter_(1, out[0], True)))
    return maps


@pytest.mark.parametrize("name", [*MOE_HF, "deepseek-like"])
def test_megatron_core_moe_forward_matches_with_the_same_router_choices(mcore, moe_dirs, tmp_path, name):
    """megatron-core's own MoE layer (its router from our args, its SequentialMLP experts, its shared
    experts) on our shard gives the reference logits, choosing the experts our router chooses."""
    src, fmt, reference = moe_dirs[name]
    convert(str(src), fmt, str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = mcore.gpt_model(shard["args"], 0, 0).eval()
    model.load_state_dict(shard["model"], strict=True)
    theirs_routing = routing_of_megatron_core(model)
    ours = megatron_llm.load_model(str(src))
    ours_routing = routing_of_ours(ours)
    x = tokens()
    logits = mcore.logits(model, x)[..., :VOCAB]
    with torch.no_grad():
        expected = reference(x)
        expected = expected if isinstance(expected, torch.Tensor) else expected.logits
        ours(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert len(theirs_routing) == len(ours_routing) == (4 if name == "mixtral" else 3)  # the others: layer 0 dense
    for theirs, mine in zip(theirs_routing, ours_routing):
        assert torch.equal(theirs, mine)


@pytest.mark.parametrize("name,policy,pad", [("deepseek-like", "probs", False), ("qwen2_moe", "position", True)])
def test_megatron_core_moe_forward_with_token_dropping_equals_ours_read_from_its_checkpoint(mcore, moe_dirs, tmp_path,
                                                                                         name, policy, pad):
    """A Megatron checkpoint trained with a capacity factor (megatron-core's default drop policy "probs", or
    "position", padded to capacity or not) reads as our model dropping the same assignments: megatron-core's
    own GPTModel forward (its router drops; CUDA's topk ties emulated for "position") gives our logits, with
    assignments dropped in every sparse layer."""
    from test_moe_capacity import with_cuda_ties

    src, fmt, _ = moe_dirs[name]
    convert(str(src), fmt, str(tmp_path / "mg"), "megatron")
    _set_megatron_args(tmp_path / "mg", moe_expert_capacity_factor=0.5, moe_token_drop_policy=policy,
                       moe_pad_expert_input_to_capacity=pad)
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = mcore.gpt_model(shard["args"], 0, 0).eval()
    model.load_state_dict(shard["model"], strict=True)
    ours = megatron_llm.load_model(str(tmp_path / "mg"))
    assert (ours.cfg.moe_capacity_factor, ours.cfg.moe_token_drop_policy) == (0.5, policy)
    x = tokens()  # 2 sequences: megatron-core's [s, b] token order decides the ties
    with with_cuda_ties(policy):
        logits = mcore.logits(model, x)[..., :VOCAB]
    with torch.no_grad():
        expected = ours(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    dropped = [m.stats.dropped.item() for m in ours.modules() if hasattr(m, "drop_policy")]
    assert len(dropped) == 3 and min(dropped) > 0


def test_training_continues_from_a_megatron_moe_checkpoint_at_pp2_and_tp2_sp_as_one_process(corpus_dir, tmp_path, capsys):
    """A Megatron MoE checkpoint (experts whole: tp2 ep2 etp1; capacity 1.0, policy probs) as checkpoint.init_from
    reads with Megatron's per-layer router losses, so it trains at pp 2 (model scope is refused there), and
    2 steps on 2 processes give one process's losses and router losses. Saved with DeepSeek-V3's recipe's
    seq_aux_loss, it reads as the sequence scope: per-layer losses, each sequence balanced on its own. Rank 0 stages the conversion while
    the others wait: the staged native copy is written without collectives (it hung in DCP's gather before).
    Saved as Megatron-LM's tp2 run with sequence parallelism saves it, it drops per 2 sequence shards (a
    different model from shards 1), and tp2 with sp gives the one process's losses too."""
    from conftest import ROOT
    from megatron_llm.checkpoint.native import save_weights
    from megatron_llm.config import Config, load_config
    from megatron_llm.model import build_model
    from megatron_llm.training.trainer import train
    from parallel_harness import Workers
    from test_parallel import LOSS_RTOL, overrides

    base = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides(corpus_dir, tmp_path / "base", 2)).model
    cfg = dataclasses.replace(base, moe_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, moe_capacity_factor=1.0,
                              moe_token_drop_policy="probs", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    save_weights(tmp_path / "native", build_model(cfg, "cpu", seed=0).state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg"), "megatron", Options(tp=2, ep=2, etp=1))
    assert "drops tokens per 1 sequence shard(s) (model.moe_capacity_sequence_shards); Megatron-LM continued at " \
           "tp 2 drops per 2 with --sequence-parallel, per 1 without" in capsys.readouterr().out
    assert checkpoint_model_config(str(tmp_path / "mg")).moe_capacity_sequence_shards == 1
    assert checkpoint_model_config(str(tmp_path / "mg")).moe_aux_loss_scope == "layer"
    # as Megatron-LM's tp2 + sp run of DeepSeek-V3's recipe saves it
    _set_megatron_args(tmp_path / "mg", sequence_parallel=True, moe_router_load_balancing_type="seq_aux_loss")
    read = checkpoint_model_config(str(tmp_path / "mg"))
    assert (read.moe_aux_loss_scope, read.moe_capacity_sequence_shards) == ("sequence", 2)
    model, x = megatron_llm.load_model(str(tmp_path / "mg")), torch.randint(0, cfg.vocab_size, (4, 32))
    with torch.no_grad():
        per_shard = model(x)
        for moe in (m for m in model.modules() if hasattr(m, "drop_shards")):
            moe.drop_shards = 1
        assert not torch.allclose(model(x), per_shard, atol=1e-3)
    # AdamW's eps 1e-6, as test_parallel's output-norm chain: at 1e-8 its first update g / (|g| + eps) turned tp2's
    # summation order on a router weight with a near-zero gradient into 3.7e-5 (of lr 3e-3), and the step-1 z-loss
    # into 1.27e-5 relative (tolerance 1e-5); at 1e-6, 2.6e-6.
    init = dict(checkpoint__init_from=str(tmp_path / "mg"), training__eval_interval=0, optimizer__eps=1e-6)
    one = train(load_config(str(ROOT / "configs" / "tiny.yaml"), overrides(corpus_dir, tmp_path / "one", 2, **init)))
    pool = Workers(2)
    try:
        runs = {name: pool.run(2, overrides(corpus_dir, tmp_path / name, 2, **layout, **init), tmp_path / name, timeout_s=120)
                for name, layout in [("pp2", dict(parallel__pp=2)), ("tp2-sp", dict(parallel__tp=2, parallel__sp=True))]}
    finally:
        pool.close()
    for name, got in runs.items():
        assert sorted(got.losses) == sorted(one.losses) == [0, 1], name
        for step, loss in one.losses.items():
            assert got.losses[step] == pytest.approx(loss, rel=LOSS_RTOL), (name, step)
            assert got.router_losses[step] == pytest.approx(one.router_losses[step], rel=LOSS_RTOL), (name, step)


def test_megatron_writer_records_drop_shards_as_sequence_parallelism_at_their_tp():
    """Shards = tp write sequence_parallel and read back; at another tp nothing Megatron holds says it: a note."""
    from megatron_llm.checkpoint.megatron import Layout, megatron_args, model_config_from_args
    from megatron_llm.config import ModelConfig

    cfg = ModelConfig(**{**DEEPSEEK_LIKE, "moe_expert_bias": False, "moe_capacity_factor": 1.0,
                         "moe_capacity_sequence_shards": 2})
    for tp, sp, shards in [(2, True, 2), (1, False, 1), (4, False, 1)]:
        args = megatron_args(cfg, Layout.of(cfg, tp, 1), torch.float32, "local")
        assert (args.sequence_parallel, model_config_from_args(args).moe_capacity_sequence_shards) == (sp, shards), tp


def group_experts(model: dict, args) -> dict:
    """A file in megatron-core's legacy GroupedMLP names (moe_grouped_gemm): per layer, weight1 [hidden,
    E_l * fc1 rows] whose view [E_l, hidden, -1] holds each local expert's fc1.T, and weight2 likewise."""
    out, experts = {}, {}
    for key, value in model.items():
        prefix, sep, rest = key.partition(".experts.local_experts.")
        if not sep:
            out[key] = value
        elif rest.endswith(".weight"):
            experts.setdefault(prefix, {})[rest] = value
    for prefix, held in experts.items():
        local = range(args.num_experts // args.expert_model_parallel_size)
        fc1 = torch.stack([held[f"{l}.linear_fc1.weight"].T for l in local])  # [E_l, hidden, fc1 rows]
        fc2 = torch.stack([held[f"{l}.linear_fc2.weight"].T for l in local])  # [E_l, ffn, hidden]
        out[f"{prefix}.experts.weight1"] = fc1.reshape(args.hidden_size, -1)  # the same memory, GroupedMLP's shape
        out[f"{prefix}.experts.weight2"] = fc2.reshape(-1, args.hidden_size)
    return out


def test_reads_megatron_core_grouped_experts(mcore, moe_dirs, tmp_path):
    """moe_grouped_gemm checkpoints (legacy GroupedMLP weight1/weight2) read as the local names do: every
    file strict-loads into megatron-core's GroupedMLP, converts back bit-exact, and at tp=ep=1 megatron-core's
    own grouped forward gives transformers' logits (so the layout is what GroupedMLP computes with)."""
    src, fmt, hf = moe_dirs["qwen2_moe"]
    for (tp, ep), name in (((2, 2), "tp2ep2"), ((1, 1), "one")):
        local, grouped = tmp_path / f"local-{name}", tmp_path / f"grouped-{name}"
        convert(str(src), fmt, str(local), "megatron", Options(tp=tp, ep=ep))
        for path in sorted((local / "release").glob("*/model_optim_rng.pt")):
            state = load_to_memory(path)
            state["args"].moe_grouped_gemm = state["args"].moe_use_legacy_grouped_gemm = True
            state["model"] = group_experts(state["model"], state["args"])
            (grouped / "release" / path.parent.name).mkdir(parents=True)
            torch.save(state, grouped / "release" / path.parent.name / "model_optim_rng.pt")
            t, e = int(path.parent.name[8:10]), int(path.parent.name[11:] or 0)
            model = mcore.gpt_model(state["args"], t, 0, e)
            model.load_state_dict(state["model"], strict=True)
        (grouped / "latest_checkpointed_iteration.txt").write_text("release")
        convert(str(grouped), "megatron", str(tmp_path / f"hf-{name}"), "hf")
        assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / f"hf-{name}"))
    model.config.bf16 = True  # GroupedMLP asserts it (its CUDA kernel's dtype); the parameters stay fp32
    x = tokens()
    with mcore.grouped_gemm_on_cpu():
        logits = mcore.logits(model, x)[..., :VOCAB]
    torch.testing.assert_close(logits, hf(x).logits.detach(), atol=1e-5, rtol=1e-5)


# Megatron-LM's add_bias_linear on a mixture of experts: every linear layer's bias, a dense first layer's included,
# on grouped-query attention with q/k/v biases (gpt-oss's own pieces are tested in test_families_gpt_oss.py).
BIASED_MOE = dict(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=64,
                  max_seq_len=64, moe_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, moe_dense_layers=[0],
                  qkv_bias=True, linear_bias=True, moe_router_bias=True, moe_ffn_bias=True)


def test_biased_moe_round_trips_and_megatron_core_computes_it(mcore, tmp_path):
    """Written at tp2 x pp2 x ep2 (experts whole: megatron-core's biased experts need expert tensor parallelism 1) and
    read back bit-exact; every file strict-loads into megatron-core's GPTModel and its forward at tp1 gives ours
    (1e-5). Shared experts with biases, which megatron-core refuses to build, are refused both ways by name."""
    from megatron_llm.checkpoint.megatron import Layout, megatron_args, model_config_from_args
    from megatron_llm.checkpoint.native import save_weights
    from megatron_llm.config import Config, ModelConfig
    from megatron_llm.errors import UsageError
    from megatron_llm.model import build_model

    cfg = ModelConfig(**BIASED_MOE)
    model = build_model(cfg, "cpu", seed=0)
    with torch.no_grad():  # biases start at 0
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2, ep=2))
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "back"), "native")
    assert_same_tensors(model.state_dict(), native_tensors(tmp_path / "back"))
    files = sorted((tmp_path / "mg" / "release").glob("*/model_optim_rng.pt"))
    assert [f.parent.name for f in files] == ["mp_rank_00_000_000", "mp_rank_00_001_000", "mp_rank_01_000_001",
                                              "mp_rank_01_001_001"]
    for file in files:
        t, p, e = map(int, file.parent.name.split("_")[2:])
        shard = safe_load(file)
        mcore.gpt_model(shard["args"], t, p, e).load_state_dict(shard["model"], strict=True)
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg1"), "megatron")
    shard = safe_load(tmp_path / "mg1" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    reference = mcore.gpt_model(shard["args"], 0, 0).eval()
    reference.load_state_dict(shard["model"], strict=True)
    with torch.no_grad():
        expected = model.eval()(tokens())
    torch.testing.assert_close(mcore.logits(reference, tokens())[..., :VOCAB], expected, atol=1e-5, rtol=1e-5)
    shared = dataclasses.replace(cfg, moe_shared_ffn_hidden_size=32)
    with pytest.raises(UsageError, match="megatron-core's shared experts refuse them"):
        megatron_args(shared, Layout.of(shared, 1, 1), torch.float32, "local")
    shard["args"].moe_shared_expert_intermediate_size = 32
    with pytest.raises(UsageError, match="add_bias_linear=True: with shared experts, which megatron-core builds without"):
        model_config_from_args(shard["args"])


# ------------------------------------------------------------------------------------------------
# Multi-head latent attention: the args (megatron_mla.py) and a training step from DeepSeek-V3's checkpoint.


@pytest.mark.parametrize("m", [1.0, 0.707], ids=["deepseek-v3", "deepseek-v2"])
def test_latent_attention_args_hold_yarn_as_megatron_core_computes_it(m):
    """DeepSeek-V3's and -V2's published YaRN (factor 40, mscale = mscale_all_dim = 1 or 0.707) write as Megatron-LM's
    rope_type yarn, rotary_scaling_factor, mscale and mscale_all_dim and read back as every field of the model; the
    softmax scale and the cos/sin factor are megatron-core's own (MultiLatentAttention.softmax_scale and
    YarnRotaryEmbedding's concentration factor). Args without --rope-type read as megatron-core's default, YaRN.
    A YaRN setting no Megatron-LM flag holds is refused by name."""
    import transformers
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor, _yarn_get_mscale)

    from megatron_llm.checkpoint.families import family
    from megatron_llm.checkpoint.megatron import Layout, megatron_args, model_config_from_args
    from megatron_llm.errors import UsageError
    from megatron_llm.model.rope import rope_frequencies

    prefix, extra = MOE_HF["deepseek_v3"]
    extra = {**extra, "rope_scaling": {**extra["rope_scaling"], "mscale": m, "mscale_all_dim": m}}
    cfg = family("deepseek_v3").read_config(transformers.AutoConfig.for_model("deepseek_v3", **{**MOE_SMALL, **extra}).to_dict())
    args = megatron_args(cfg, Layout.of(cfg, 2, 1), torch.float32, "local")
    assert (args.rope_type, args.rotary_scaling_factor, args.mscale, args.mscale_all_dim) == ("yarn", 40.0, m, m)
    back = model_config_from_args(args)
    assert back == dataclasses.replace(cfg, moe_aux_loss_scope="layer", rope_scaling=back.rope_scaling)
    assert back.attention_scale == pytest.approx(_yarn_get_mscale(40.0, m) ** 2 / 24**0.5, rel=1e-15)
    inv_freq, factor = rope_frequencies(8, cfg.rope_theta, back.rope_scaling, cfg.max_seq_len)
    assert factor == pytest.approx(_yarn_get_concentration_factor(40.0, m, m), rel=1e-15)
    assert torch.equal(inv_freq, rope_frequencies(8, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)[0])
    args.rope_type, args.rotary_scaling_factor = None, 4.0  # Megatron-LM's MLA default: yarn
    assert model_config_from_args(args).rope_scaling["factor"] == 4.0
    longer = {**cfg.rope_scaling, "original_max_position_embeddings": 8192}
    with pytest.raises(UsageError, match=r"model\.rope_scaling=.* with latent attention: its RoPE scaling there is YaRN "
                                         r"with \{'original_max_position_embeddings': 4096"):
        megatron_args(dataclasses.replace(cfg, rope_scaling=longer), Layout.of(cfg, 1, 1), torch.float32, "local")


def test_training_continues_from_a_megatron_deepseek_v3_checkpoint(moe_dirs, tmp_path):
    """DeepSeek-V3 written at tp2 pp2 ep2 and read back trains on: one step from the Megatron checkpoint gives
    transformers' loss (DeepSeek's has no aux loss) and gradients on the latent projections and the experts (SGD, lr 1:
    the update is minus the gradient)."""
    from test_families_moe import our_sgd_step

    src, _, hf = moe_dirs["deepseek_v3"]
    convert(str(src), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, pp=2, ep=2))
    x = tokens()
    _, result, grad = our_sgd_step(tmp_path / "mg", x)
    hf.train()
    try:
        expected = hf(x, labels=x)
        expected.loss.backward()
        assert result.loss == pytest.approx(expected.loss.item(), rel=1e-5)
        layer = hf.model.layers[3]
        for ours, theirs in (("attention.wq_a", layer.self_attn.q_a_proj), ("attention.wq_b", layer.self_attn.q_b_proj),
                             ("attention.wkv_a", layer.self_attn.kv_a_proj_with_mqa),
                             ("attention.wkv_b", layer.self_attn.kv_b_proj), ("attention.wo", layer.self_attn.o_proj),
                             ("feed_forward.router", layer.mlp.gate)):
            torch.testing.assert_close(grad[f"layers.3.{ours}.weight"], theirs.weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(grad["layers.3.feed_forward.experts.w2"], layer.mlp.experts.down_proj.grad,
                                   atol=1e-6, rtol=1e-4)
    finally:
        hf.zero_grad(set_to_none=True)
        hf.eval()


# ------------------------------------------------------------------------------------------------
# Training continues from a converted checkpoint.


def _rename_tensors(mg: Path, names: dict) -> None:
    """Renames, in every file, each tensor whose name ends with a key of `names` to end with its value instead."""
    for path in (mg / "release").glob("*/model_optim_rng.pt"):
        state = load_to_memory(path)
        state["model"] = {next((k[: -len(a)] + b for a, b in names.items() if k.endswith(a)), k): v
                          for k, v in state["model"].items()}
        torch.save(state, path)


def _set_megatron_args(mg: Path, **values) -> None:
    for path in (mg / "release").glob("*/model_optim_rng.pt"):
        state = load_to_memory(path)
        vars(state["args"]).update(values)
        torch.save(state, path)


MOE_BAD = {
    # name: (input format, extra flags, words the one-line error must contain)
    "ep-not-dividing-experts": ("hf", ["--output-format", "megatron", "--ep", "3"], "--ep 3 does not divide the model's 4 experts"),
    "te-spec": ("hf", ["--output-format", "megatron", "--megatron-spec", "te"], "--megatron-spec te has no mixture-of-experts names"),
    "renormalised-top-1": ("hf", ["--output-format", "megatron"], "cannot express a renormalised softmax router with model.moe_top_k 1"),
    "etp-not-dividing-tp": ("megatron", ["--output-format", "hf"], "expert tensor parallelism 4 does not divide tp 2"),
    "etp-flag-not-dividing-tp": ("hf", ["--output-format", "megatron", "--tp", "2", "--etp", "4"],
                                 "expert tensor parallelism 4 does not divide tp 2"),
    "sinkhorn": ("megatron", ["--output-format", "hf"], "moe_router_load_balancing_type='sinkhorn'"),
    "several-balancing-types": ("megatron", ["--output-format", "hf"],
                                "moe_router_load_balancing_type=['seq_aux_loss', 'aux_loss']: we read only one of"),
    "padded-with-expert-bias": ("megatron", ["--output-format", "hf"],
                                "moe_pad_expert_input_to_capacity=True: its expert-bias update counts the padding"),
    # args megatron-core computes with, which ours has no equal for (SET_ARGS)
    "softmax-off-by-one": ("megatron", ["--output-format", "hf"], "softmax_type='off-by-one'; our model supports"),
    "quick-geglu-unshifted": ("megatron", ["--output-format", "hf"], "quick_geglu with glu_linear_offset=0.0 and "
                              "activation_func_clamp_value=None: ours is gpt-oss's"),
    "window-looking-ahead": ("megatron", ["--output-format", "hf"], "window_size=(7, 3): its windows see 3 keys ahead"),
    "yarn-unset": ("megatron", ["--output-format", "hf"], "position_embedding_type='yarn' without yarn_rotary_scaling_factor"),
}
SET_ARGS = {"softmax-off-by-one": dict(softmax_type="off-by-one"), "quick-geglu-unshifted": dict(swiglu=False, quick_geglu=True),
            "window-looking-ahead": dict(window_size=(7, 3)), "yarn-unset": dict(position_embedding_type="yarn")}


@pytest.mark.parametrize("case", MOE_BAD)
def test_moe_layouts_megatron_cannot_hold_or_we_cannot_read_are_refused(moe_dirs, tmp_path, capsys, case):
    input_format, flags, message = MOE_BAD[case]
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in moe_dirs["mixtral"][0].iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    convert(str(hf), "hf", str(tmp_path / "mg"), "megatron", Options(tp=2, ep=2))
    if case == "renormalised-top-1":
        (hf / "config.json").write_text((hf / "config.json").read_text().replace('"num_experts_per_tok": 2', '"num_experts_per_tok": 1'))
    elif case == "etp-not-dividing-tp":  # a file of tp rank t would hold expert slice r % 4, which t does not tell
        _set_megatron_args(tmp_path / "mg", expert_tensor_parallel_size=4)
    elif case == "sinkhorn":
        _set_megatron_args(tmp_path / "mg", moe_router_load_balancing_type="sinkhorn")
    elif case == "several-balancing-types":  # Megatron-LM sums them, each with its coefficient
        _set_megatron_args(tmp_path / "mg", moe_router_load_balancing_type=["seq_aux_loss", "aux_loss"],
                           moe_aux_loss_coeff=[1e-4, 1e-3])
    elif case in SET_ARGS:
        _set_megatron_args(tmp_path / "mg", **SET_ARGS[case])
    elif case == "padded-with-expert-bias":
        _set_megatron_args(tmp_path / "mg", moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                           moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    src = hf if input_format == "hf" else tmp_path / "mg"
    code, out, err = run_cli(capsys, "--input", src, "--input-format", input_format, "--output", tmp_path / "out", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mg"]  # no output, no temporary directory


LATENT_BAD = {
    # name: (args set on DeepSeek-like's Megatron files before they are read, or None: the flags refuse the write;
    # the flags; words the one-line error must contain)
    "te-spec": (None, ["--output-format", "megatron", "--megatron-spec", "te"],
                "--megatron-spec te fuses latent attention's norms into its up projections"),
    "interleaved-twice": (dict(rotary_interleaved=True), ["--output-format", "native"],
                          "multi_latent_attention with rotary_interleaved=True: megatron-core's TransformerConfig refuses it"),
    "latents-unnormalised": (dict(qk_layernorm=False), ["--output-format", "native"],
                             "multi_latent_attention with qk_layernorm=False: its latents are not normalised"),
    # args promising an MTP block (read since tests/test_mtp.py) that the files do not hold
    "multi-token-prediction": (dict(mtp_num_layers=1), ["--output-format", "native"],
                               "missing tensors ['mtp.layers.0.eh_proj.weight'"),
    # Megatron-LM's Transformer Engine spec fuses the latent norm into the up projection that follows it
    "te-spec-read": ({"kv_layernorm.weight": "linear_kv_up_proj.layer_norm_weight"}, ["--output-format", "native"],
                     "holds latent attention in the Transformer Engine spec"),
}


@pytest.mark.parametrize("case", LATENT_BAD)
def test_latent_attention_megatron_cannot_hold_or_we_cannot_read_is_refused(moe_dirs, tmp_path, capsys, case):
    values, flags, message = LATENT_BAD[case]
    src, fmt = moe_dirs["deepseek-like"][0], "native"
    if values is not None:
        convert(str(src), fmt, str(tmp_path / "mg"), "megatron")
        if case == "te-spec-read":
            _rename_tensors(tmp_path / "mg", values)
        else:
            _set_megatron_args(tmp_path / "mg", **values)
        src, fmt = tmp_path / "mg", "megatron"
    code, out, err = run_cli(capsys, "--input", src, "--input-format", fmt, "--output", tmp_path / "out", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()
