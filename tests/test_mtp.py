"""Multi-token prediction (DeepSeek-V3; model/mtp.py, training/mtp_loss.py, checkpoint/megatron_mtp.py) against
megatron-core's own GPTModel with its MTP block: our weights written as a Megatron checkpoint, strict-loaded into
megatron-core, and the main loss, each depth's loss and the gradients of the MTP weights compared."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import megatron_llm
from conftest import ROOT
from megatron_llm.checkpoint.convert import Options, convert
from megatron_llm.checkpoint.megatron import Layout
from megatron_llm.checkpoint.megatron_io import safe_load
from megatron_llm.checkpoint.native import save_weights
from megatron_llm.config import Config, ModelConfig, ParallelConfig, load_config
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.training.loss import micro_batch_loss
from megatron_llm.training.mtp_loss import mtp_loss, mtp_targets

VOCAB = 128  # megatron-core's padded vocabulary is this one: its cross-entropy runs over the same columns as ours
DENSE = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_hidden_size=96,
             max_seq_len=32, tie_embeddings=False, mtp_layers=2, mtp_loss_coeff=0.3)
DEEPSEEK_LIKE = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=32,
                     moe_experts=8, moe_top_k=4, moe_ffn_hidden_size=32, moe_score="sigmoid", moe_expert_bias=True,
                     moe_groups=4, moe_topk_groups=2, moe_routed_scale=2.5, moe_shared_ffn_hidden_size=64,
                     moe_dense_layers=[0], moe_aux_loss_scope="layer", attention="mla", head_dim=16,
                     mla_kv_lora_rank=16, mla_rope_head_dim=8, mla_v_head_dim=8, rope_interleaved=True, mtp_layers=1)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    mask = torch.ones(2, 16)
    mask[0, 3:6] = 0  # a prompt-like gap: its rolled copy masks other depths' targets
    return tokens[:, :-1], tokens[:, 1:], mask


def _ours(model, x, labels, mask):
    """(main per-token losses, per-depth means, gradients) of our training objective at one micro-batch."""
    model.train()
    tokens = mask.sum()
    loss, token_ce = micro_batch_loss(model(x), labels, mask, 0.0, tokens)
    mtp = mtp_loss(model)
    (loss + mtp({"labels": labels, "loss_mask": mask}, tokens)).backward()
    means = mtp.scalars(lambda sums: sums)
    return token_ce, [means[f"mtp_loss/depth{k + 1}"] for k in range(model.cfg.mtp_layers)]


def _megatron_core(mcore, shard, x, labels, mask):
    """megatron-core's GPTModel on the shard: per-token main loss [b, s], its MTPLossLoggingHelper's per-depth losses,
    the model (with gradients). Per-token loss mode, the MTP gradient scaled by 1/tokens as the main loss's."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    model = mcore.gpt_model(shard["args"], 0, 0)
    model.config.calculate_per_token_loss = True
    model.load_state_dict(shard["model"], strict=True)
    model.train()
    s = x.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0) / mask.sum())
    try:
        with mcore.forward_on_cpu():
            ce = model(x, torch.arange(s)[None].expand_as(x), causal, labels=labels, loss_mask=mask)
            ((ce * mask).sum() / mask.sum()).backward()
    finally:
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return ce, MTPLossLoggingHelper.tracker["values"].tolist(), model


