"""RLOO: REINFORCE Leave-One-Out with k samples per prompt.

Paper: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", arXiv 2402.14740 (after Kool et al. 2019). Sequence-level: the KL-shaped reward
r_hat_i = r_i - beta * (logp_i - ref_i) (detached, as in P3O) gets the baseline "mean of the other k - 1
responses", A_i = r_hat_i - mean_{j != i} r_hat_j. With one epoch the loss is -mean_i A_i * logp_i; for reuse
over several epochs the sequence ratio is PPO-clipped (as TRL's RLOOTrainer does), which at ratio 1 is the
same gradient. With k = 2 and no clipping this is exactly P3O's pairwise policy gradient (ALGORITHMS.md s. 2).
"""
from __future__ import annotations

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective
from modules.objectives.p3o import MAX_LOG_RATIO


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean of the other k - 1 rewards of its group. (N,) grouped by k consecutive rows -> (N,)."""
    groups = rewards.view(-1, k)                                   # (G, k)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (k - 1)   # (G, k)
    return (groups - baseline).view(-1)


class RLOO(Objective):
    """Args: k (responses per prompt, >= 2), kl_coef (beta of the KL-shaped reward), clip_eps."""

    def __init__(self, k: int = 2, kl_coef: float = 0.05, clip_eps: float = 0.2):
        super().__init__()
        if k < 2:
            raise ValueError(f"RLOO needs k >= 2 responses per prompt, got {k}")
        self.responses_per_prompt, self.kl_coef, self.clip_eps = k, kl_coef, clip_eps

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        logp = F.sequence_logprobs(batch.logp, batch.mask)                  # (N,)
        old = F.sequence_logprobs(batch.old_logp, batch.mask)               # (N,)
        ref = F.sequence_logprobs(batch.ref_logp, batch.mask)               # (N,)
        r_hat = batch.rewards.float() - self.kl_coef * (logp.detach() - ref)
        adv = leave_one_out_advantages(r_hat, batch.group_size)            # (N,)
        ratio = (logp - old).clamp(max=MAX_LOG_RATIO).exp()
        surrogate = torch.min(adv * ratio, adv * ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps))
        loss = -surrogate.mean()
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), "clipfrac": F.clip_fraction(ratio.detach(), self.clip_eps),
            "ratio_mean": ratio.detach().mean(), "advantage_abs": adv.abs().mean(),
            "kl_ref": (logp.detach() - ref).mean(),
        })
