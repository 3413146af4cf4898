"""GRPO: Group Relative Policy Optimization.

Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
arXiv 2402.03300. Group-normalised advantages A_i = (r_i - mean_group) / (std_group + eps) broadcast to every
token of response i; token-level PPO clip on the per-token ratio; the KL to the reference enters the loss
(k3 estimator, per token) with coefficient beta instead of the reward. Per-sequence token mean, then mean over
sequences, as in the paper. Note: with k = 2 the advantages are always +-1/sqrt(2) (std with Bessel's
correction): the size of the reward difference is lost, unlike P3O / RLOO.
"""
from __future__ import annotations

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective


def group_normalized_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps), std with Bessel's correction. (N,) -> (N,)."""
    groups = rewards.view(-1, k)
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)).view(-1)


class GRPO(Objective):
    """Args: k (group size, >= 2), kl_coef (beta on the k3 KL in the loss), clip_eps."""

    def __init__(self, k: int = 4, kl_coef: float = 0.04, clip_eps: float = 0.2):
        super().__init__()
        if k < 2:
            raise ValueError(f"GRPO needs a group of k >= 2 responses, got {k}")
        self.responses_per_prompt, self.kl_coef, self.clip_eps = k, kl_coef, clip_eps

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        adv = group_normalized_advantages(batch.rewards.float(), batch.group_size)[:, None]  # (N, 1)
        log_ratio = (batch.logp - batch.old_logp).clamp(max=20.0)                         # (N, L)
        ratio = log_ratio.exp()
        surrogate = torch.min(adv * ratio, adv * ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps))
        kl = F.kl_penalty(batch.logp, batch.ref_logp, "k3")                                # (N, L)
        per_token = -(surrogate - self.kl_coef * kl)
        loss = F.masked_mean(per_token, batch.mask, dim=-1).mean()
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), "clipfrac": F.clip_fraction(ratio.detach(), self.clip_eps, batch.mask),
            "ratio_mean": F.masked_mean(ratio.detach(), batch.mask), "kl_ref": F.masked_mean(kl.detach(), batch.mask),
        })