@pytest.mark.parametrize("kind", ["dense", "deepseek"])
def test_losses_and_gradients_equal_megatron_core(mcore, tmp_path, kind):
    cfg = ModelConfig(**(DENSE if kind == "dense" else DEEPSEEK_LIKE))
    model = build_model(cfg, "cpu", seed=3)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    assert (shard["args"].mtp_num_layers, shard["args"].mtp_loss_scaling_factor) == (cfg.mtp_layers, cfg.mtp_loss_coeff)
    x, labels, mask = _batch()
    token_ce, depths = _ours(model, x, labels, mask)
    ce, their_depths, theirs = _megatron_core(mcore, shard, x, labels, mask)
    torch.testing.assert_close(token_ce, ce.detach() * mask, atol=1e-5, rtol=1e-5)
    assert depths == pytest.approx(their_depths, abs=1e-5)
    for k, layer in enumerate(theirs.mtp.layers):
        ours = model.mtp.layers[str(k)]
        pairs = [(ours.eh_proj, layer.eh_proj), (ours.enorm, layer.enorm), (ours.hnorm, layer.hnorm),
                 (ours.norm, layer.final_layernorm), (ours.block.attention.wo, layer.transformer_layer.self_attention.linear_proj)]
        for a, b in pairs:
            torch.testing.assert_close(a.weight.grad, b.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model.tok_embeddings.weight.grad, theirs.embedding.word_embeddings.weight.grad,
                               atol=1e-6, rtol=1e-4)  # the embedding's gradient reaches it from every depth
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "back"), "native")
    back = megatron_llm.load_model(str(tmp_path / "back"))
    assert back.cfg == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_targets_roll_as_megatron_core_within_documents():
    labels, mask = torch.arange(1, 7)[None], torch.ones(1, 6)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1]])
    shifted, kept = mtp_targets(labels, mask, 2, documents)
    assert shifted.tolist() == [[3, 4, 5, 6, 0, 0]] and kept.tolist() == [[1, 0, 0, 1, 0, 0]]


def test_inference_forward_and_layouts():
    cfg = ModelConfig(**DENSE)
    model = build_model(cfg, "cpu", seed=0).eval()
    x, _, _ = _batch()
    model(x)
    assert model.mtp.take() == []  # evaluation and generation leave the depths out
    ParallelConfig(pp=2).validate(cfg, 16, 2, False)  # pipelines hold the depths on the last stage, but not zbv's V
    with pytest.raises(UsageError, match="mtp_layers .* zbv .* use parallel.schedule interleaved_zb"):
        ParallelConfig(pp=2, schedule="zbv", virtual_stages=2).validate(cfg, 16, 4, False)
    with pytest.raises(UsageError, match="--pp 2"):  # the Megatron file layout of that copy is not written
        Layout.of(cfg, 1, 2)


def _step(cfg, micro_batches):
    """One SGD step (lr 1) through train_step: (result, each parameter's update)."""
    from megatron_llm.parallel import ParallelDims
    from megatron_llm.training.step import train_step

    model = build_model(cfg, "cpu", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micro_batches, ParallelDims(1, 0, 1, 1, 1),
                        z_loss=0.0, grad_clip=0.0, autocast=None)
    return result, {k: before[k] - v for k, v in model.state_dict().items()}


def test_step_is_a_token_mean_whatever_the_micro_batches():
    """The MTP loss is normalised by the step's tokens, as the main loss: one micro-batch of two sequences and two of
    one give the same update and the same logged depth losses."""
    x, labels, mask = _batch(1)
    batch = dict(tokens=x, labels=labels, loss_mask=mask, channel=torch.zeros(2, dtype=torch.long))
    cfg = ModelConfig(**DENSE)
    whole, whole_update = _step(cfg, [batch])
    halves, halves_update = _step(cfg, [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)])
    assert whole.moe == pytest.approx(halves.moe, abs=1e-6) and set(whole.moe) == {"mtp_loss/depth1", "mtp_loss/depth2"}
    for name, update in whole_update.items():
        torch.testing.assert_close(update, halves_update[name], atol=1e-6, rtol=1e-5)
    assert whole_update["mtp.layers.1.eh_proj.weight"].abs().max() > 0


def test_mtp_router_is_logged_and_balanced_as_layer_num_layers():
    """The MoE of the MTP block (megatron-core's layer number num_layers + k) gets its expert load logged and its expert
    bias moved under its own index, not under decoder layer 0."""
    x, labels, mask = _batch(2)
    cfg = ModelConfig(**{**DEEPSEEK_LIKE, "moe_aux_loss_coeff": 0.01})
    result, update = _step(cfg, [dict(tokens=x, labels=labels, loss_mask=mask, channel=torch.zeros(2, dtype=torch.long))])
    assert sum(result.moe[f"expert_load/layer2/expert{e}"] for e in range(8)) == pytest.approx(1.0)
    assert "expert_load/layer0/expert0" not in result.moe  # layer 0 is dense
    assert update["mtp.layers.0.block.feed_forward.router.expert_bias"].abs().min() > 0


