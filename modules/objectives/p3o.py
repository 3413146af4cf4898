"""P3O: Pairwise Proximal Policy Optimization.

Paper: Wu, Zhu, Zhang, Wen, Ramchandran, Jiao, "Pairwise Proximal Policy Optimization: Harnessing Relative
Feedback for LLM Alignment", arXiv 2310.00212. Maths as in ALGORITHMS.md sections 2-6:
two responses per prompt; the sequence-level KL-shaped reward difference
    Delta = [r1 - beta (logp1 - ref1)] - [r2 - beta (logp2 - ref2)]     (detached, current policy's logp)
drives a clipped, importance-weighted pairwise policy gradient; no value function.
  v1 (separate clipping): each response clips its own ratio rho_i, the partner's ratio is a detached weight
      capped to [1/R, R];
  v2 (joint clipping): one joint weight sg[clamp(rho1 rho2, 1/R, R)] and one clip of L = logp1 - logp2
      to [L_old - eps, L_old + eps].
Deviations / choices, all off or neutral by default:
  * `scale_q`: Delta divided by a running std of the rewards (updated once per rollout), as in the authors'
    code option; `reward_clip` clips raw rewards to +-value before use.
  * Ratios are computed from log-ratios clamped to +-20 before `exp`, so an extreme ratio (which the clip
    or cap would discard anyway) cannot turn the backward pass into inf * 0 = NaN.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective, RunningMoments

MAX_LOG_RATIO = 20.0


def pair_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) with pairs in consecutive rows -> (first, second), each (N/2,)."""
    pairs = x.view(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def p3o_v1_terms(delta, log_rho1, log_rho2, eps: float, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair J_V1 (P,) and clipped fraction (P,). All inputs (P,); `delta` detached."""
    rho1, rho2 = log_rho1.clamp(max=MAX_LOG_RATIO).exp(), log_rho2.clamp(max=MAX_LOG_RATIO).exp()
    c1, c2 = rho1.detach().clamp(1 / cap, cap), rho2.detach().clamp(1 / cap, cap)
    term1 = torch.min(delta * c2 * rho1, delta * c2 * rho1.clamp(1 - eps, 1 + eps))
    term2 = torch.min(-delta * c1 * rho2, -delta * c1 * rho2.clamp(1 - eps, 1 + eps))
    clipped = (((rho1 - 1).abs() > eps).float() + ((rho2 - 1).abs() > eps).float()) / 2
    return 0.5 * (term1 + term2), clipped.detach()


def p3o_v2_terms(delta, logp1, logp2, old1, old2, eps: float, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair J_V2 (P,) and clipped indicator (P,). Sequence logprobs (P,); `delta` detached."""
    log_w = (logp1 - old1 + logp2 - old2).detach().clamp(-math.log(cap), math.log(cap))
    w = log_w.exp()                                              # sg[clamp(rho1 * rho2, 1/R, R)]
    rel, rel_old = logp1 - logp2, old1 - old2                    # L(theta), L_old
    rel_clipped = torch.max(torch.min(rel, rel_old + eps), rel_old - eps)
    objective = 0.5 * torch.min(delta * w * rel, delta * w * rel_clipped)
    return objective, ((rel - rel_old).abs() > eps).float().detach()


class P3O(Objective):
    """Args:
        variant: 'v1' (separate clipping) or 'v2' (joint clipping; the default, more stable in the paper).
        clip_eps: PPO-style clip range eps (0.2).
        kl_coef: beta of the KL-shaped reward (0.05).
        is_cap: R, the cap of the importance weights to [1/R, R] (10).
        scale_q: divide Delta by the running std of rewards.
        reward_clip: clip raw rewards to [-reward_clip, reward_clip] (None = off).
    """

    responses_per_prompt = 2

    def __init__(self, variant: Literal["v1", "v2"] = "v2", clip_eps: float = 0.2, kl_coef: float = 0.05,
                 is_cap: float = 10.0, scale_q: bool = False, reward_clip: float | None = None):
        super().__init__()
        if variant not in ("v1", "v2"):
            raise ValueError(f"P3O: variant must be 'v1' or 'v2', got {variant!r}")
        self.variant, self.clip_eps, self.kl_coef, self.is_cap = variant, clip_eps, kl_coef, is_cap
        self.scale_q, self.reward_clip = scale_q, reward_clip
        self.reward_stats = RunningMoments()

    def rewards(self, batch: ObjectiveInput) -> torch.Tensor:
        r = batch.rewards.float()
        return r.clamp(-self.reward_clip, self.reward_clip) if self.reward_clip is not None else r

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        if self.scale_q:
            self.reward_stats.update(self.rewards(batch))
        return {}

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        if batch.group_size != 2:
            raise ValueError(f"P3O needs 2 responses per prompt, got group_size={batch.group_size}")
        logp = F.sequence_logprobs(batch.logp, batch.mask)                 # (N,)
        old = F.sequence_logprobs(batch.old_logp, batch.mask)              # (N,)
        ref = F.sequence_logprobs(batch.ref_logp, batch.mask)              # (N,)
        r_hat = self.rewards(batch) - self.kl_coef * (logp.detach() - ref)  # (N,) KL-shaped, detached
        r1, r2 = pair_view(r_hat)
        delta = r1 - r2                                                    # (P,)
        if self.scale_q:
            delta = delta / self.reward_stats.std.to(delta.dtype)
        (lp1, lp2), (old1, old2) = pair_view(logp), pair_view(old)
        if self.variant == "v1":
            objective, clipped = p3o_v1_terms(delta, lp1 - old1, lp2 - old2, self.clip_eps, self.is_cap)
        else:
            objective, clipped = p3o_v2_terms(delta, lp1, lp2, old1, old2, self.clip_eps, self.is_cap)
        loss = -objective.mean()
        log_ratio = (logp - old).detach()
        ratio = log_ratio.clamp(max=MAX_LOG_RATIO).exp()
        metrics = {
            "loss": loss.detach(), "clipfrac": clipped.mean(), "ratio_mean": ratio.mean(), "ratio_max": ratio.max(),
            "delta_abs": delta.abs().mean(), "approx_kl_old": (0.5 * log_ratio**2).mean(),
            "kl_ref": (logp.detach() - ref).mean(),
        }
        return ObjectiveOutput(loss, metrics)
