"""Online DPO: two fresh samples per prompt, the reward picks winner and loser, DPO loss against the reference.

Papers: Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290 (the loss); Guo et al., "Direct
Language Model Alignment from Online AI Feedback", arXiv 2402.04792 (sampling the pair from the current policy
and labelling it with a reward / annotator). Loss (docs/algorithms.md s. 7):
    -log sigmoid(beta * [(logp_w - ref_w) - (logp_l - ref_l)])
`soft_labels: true` is the P3O authors' soft-label online DPO: with d = (logp_1 - ref_1) - (logp_2 - ref_2) and
p = sigmoid(r_1 - r_2) (a Bradley-Terry probability from the reward), -[p log sigmoid(beta d) + (1 - p) log
sigmoid(-beta d)]. On a tie p = 1/2 and the loss pulls d towards 0. With hard labels, pairs with equal rewards
carry no preference and are masked out. No importance ratio: old logprobs are unused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective
from modules.objectives.p3o import pair_view


class OnlineDPO(Objective):
    """Online DPO on two fresh samples per prompt, the reward picking winner and loser (see the module docstring).

    Args:
        beta: the DPO temperature on the implicit reward difference.
        soft_labels: weight both orderings by sigmoid(r_1 - r_2) instead of a hard winner (the P3O authors' variant).
    """

    responses_per_prompt = 2
    separable_groups = True        # a pair's loss over the minibatch's count of decided pairs

    def __init__(self, beta: float = 0.1, soft_labels: bool = False):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"OnlineDPO: beta={beta}; expected > 0")
        self.beta, self.soft_labels = beta, soft_labels

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