def test_activation_checkpointing_and_compile_reach_the_mtp_blocks():
    """training.activation_checkpointing full recomputes each MTP depth's block as the decoder's (its attention runs
    again in the backward, autograd keeps less) with the same loss and gradients; training.compile compiles it."""
    from megatron_llm.parallel import ParallelDims, parallelize
    from megatron_llm.training.step import train_step

    x, labels, mask = _batch(3)
    batch = dict(tokens=x, labels=labels, loss_mask=mask, channel=torch.zeros(2, dtype=torch.long))
    cfg = ModelConfig(**DENSE)
    runs = []
    for recompute in (False, True):
        model = parallelize(cfg, ParallelDims(1, 0, 1, 1, 1), ParallelConfig(), device=torch.device("cpu"), seed=5,
                            compile=False, micro_batches=1, recompute=recompute)
        calls = []
        model.mtp.layers["1"].block.attention.register_forward_hook(lambda *_: calls.append(1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        saved = []  # elements autograd keeps for the backward, outside the recomputed blocks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [batch], ParallelDims(1, 0, 1, 1, 1),
                                z_loss=0.0, grad_clip=0.0, autocast=None)
        update = {k: before[k] - v for k, v in model.state_dict().items()}  # the gradient, at lr 1
        runs.append((result, update, len(calls), sum(saved)))
    (plain, grads, calls, saved), (recomputed, grads_r, calls_r, saved_r) = runs
    assert (calls, calls_r) == (1, 2)  # forward, then once more in the backward
    assert saved_r < saved / 2
    assert recomputed.loss == pytest.approx(plain.loss, abs=1e-6) and recomputed.moe == pytest.approx(plain.moe, abs=1e-6)
    assert grads.keys() == grads_r.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-9, rtol=1e-6, msg=name)  # tiny: wq's are ~1e-6
    assert grads["mtp.layers.1.block.attention.wq.weight"].abs().max() > 1e-6
    compiled = parallelize(cfg, ParallelDims(1, 0, 1, 1, 1), ParallelConfig(), device=torch.device("cpu"), seed=5,
                           compile=True, micro_batches=1)
    assert all(layer.block._compiled_call_impl is not None for layer in compiled.mtp.layers.values())


