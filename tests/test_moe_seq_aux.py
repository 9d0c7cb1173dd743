"""model.moe_aux_loss_scope sequence (Megatron's seq_aux_loss, DeepSeek-V3's sequence-wise balance loss) against
megatron-core 0.16's own TopKRouter: the loss it logs and the router weight's gradient from the loss alone,
for a softmax and a sigmoid router with a (nonzero) expert bias and group limits; a training step logs it and
at one sequence per micro-batch takes the layer scope's step; the config refuses it with the global variant."""

from __future__ import annotations

import pytest
import torch

from megatron_llm.checkpoint.megatron import Layout, megatron_args
from megatron_llm.errors import UsageError
from megatron_llm.model import build_model
from megatron_llm.model_config import ModelConfig
from megatron_llm.parallel import ParallelDims
from megatron_llm.training.moe_loss import router_collector
from megatron_llm.training.step import train_step
from tests.test_moe import megatron_router_losses, moe_cfg, seeded_batch

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

E, B, S, HIDDEN, COEFF = 8, 3, 16, 32, 0.1
ONE = ParallelDims(1, 0, 1, 1, 1)
# DeepSeek-V3's router in small: sigmoid scores, 2 groups of 4 experts of which a token uses 1, the expert bias
ROUTERS = {"softmax": dict(moe_score="softmax"),
           "sigmoid-bias-groups": dict(moe_score="sigmoid", moe_expert_bias=True, moe_groups=2, moe_topk_groups=1)}


def seq_model(router: dict):
    cfg = ModelConfig(vocab_size=64, hidden_size=HIDDEN, num_layers=1, num_heads=4, ffn_hidden_size=48, max_seq_len=S,
                      moe_experts=E, moe_top_k=2, moe_ffn_hidden_size=16, moe_aux_loss_coeff=COEFF,
                      moe_aux_loss_scope="sequence", **router)
    cfg.validate()
    model = build_model(cfg, "cpu", seed=0)
    moe = model.layers["0"].feed_forward
    with torch.no_grad():
        moe.router.weight.normal_(generator=torch.Generator().manual_seed(1))  # spread, uneven routing
        if moe.router.expert_bias is not None:  # as after training: moves the choice away from the scores' top-k
            moe.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.3)
    return cfg, model, moe


@pytest.mark.parametrize("name", ROUTERS)
def test_sequence_scope_loss_and_router_gradient_equal_megatron_core_seq_aux_loss(mcore, name):
    """Megatron-core's TopKRouter, from the args our Megatron writer saves (seq_aux_loss), on the same [s, b, h]
    input: the seq_load_balancing_loss it tracks equals the aux loss we log, and the router weight's gradient
    from that loss alone (its MoEAuxLossAutoScaler; our identity on the layer's output) equals ours."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.moe.router import TopKRouter

    cfg, model, moe = seq_model(ROUTERS[name])
    args = megatron_args(cfg, Layout.of(cfg, 1, 1), torch.float32, "local")
    assert args.moe_router_load_balancing_type == "seq_aux_loss"
    with mcore.patched([mcore.CPU_DEVICE]):
        router = TopKRouter(mcore.transformer_config_from_args(args), ProcessGroupCollection.use_mpu_process_groups())
    router.set_layer_number(1)
    router.weight.data.copy_(moe.router.weight.data)
    if router.expert_bias is not None:
        router.expert_bias.copy_(moe.router.expert_bias)
    # Three unequal sequences: the second's tokens are one token repeated, all routed to the same experts.
    x = torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(2))
    x[1] = x[1, :1]

    clear_aux_losses_tracker()
    with mcore.forward_on_cpu():
        probs, _ = router(x.transpose(0, 1).contiguous())  # [s, b, h]: megatron-core's order
        probs.backward(torch.zeros_like(probs))  # only the attached aux loss sends a gradient
    theirs = get_moe_layer_wise_logging_tracker()["seq_load_balancing_loss"]["values"][0].item()
    clear_aux_losses_tracker()

    routers = router_collector(model)
    routers.start_step(ONE, micro_batches=1)
    out = moe(x)
    out.backward(torch.zeros_like(out))
    logged = routers.finish_step(model, ONE, 1, updated=False)
    assert logged["moe_aux_loss"] == pytest.approx(theirs, rel=1e-6)
    torch.testing.assert_close(moe.router.weight.grad, router.weight.grad, rtol=1e-5, atol=1e-8)
    assert router.weight.grad.abs().max() > 0
    # Not the layer scope's loss over the whole micro-batch (the sequences are unequal) ...
    logits = x.view(-1, HIDDEN) @ moe.router.weight.detach().T
    whole, _ = megatron_router_losses(logits, cfg.moe_top_k, cfg.moe_score)
    assert abs(whole.item() - theirs) > 0.1 * theirs
    # ... and with the bias the choice differs from the scores' top-k, which the balance counts.
    if moe.router.expert_bias is not None:
        assert not torch.equal(moe.stats.counts, moe.stats.balance_counts.sum(0))


def step(scope: str, micro_batches: list[dict]):
    """One SGD train_step of a 2-layer MoE at this scope: (result, parameter updates, each router's logits)."""
    model = build_model(moe_cfg(moe_aux_loss_coeff=COEFF, moe_z_loss_coeff=0.01, moe_aux_loss_scope=scope), "cpu", seed=0)
    logits = []
    for block in model.layers.values():
        block.feed_forward.router.register_forward_hook(lambda m, args, out: logits.append(out[2].detach()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micro_batches, ONE, z_loss=0.0,
                        grad_clip=0.0, autocast=None)
    return result, {k: before[k] - v for k, v in model.state_dict().items()}, logits


def test_a_training_step_adds_the_sequence_loss_and_one_sequence_is_the_layer_scope():
    """train_step logs the mean over layers of the per-sequence loss averaged over sequences (Megatron's formula
    on each sequence's router logits); with one sequence per micro-batch the sequence scope's step is the layer
    scope's: loss, logged values and updates."""
    batch = seeded_batch()  # 2 sequences of 16 tokens
    result, _, logits = step("sequence", [batch])
    per_sequence = [megatron_router_losses(layer.view(2, 16, E)[b], 2, "softmax")[0] for layer in logits for b in range(2)]
    assert result.moe["moe_aux_loss"] == pytest.approx(torch.stack(per_sequence).mean().item(), rel=1e-6)
    assert result.moe["moe_aux_loss"] != pytest.approx(step("layer", [batch])[0].moe["moe_aux_loss"], rel=1e-3)

    single = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]  # two micro-batches of one sequence
    (seq, seq_update, _), (layer, layer_update, _) = step("sequence", single), step("layer", single)
    assert seq.loss == layer.loss and seq.moe == layer.moe
    assert all(torch.equal(seq_update[k], layer_update[k]) for k in seq_update)
    assert seq_update["layers.0.feed_forward.router.weight"].abs().max() > 0


def test_the_sequence_scope_refuses_the_global_variant_in_one_line():
    with pytest.raises(UsageError, match=r"model\.moe_aux_loss_global .* model\.moe_aux_loss_scope sequence .*: choose one"):
        moe_cfg(moe_aux_loss_scope="sequence", moe_aux_loss_global=True)
