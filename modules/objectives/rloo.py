"""RLOO: REINFORCE Leave-One-Out with k samples per prompt.

Paper: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", arXiv 2402.14740 (after Kool et al. 2019); reference code: TRL's RLOOTrainer. Sequence-level:
the KL-shaped reward r_hat_i = r_i - beta * sum_t (old_logp - ref_logp) — the rollout's KL, fixed across epochs,
as in TRL and the paper — gets the baseline "mean of the other k - 1 responses",
A_i = r_hat_i - mean_{j != i} r_hat_j, computed once per rollout (`prepare`). With one epoch the loss is
-mean_i A_i * logp_i; for reuse over several epochs the sequence ratio is PPO-clipped (as TRL's RLOOTrainer does),
which at ratio 1 is the same gradient. With k = 2 and no clipping this is exactly P3O's pairwise policy gradient
(docs/algorithms.md s. 2).
Options: `kl_on_current_policy: true` shapes with the current policy's detached logp, recomputed every minibatch
(as P3O does; our earlier default). `dual_clip` bounds the surrogate of negative advantages (off). TRL 1.16's
`reward_clip_range` clamps the rewards to [low, high] before the KL shaping, and its `normalize_advantages` divides
the leave-one-out advantages by their std over the rollout after centring them, (A - mean) / (std + 1e-4), every
process's rows (TRL gathers them); both off, as in TRL.
"""
from __future__ import annotations

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective, check_clipping


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean of the other k - 1 rewards of its group. (N,) grouped by k consecutive rows -> (N,)."""
    groups = rewards.view(-1, k)                                   # (G, k)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (k - 1)   # (G, k)
    return (groups - baseline).view(-1)


class RLOO(Objective):
    """RLOO: leave-one-out baselines on the KL-shaped sequence reward, PPO-clipped sequence ratio.

    Args:
        k: responses per prompt, >= 2.
        kl_coef: beta of the KL-shaped reward r - beta (logp - ref).
        clip_eps: PPO clip range of the sequence ratio (for reuse over several epochs).
        kl_on_current_policy: shape with the current policy's detached logp, every minibatch, instead of the rollout's.
        dual_clip: c > 1 bounds the surrogate of negative advantages below by c * A (None: off).
        clip_eps_high: the upper clip bound, 1 + clip_eps_high (DAPO's clip-higher, TRL's `epsilon_high`; DAPO uses
            0.28 with clip_eps 0.2). None: clip_eps.
        reward_clip_range: [low, high] the rewards are clamped to before the KL shaping (TRL's); None: off.
        normalize_advantages: (A - mean) / (std + 1e-4) over the rollout's advantages, every process's (TRL's).
    """

    separable_groups = True        # per-row terms (baselines within the group) over the row count

    def __init__(self, k: int = 2, kl_coef: float = 0.05, clip_eps: float = 0.2, kl_on_current_policy: bool = False,
                 dual_clip: float | None = None, clip_eps_high: float | None = None,
                 reward_clip_range: tuple[float, float] | None = None, normalize_advantages: bool = False):
        super().__init__()
        if k < 2:
            raise ValueError(f"RLOO needs k >= 2 responses per prompt, got {k}")
        check_clipping("RLOO", clip_eps, dual_clip, clip_eps_high)
        if reward_clip_range is not None and not (len(reward_clip_range) == 2 and
                                                  reward_clip_range[0] < reward_clip_range[1]):
            raise ValueError(f"RLOO: reward_clip_range={reward_clip_range}; expected [low, high] with low < high, or "
                             "null (off)")
        if normalize_advantages and kl_on_current_policy:
            raise ValueError("RLOO: normalize_advantages normalises the rollout's advantages once, before the updates; "
                             "kl_on_current_policy recomputes them from every minibatch's policy: set one of them")
        self.responses_per_prompt, self.kl_coef, self.clip_eps, self.clip_eps_high = k, kl_coef, clip_eps, clip_eps_high
        self.kl_on_current_policy, self.dual_clip = kl_on_current_policy, dual_clip
        self.reward_clip_range, self.normalize_advantages = reward_clip_range, normalize_advantages

    def advantages(self, rewards: torch.Tensor, logp: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
        """Leave-one-out advantages of r - beta * (logp - ref) (r clamped to `reward_clip_range` first), all (N,),
        logp detached.

        Example: k 2, rewards [3, -1], reward_clip_range [-0.5, 2], beta 0.5, logp - ref [1, 0]: r [2, -0.5], shaped
        [1.5, -0.5], A [2, -2]."""
        rewards = rewards.float()
        if self.reward_clip_range is not None:
            rewards = rewards.clamp(*self.reward_clip_range)
        return leave_one_out_advantages(rewards - self.kl_coef * (logp - ref), k)

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        old = F.sequence_logprobs(batch.old_logp, batch.mask)
        ref = F.sequence_logprobs(batch.ref_logp, batch.mask)
        adv = self.advantages(batch.rewards, old, ref, batch.group_size)
        if self.normalize_advantages:             # (TRL's order: after the baselines, over every process's rows)
            adv = F.standardize(adv, 1e-4, batch.sum_over_ranks)
        return {"advantages": adv}

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        logp = F.sequence_logprobs(batch.policy_logp(), batch.mask)         # (N,) (forks: their gradient alone)
        old = F.sequence_logprobs(batch.old_logp, batch.mask)               # (N,)
        ref = F.sequence_logprobs(batch.ref_logp, batch.mask)               # (N,)
        if self.kl_on_current_policy:
            adv = self.advantages(batch.rewards, logp.detach(), ref, batch.group_size)
        else:
            adv = batch.extra["advantages"]                                 # (N,) from the rollout
        surrogate = F.clipped_surrogate(logp - old, adv, self.clip_eps, self.dual_clip, self.clip_eps_high)
        loss = -(surrogate * batch.sequence_weights()).mean()
        ratio = (logp - old).detach().exp()
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), "clipfrac": F.clip_fraction(ratio, self.clip_eps, eps_high=self.clip_eps_high),
            "ratio_mean": ratio.mean(), "advantage_abs": adv.abs().mean(), "kl_ref": (logp.detach() - ref).mean(),
        })