def test_memory_estimate_holds_the_mtp_depths():
    """tools/estimate_memory.py counts the depths' parameters (one process: the model's count; ep 2 over dp 2 with DDP:
    half the routed experts of the decoder and MTP blocks alike). Its activations, checked with --measure (CPU fp32,
    load 3): tiny.yaml, 2 depths, micro-batch 16 x 256: 0.62 GiB estimated, 0.63 measured (0.38 without them);
    with activation_checkpointing full 0.30 / 0.27; tp 2 sp 0.40 / 0.38; mixtral_tiny.yaml, 1 depth, 2 x 256: 1.61 / 1.45."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from estimate_memory import estimate

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["--model.mtp_layers", "2"])
    assert estimate(cfg, dp=1, act_bytes=4)[0].params == cfg.model.num_params() > 4_700_000
    pp2 = load_config(str(ROOT / "configs" / "tiny.yaml"), ["--model.mtp_layers", "2", "--parallel.pp", "2",
                                                            "--training.grad_accum_steps", "2"])
    copy = pp2.model.vocab_size * pp2.model.hidden_size  # the last stage's embedding, for the depths
    assert sum(s.params for s in estimate(pp2, dp=1, act_bytes=4)) == cfg.model.num_params() + copy
    moe = ["--model.mtp_layers", "1", "--parallel.ep", "2", "--parallel.data_parallel", "ddp"]
    ep2 = load_config(str(ROOT / "configs" / "mixtral_tiny.yaml"), moe)
    m = ep2.model
    routed = (m.num_layers + 1) * m.moe_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    assert estimate(ep2, dp=2, act_bytes=4)[0].params == m.num_params() - routed // 2


@pytest.fixture(scope="module")
def workers():
    from parallel_harness import Workers

    pool = Workers(2)
    yield pool
    pool.close()


def _check_mtp_chain(workers, corpus_dir, tmp_path, model: dict, chain: list) -> None:
    """tests/test_parallel.py's check_chain, and the logged per-depth MTP losses of every run equal one process's."""
    from test_parallel import LOSS_RTOL, check_chain

    ref, runs = check_chain(workers, corpus_dir, tmp_path, model, chain)
    for name, run in runs.items():
        for step, losses in run.mtp_losses.items():
            depths = {f"mtp_loss/depth{k + 1}" for k in range(model["model__mtp_layers"])}
            assert losses.keys() == ref.mtp_losses[step].keys() == depths, (name, step)
            for key, value in losses.items():
                assert value == pytest.approx(ref.mtp_losses[step][key], rel=LOSS_RTOL), (name, step, key)


def test_parallel_layouts_match_one_process(workers, corpus_dir, tmp_path):
    """A MoE model whose MTP depth is a MoE block: tp2 with sequence parallelism (each rank embeds its shard of the
    globally shifted tokens); pp2 1F1B, where the last stage embeds the tokens with its own copy of the embedding,
    whose gradient is summed with the first stage's; FSDP2 over dp 2 with the experts split ep 2 (the MTP block's
    too); each resuming from the one before, they continue one process's run: losses, per-channel sums, per-depth MTP
    losses and every parameter to tests/test_parallel.py's tolerances. The vocabulary (257) is padded at tp 2: the
    depths' logits are masked too."""
    model = dict(model__mtp_layers=1, model__num_layers=2, training__grad_accum_steps=2, training__eval_interval=0,
                 optimizer__eps=1e-6, model__moe_experts=4, model__moe_top_k=2, model__moe_ffn_hidden_size=64,
                 model__moe_aux_loss_coeff=0.01, model__moe_aux_loss_scope="layer", model__moe_aux_loss_global=True,
                 model__moe_score="sigmoid", model__moe_expert_bias=True, model__moe_bias_update_rate=0.01)
    _check_mtp_chain(workers, corpus_dir, tmp_path, model, [
        ("tp2-sp", 2, 1, 1, dict(parallel__sp=True)),
        ("pp2-1f1b", 1, 2, 1, {}),
        ("dp2-ep2-fsdp", 1, 1, 2, dict(parallel__data_parallel="fsdp", parallel__ep=2)),
    ])


def test_tied_pipeline_matches_one_process(workers, corpus_dir, tmp_path):
    """Tied embeddings, learned positions and an embedding norm: the last stage's head is its embedding copy, and
    the depths use every embedding parameter, all summed with the first stage's. Interleaved zero-bubble pp2 with
    the end stages holding no decoder layer (the first only embeds, the last only predicts), with evaluation."""
    model = dict(model__mtp_layers=2, model__num_layers=2, model__tie_embeddings=True, model__position="learned",
                 model__embedding_norm=True, training__grad_accum_steps=2, optimizer__eps=1e-6)
    _check_mtp_chain(workers, corpus_dir, tmp_path, model, [
        ("pp2-interleaved-zb", 1, 2, 1, dict(parallel__schedule="interleaved_zb", parallel__virtual_stages=2,
                                             parallel__stage_layers="[0, 1, 1, 0]")),
    ])


def test_flops_count_each_depth_as_a_layer_and_a_head():
    from megatron_llm.model import flops_per_token

    cfg = ModelConfig(**DENSE)
    plain = ModelConfig(**{**DENSE, "mtp_layers": 0})
    depth = ModelConfig(**{**DENSE, "mtp_layers": 0, "num_layers": 3})  # one more block, no projection or head
    block = flops_per_token(depth, 16) - flops_per_token(plain, 16)
    extra = 6 * (2 * 64 * 64 + 64 + 2 * 64 + VOCAB * 64)  # eh_proj, final norm, enorm + hnorm, the head once more
    assert flops_per_token(cfg, 16) == pytest.approx(flops_per_token(plain, 16) + 2 * (block + extra))


