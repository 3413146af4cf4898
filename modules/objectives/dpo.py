"""Online DPO: two fresh samples per prompt, the reward picks winner and loser, DPO loss against the reference.

Papers: Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290 (the loss); Guo et al., "Direct
Language Model Alignment from Online AI Feedback", arXiv 2402.04792 (sampling the pair from the current policy
and labelling it with a reward / annotator). Loss (docs/algorithms.md s. 7):
    -log sigmoid(beta * [(logp_w - ref_w) - (logp_l - ref_l)])
`soft_labels: true` is the P3O authors' soft-label online DPO: with d = (logp_1 - ref_1) - (logp_2 - ref_2) and
p = sigmoid(r_1 - r_2) (a Bradley-Terry probability from the reward), -[p log sigmoid(beta d) + (1 - p) log
sigmoid(-beta d)]. On a tie p = 1/2 and the loss pulls d towards 0. With hard labels, pairs with equal rewards
carry no preference and are masked out (TRL makes the first response the winner of a tie). No importance ratio:
old logprobs are unused. `loss_type: ipo` (TRL's online DPO option; Azar et al., arXiv 2310.12036) replaces the
log-sigmoid by a square, (h_w - h_l - 1 / (2 beta))^2 with h the sequence's logp - ref (sums, as TRL's online
trainer; its offline one divides by the token counts, `modules.offline_dpo`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as TF

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective
from modules.objectives.p3o import pair_view


class OnlineDPO(Objective):
    """Online DPO on two fresh samples per prompt, the reward picking winner and loser (see the module docstring).

    Args:
        beta: the DPO temperature on the implicit reward difference (IPO: its regularisation tau).
        soft_labels: weight both orderings by sigmoid(r_1 - r_2) instead of a hard winner (the P3O authors' variant).
        loss_type: 'sigmoid' (DPO) or 'ipo' (the squared distance of the margin from 1 / (2 beta); TRL's option).
    """

    responses_per_prompt = 2
    separable_groups = True        # a pair's loss over the minibatch's count of decided pairs

    def __init__(self, beta: float = 0.1, soft_labels: bool = False, loss_type: Literal["sigmoid", "ipo"] = "sigmoid"):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"OnlineDPO: beta={beta}; expected > 0")
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"OnlineDPO: loss_type={loss_type!r}; expected 'sigmoid' or 'ipo'")
        if soft_labels and loss_type == "ipo":
            raise ValueError("OnlineDPO: soft_labels weights the two orderings of the sigmoid loss; loss_type 'ipo' has "
                             "a hard winner: set one of them")
        self.beta, self.soft_labels, self.loss_type = beta, soft_labels, loss_type

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        if batch.group_size != 2:
            raise ValueError(f"OnlineDPO needs 2 responses per prompt, got group_size={batch.group_size}")
        implicit = F.sequence_logprobs(batch.policy_logp(), batch.mask) - F.sequence_logprobs(batch.ref_logp, batch.mask)
        h1, h2 = pair_view(implicit)                                     # (P,) implicit rewards
        if batch.pair_rewards is None:
            r1, r2 = pair_view(batch.rewards.float())
            diff = r1 - r2                                               # (P,)
        else:
            diff = batch.pair_rewards[0::2, 1].float()                   # a pairwise reward: f(x, y1, y2)
        sign = torch.sign(diff)                                          # +1: y1 wins, -1: y2 wins
        margin = self.beta * (h1 - h2) * sign                            # beta * [(w) - (l)]
        if self.soft_labels:
            p, d = torch.sigmoid(diff), self.beta * (h1 - h2)
            losses = -(p * TF.logsigmoid(d) + (1 - p) * TF.logsigmoid(-d))
            keep = torch.ones_like(losses)
        elif self.loss_type == "ipo":                                    # (h_w - h_l - 1 / (2 beta))^2
            losses, keep = ((h1 - h2) * sign - 1 / (2 * self.beta)) ** 2, (sign != 0).float()
        else:
            losses, keep = -TF.logsigmoid(margin), (sign != 0).float()
        weight = batch.sequence_weights()                                # (N,) or 1.0: engine mismatch correction
        if torch.is_tensor(weight):
            w1, w2 = pair_view(weight)
            losses = losses * w1 * w2
        loss = F.masked_mean(losses, keep)
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), "margin": F.masked_mean(margin.detach(), keep),
            "accuracy": F.masked_mean((margin.detach() > 0).float(), keep),
            "kl_ref": implicit.detach().mean(),
        })
