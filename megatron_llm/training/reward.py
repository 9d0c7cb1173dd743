"""The reward model's objective (data.format pairs, model.head score): Bradley-Terry on preference pairs.

A micro-batch holds pairs as consecutive rows, chosen then rejected (data/pairs.py); each row's reward is
the score head's value at its last real token (`last`). Per pair:

    loss = -log sigmoid(r_chosen - r_rejected - margin) + centering * (r_chosen + r_rejected)^2

(the margin of Llama 2's reward models; the centering term of Eisenstein et al. keeps rewards near zero,
where a pairwise loss alone leaves them free to drift). The loss mask holds one 1 per pair, at the
chosen row's last token, so the step's count of loss "tokens" is its count of pairs, fixed before the
micro-batches as for language modelling, and the per-pair loss sits at that position for the per-channel
sums. Accuracy (r_chosen > r_rejected) and margin (r_chosen - r_rejected) are summed per channel the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_llm.errors import UsageError
from megatron_llm.training.channels import ChannelSums, ChannelTotals


def pair_rewards(scores: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [2p, s] and each row's last real token [2p] -> (r_chosen, r_rejected), each [p] in fp32."""
    r = scores.gather(1, last[:, None])[:, 0].float()  # [2p]
    return r[0::2], r[1::2]


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float, centering: float) -> torch.Tensor:
    """The per-pair loss [p] (see the module docstring)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    return loss + centering * (chosen + rejected).square() if centering else loss


class PairwiseObjective:
    """The schedule's loss function for one step of pairs, plus that step's accuracy and margin sums."""

    def __init__(self, margin: float, centering: float, num_channels: int, device: torch.device):
        self.margin, self.centering = margin, centering
        self.stats = {name: ChannelSums(num_channels, device) for name in ("accuracy", "margin")}

    def __call__(self, logits: torch.Tensor, mb: dict, step_pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, per-pair loss placed at each pair's loss-mask position [2p, s])."""
        chosen, rejected = pair_rewards(logits[..., 0], mb["last"])
        per_pair = pairwise_loss(chosen, rejected, self.margin, self.centering)
        where = mb["loss_mask"]  # [2p, s]: 1 at each chosen row's last token
        for name, value in (("accuracy", (chosen > rejected).float()), ("margin", chosen - rejected)):
            self.stats[name].add(_at_mask(value.detach(), where), where, mb["channel"])
        return per_pair.sum() / step_pairs, _at_mask(per_pair.detach(), where)

    def gather(self, group) -> dict[str, ChannelTotals]:
        return {name: sums.gather(group) for name, sums in self.stats.items()}


def _at_mask(per_pair: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per-pair values [p] spread to the pairs' loss-mask positions [2p, s], zero elsewhere (everywhere in
    the copies with a zero mask that fill up a pipeline's last evaluation group)."""
    out = torch.zeros_like(where, dtype=per_pair.dtype)
    out[0::2] = where[0::2] * per_pair[:, None]  # each chosen row holds its pair's one 1
    return out


def reward_objective(data_format: str, margin: float, centering: float, num_channels: int,
                     device: torch.device) -> Optional[PairwiseObjective]:
    """The pairwise objective for data.format pairs, else None (language modelling)."""
    return PairwiseObjective(margin, centering, max(num_channels, 1), device) if data_format == "pairs" else None


def stage_under_score_head(source: str, cfg, out: Path) -> None:
    """A weights-only native checkpoint at `out`: the language model `source` (any format) with its head
    replaced by the score head `cfg` trains (drawn as training initialises it, from training.seed), for
    checkpoint.init_from with model.head score. One process writes it; every rank then loads it."""
    from megatron_llm.checkpoint.convert import load_model
    from megatron_llm.checkpoint.native import save_weights
    from megatron_llm.model import build_model

    scored = build_model(cfg.model, "cpu", seed=cfg.training.seed)
    body = {k: v for k, v in load_model(source).state_dict().items() if not k.startswith("output.")}
    missing, unexpected = scored.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("output.") for k in missing):
        raise UsageError(f"{source} does not hold the model checkpoint.init_from describes ({(unexpected or missing)[0]})")
    save_weights(out, scored.state_dict(), cfg.to_dict())
