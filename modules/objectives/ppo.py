"""PPO for RLHF, InstructGPT style.

Papers: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv 1707.06347; Ziegler et al.,
"Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593; Ouyang et al. (InstructGPT) 2203.02155;
details from Huang et al., "The N Implementation Details of RLHF with PPO" (2024). docs/algorithms.md s. 7:
per-token reward -beta * KL_t (k1 or k3) with the reward-model score added at the last response token;
GAE(gamma, lambda) on the value head's estimates; advantages whitened over the rollout; clipped policy loss on
per-token ratios; clipped value loss; one response per prompt; optional adaptive KL controller (Ziegler et al.).
Deviations from TRL's PPOTrainer (the reference code), all deliberate:
  * advantages are whitened once per rollout (in `prepare`), not per minibatch, over every process's tokens
    (OpenRLHF and veRL whiten over the whole batch too; TRL over each process's);
  * the score is added at the last response token (the EOS, when emitted) and V = 0 after it, the usual choice
    (Ziegler et al., OpenRLHF). TRL adds the score one position later (the first padding position after EOS)
    and keeps V_old there, so with gamma * lambda < 1 its GAE differs from ours: it bootstraps from V_old at
    that position and discounts the score by one more step of gamma * lambda for every earlier token.
    With gamma = lambda = 1 both give the same advantages on the response tokens.
  * the ratio is exp of the unclamped log-ratio (`functional.clipped_surrogate`); `dual_clip` (off) bounds the
    surrogate of negative advantages instead.
"""
from __future__ import annotations

from typing import Literal

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective, check_clipping


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """One-hot (N, L) at the last 1 of each row of `mask`."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[torch.arange(mask.shape[0]), F.last_token_index(mask)] = 1.0
    return out * (mask.sum(-1, keepdim=True) > 0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the policy's tokens (`mask`). (N, L) each -> (advantages, returns).

    delta_t = r_t + gamma * V_{t'} - V_t and A_t = delta_t + gamma * lam * A_{t'}, where t' is the next token with
    mask 1 (V = A = 0 after the last). Tokens with mask 0 between two of the policy's (a tool's result,
    `datamodules.tools`) are skipped, not steps: the recursion runs over the policy's tokens alone, as veRL's multi-turn
    GAE does, and gives 0 there. With no such gap, t' = t + 1.

    Example (gamma = lam = 1): rewards [[0, 0, 1]], values [[0.5, 0.2, 0.4]], mask [[1, 0, 1]] ->
    A_2 = 1 - 0.4 = 0.6; A_0 = 0 + 0.4 - 0.5 + 0.6 = 0.5: advantages [[0.5, 0, 0.6]], returns [[1.0, 0, 1.0]]."""
    mask = mask.float()
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])                   # A and V at the next token with mask 1
    next_value = torch.zeros_like(last)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = mask[:, t]
        last = torch.where(here > 0, delta + gamma * lam * last, last)
        next_value = torch.where(here > 0, values[:, t], next_value)
        advantages[:, t] = last * here
    return advantages, advantages + values