def test_megatron_tp2_shards_load_strictly_and_round_trip(mcore, tmp_path):
    """At tp 2 (eh_proj's rows split as megatron-core's ColumnParallelLinear) in the Transformer Engine spec's names, every
    shard strict-loads into megatron-core's GPTModel with its MTP block, and the way back is bit-exact."""
    cfg = ModelConfig(**DENSE)
    model = build_model(cfg, "cpu", seed=4)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    convert(str(tmp_path / "native"), "native", str(tmp_path / "mg"), "megatron", Options(tp=2, spec="te"))
    for t in range(2):
        shard = safe_load(tmp_path / "mg" / "release" / f"mp_rank_{t:02d}" / "model_optim_rng.pt")
        theirs = mcore.gpt_model(shard["args"], t, 0)
        theirs.load_state_dict(mcore.te_to_local_names(shard["model"]), strict=True)
        assert torch.equal(theirs.mtp.layers[1].eh_proj.weight, model.mtp.layers["1"].eh_proj.weight.chunk(2)[t])
    convert(str(tmp_path / "mg"), "megatron", str(tmp_path / "back"), "native")
    back = megatron_llm.load_model(str(tmp_path / "back")).state_dict()
    assert all(torch.equal(back[name], tensor) for name, tensor in model.state_dict().items())


def test_hf_depths_round_trip_load_in_transformers_and_give_megatron_cores_loss(mcore, tmp_path):
    """DeepSeek-V3's published layout: depth 1 is model.layers.{num_layers} with its own copies of the embedding and
    head. Written from our model, transformers loads it (skipping the layer) with our logits; hf -> native -> hf is
    bit-exact; the same directory converted to Megatron gives megatron-core's MTP loss equal to ours read from it."""
    cfg = ModelConfig(**{**DEEPSEEK_LIKE, "mtp_loss_coeff": 0.3, "norm_eps": 1e-6})  # one epsilon, as Megatron
    model = build_model(cfg, "cpu", seed=5)
    save_weights(tmp_path / "native", model.state_dict(), Config(model=cfg).to_dict())
    hf = tmp_path / "hf"
    convert(str(tmp_path / "native"), "native", str(hf), "hf", Options(hf_family="deepseek_v3"))
    tensors = load_file(hf / "model.safetensors")
    assert json.loads((hf / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert torch.equal(tensors["model.layers.2.eh_proj.weight"], model.mtp.layers["0"].eh_proj.weight)
    assert torch.equal(tensors["model.layers.2.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    x, labels, mask = _batch()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs(x).logits, atol=1e-5, rtol=1e-5)

    convert(str(hf), "hf", str(tmp_path / "back-native"), "native")
    convert(str(tmp_path / "back-native"), "native", str(tmp_path / "back"), "hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)

    convert(str(hf), "hf", str(tmp_path / "mg"), "megatron")
    shard = safe_load(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    read = megatron_llm.load_model(str(hf))
    assert read.cfg.mtp_layers == 1
    token_ce, depths = _ours(read, x, labels, mask)
    ce, their_depths, _ = _megatron_core(mcore, shard, x, labels, mask)
    torch.testing.assert_close(token_ce, ce.detach() * mask, atol=1e-5, rtol=1e-5)
    assert depths == pytest.approx(their_depths, abs=1e-5) and depths[0] > 0

    # transformers' save_pretrained drops the depths (its config keeps num_nextn_predict_layers 1): read without them
    theirs.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert megatron_llm.load_model(str(tmp_path / "saved")).cfg.mtp_layers == 0
    # a copy that is not the model's own tensor, and a second depth the files lack: refused in one line
    save_file({**tensors, "model.layers.2.embed_tokens.weight": tensors["model.embed_tokens.weight"] + 1},
              hf / "model.safetensors")
    with pytest.raises(UsageError, match=r"model\.layers\.2\.embed_tokens\.weight differs from model\.embed_tokens"):
        megatron_llm.load_model(str(hf))
    (hf / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                "num_nextn_predict_layers": 2}))
    with pytest.raises(UsageError, match=r"missing tensors \['model\.layers\.3\."):
        megatron_llm.load_model(str(hf))
    # a family without multi-token prediction names those with it
    with pytest.raises(UsageError, match="llama stores no multi-token prediction.*deepseek_v3, glm4_moe"):
        convert(str(tmp_path / "native"), "native", str(tmp_path / "llama"), "hf", Options(hf_family="llama"))