class PPO(Objective):
    """PPO with a value head, GAE and the per-token KL penalty in the reward (InstructGPT style).

    Args:
        kl_coef: beta of the per-token KL penalty (the starting value when adaptive).
        kl_estimator: the per-token KL estimate in the reward (`modules.functional.kl_penalty`): 'k1' (the log-ratio,
            veRL's `kl_penalty: kl`), 'k2' (veRL's `mse`), 'k3', or 'low_var_kl' (veRL's: k3 with the log-ratio
            clamped to [-20, 20] and the value to [-10, 10], so one extreme token cannot swamp a response's reward).
        gamma: GAE discount.
        lam: GAE lambda.
        clip_eps: policy ratio clip.
        value_clip: value clip around the rollout's values.
        vf_coef: weight of the value loss.
        whiten_advantages: normalise advantages over the rollout (every process's tokens).
        target_kl: adaptive KL controller's target KL per response, against the mean over every process's responses
            (None: fixed beta).
        kl_horizon: the adaptive controller's horizon in responses (Ziegler et al.).
        dual_clip: c > 1 bounds the surrogate of negative advantages below by c * A (None: off).
        clip_eps_high: the upper clip bound, 1 + clip_eps_high (DAPO's clip-higher, TRL's `epsilon_high`; DAPO uses
            0.28 with clip_eps 0.2). None: clip_eps.
    """

    needs_values = True
    separable_groups = True        # per-token terms over the minibatch's token count; whitening is in `prepare`

    def __init__(self, kl_coef: float = 0.05, kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "k1", gamma: float = 1.0,
                 lam: float = 0.95,
                 clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1, whiten_advantages: bool = True,
                 target_kl: float | None = None, kl_horizon: int = 10000, dual_clip: float | None = None,
                 clip_eps_high: float | None = None):
        super().__init__()
        if kl_estimator not in ("k1", "k2", "k3", "low_var_kl"):
            raise ValueError(f"PPO: kl_estimator={kl_estimator!r}; expected 'k1', 'k2', 'k3' or 'low_var_kl'")
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"PPO: gamma={gamma}, lam={lam}; expected both in [0, 1]")
        check_clipping("PPO", clip_eps, dual_clip, clip_eps_high)
        self.kl_estimator, self.gamma, self.lam = kl_estimator, gamma, lam
        self.clip_eps, self.value_clip, self.vf_coef = clip_eps, value_clip, vf_coef
        self.whiten_advantages, self.target_kl, self.kl_horizon = whiten_advantages, target_kl, kl_horizon
        self.dual_clip, self.clip_eps_high = dual_clip, clip_eps_high
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))   # adaptive: checkpointed with the run

    def token_rewards(self, batch: ObjectiveInput) -> torch.Tensor:
        """-beta * KL_t on every response token, plus the sequence reward at the last one. (N, L)."""
        kl = F.kl_penalty(batch.old_logp, batch.ref_logp, self.kl_estimator) * batch.mask
        return -self.kl_coef * kl + batch.rewards.float()[:, None] * last_token_mask(batch.mask)

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        if batch.old_values is None:
            raise ValueError("PPO needs value estimates: the RL module fills them when needs_values is set")
        if self.target_kl is not None:      # the mean sequence KL and the count of every process's responses
            n, kl, _ = F.moments(F.sequence_logprobs(batch.old_logp - batch.ref_logp, batch.mask),
                                 sum_over=batch.sum_over_ranks)
            error = (kl / self.target_kl - 1).clamp(-0.2, 0.2)
            self.kl_coef.mul_(1 + error * n / self.kl_horizon)
        adv, returns = gae(self.token_rewards(batch), batch.old_values, batch.mask, self.gamma, self.lam)
        if self.whiten_advantages:
            adv = F.masked_whiten(adv, batch.mask, sum_over=batch.sum_over_ranks)
        return {"advantages": adv, "returns": returns}

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        adv, returns, mask = batch.extra["advantages"], batch.extra["returns"], batch.loss_mask()
        log_ratio = batch.logp - batch.old_logp                                         # (N, L)
        pg = -F.clipped_surrogate(log_ratio, adv, self.clip_eps, self.dual_clip, self.clip_eps_high) * batch.token_weights()
        ratio = log_ratio.detach().exp()
        v, v_old = batch.values, batch.old_values
        v_clipped = v_old + (v - v_old).clamp(-self.value_clip, self.value_clip)
        vf = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2)
        pg_loss, vf_loss = F.masked_mean(pg, mask), F.masked_mean(vf, mask)
        loss = pg_loss + self.vf_coef * vf_loss
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
            "clipfrac": F.clip_fraction(ratio, self.clip_eps, mask, self.clip_eps_high),
            "ratio_mean": F.masked_mean(ratio, mask), "kl_coef": self.kl_coef.detach().clone(),
            "value_mean": F.masked_mean(v.detach(), mask),
        })
