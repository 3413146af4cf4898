"""GRPO: Group Relative Policy Optimization.

Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
arXiv 2402.03300; reference code: TRL's GRPOTrainer. Advantages A_i = (r_i - mean_group) / (std + 1e-4),
computed once per rollout and broadcast to every token of response i; token-level PPO clip on the per-token
ratio; the KL to the reference enters the loss (k3 estimator, per token) with coefficient beta instead of the
reward. Note: with k = 2 and group scaling the advantages are always +-1/sqrt(2) (std with Bessel's correction):
the size of the reward difference is lost, unlike P3O / RLOO.

`scale_rewards` (TRL's argument): 'group' divides by the std of the group (default, TRL's default), 'batch' by
the std of all rewards of the rollout (every process's, as TRL gathers them), 'none' only
centres. `loss_type` (TRL's argument) says how per-token losses l_t (mask m_t) are aggregated:
  'grpo'    mean over sequences of each sequence's token mean (the paper; our default)
  'bnpo'    sum_t l_t m_t / sum_t m_t over the minibatch
  'dr_grpo' sum_t l_t m_t / (sequences x max_new_tokens) (Liu et al., "Understanding R1-Zero-Like Training")
  'dapo'    sum_t l_t m_t / (response tokens of the optimizer step's batch over all ranks / ranks): TRL's
            default. One minibatch is one optimizer step here, so on one process 'dapo' equals 'bnpo'.
Four more of TRL 1.16's loss types change the per-token term too (`functional` has each formula):
  'cispo'   -sg[min(rho, cispo_max)] A logp (MiniMax-M1): the weight clipped, never the token; aggregated as 'dapo'
  'sapo'    -sigmoid(tau (rho - 1)) 4 / tau A (SAPO), a soft gate in place of the clip; aggregated as 'grpo'
  'luspo'   the clipped term (LUSPO, length-unbiased GSPO: use with importance_sampling_level 'sequence'), summed over
            each sequence's tokens, then the mean over sequences
  'vespo'   -phi(w) A logp (VESPO), phi a gamma weight of the sequence ratio w; aggregated as 'dapo'. The mismatch
            correction enters w, not the loss
`importance_sampling_level` (TRL's argument): 'token' clips each token's ratio (GRPO); 'sequence' is GSPO (Zheng
et al., "Group Sequence Policy Optimization", arXiv 2507.18071): one ratio per response, exp of the mean over its
tokens of log(pi / pi_old), clipped and broadcast to its tokens (TRL's formula; with `loss_type: grpo`, the
paper's per-sequence objective). GSPO's paper clips far tighter than PPO (3e-4 / 4e-4): set `clip_eps` to match.
`kl_in_reward` (veRL's `use_kl_in_reward`, in place of its `use_kl_loss`): the KL enters the reward instead of
the loss, r_i - beta * sum_t (old_logp - ref_logp) (the rollout's k1 estimate, as RLOO and PPO shape theirs),
before the group normalisation; the loss then has no KL term.
`off_policy_mask` (TRL's `off_policy_mask_threshold`, DeepSeek-V3.2's off-policy sequence masking): a response with a
negative advantage whose mean per-token log(pi_sampler / pi) is above the threshold drops out of the policy term
(its KL term stays); pi_sampler is the engine's logprobs where pi_old is a forward's (vLLM), else pi_old.
`multi_objective_aggregation` (TRL's argument) with a composed reward (`modules.rewards.Composed`): 'sum_then_normalize'
(default) normalises the weighted sum of its terms, the reward, as above; 'normalize_then_sum' is GDPO (Liu et al.,
arXiv 2601.05242): each term normalised within its group, their weighted sum normalised over the rollout
(`decoupled_advantages`; every process's, as TRL gathers them), so a term whose scale or spread differs
from the others' no longer drowns them. It takes neither `kl_in_reward` nor `scale_rewards`, nor the RL module's
`missing_eos_penalty` (put a length term in the composed reward instead).
`kl_estimator` (veRL's `kl_loss_type`): the per-token KL term of the loss, k3 by default (TRL's, the paper's);
'k1', 'k2', veRL's 'low_var_kl' (k3 clamped to [-10, 10], veRL's default) or a straight-through 'k1+' / 'k3+' (the
value of k1 / low_var_kl, the gradient of k2: (logp - ref) per token, the unbiased reverse-KL gradient)
(`functional.kl_penalty`).
`kl_bias_correction` (TRL's `use_bias_correction_kl`, DeepSeek-V3.2): the k3 term multiplied by the (differentiable)
ratio rho, rho k3, so its gradient is the unbiased reverse-KL gradient: at rho = 1 it adds k3 grad logp to grad k3,
and the sum is (logp - ref) grad logp per token.
Deviations from TRL: GRPO's beta defaults to 0.04 (TRL's is 0.0); `kl_bias_correction` is off by default (TRL
1.16's is on: with beta > 0 set it for TRL's gradient); `dual_clip` is TRL's `delta` under another name (the same
loss and gradient, tested);
CISPO's bound is `cispo_max` (5.0, ScaleRL's value), where TRL reuses `epsilon_high` (and so clamps the ratio at
0.2 unless it is set).
"""
from __future__ import annotations

from typing import Literal

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective, check_clipping

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")        # the loss types with PPO's clipped term
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def group_normalized_advantages(rewards: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4,
                                sum_over=None) -> torch.Tensor:
    """(r - group mean) / (std + eps), std with Bessel's correction over the group ('group') or all rewards
    ('batch': every process's with `sum_over`, `functional.mean_std`); 'none' only centres. (N,) -> (N,)."""
    groups = rewards.view(-1, k)                                  # (G, k)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (F.mean_std(rewards, sum_over)[1] + eps)
    elif scale != "none":
        raise ValueError(f"GRPO: scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.view(-1)


def _nanstd(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """The std along `dim` of the values that are not NaN, with Bessel's correction (NaN where fewer than 2)."""
    count = (~x.isnan()).sum(dim, keepdim=True)
    var = torch.nanmean((x - torch.nanmean(x, dim, keepdim=True)) ** 2, dim, keepdim=True)
    std = (var * count / (count - 1)).where(count > 1, torch.nan).sqrt()
    return std if keepdim else std.squeeze(dim)


def decoupled_advantages(terms: torch.Tensor, weights: torch.Tensor, k: int, eps: float = 1e-4,
                         sum_over=None) -> torch.Tensor:
    """GDPO's advantages (Liu et al., arXiv 2601.05242; TRL's `multi_objective_aggregation: normalize_then_sum`):
    each reward term normalised within each group of k, (r_t - group mean_t) / (group std_t + eps), NaN (a term that
    does not apply) left out of its means, stds and sums; their weighted sum r = sum_t w_t r_t; then normalised over
    the rollout, (r - mean) / (std + eps), every process's with `sum_over` (`functional.standardize`). Stds with
    Bessel's correction. terms (N, T), weights (T,) -> (N,).

    Example, k = 3, weights [1, 1], eps aside: group 1 terms a [1, 0, 0], b [0, 0, 0]; group 2 a [0, 0, 0], b [1, 0, 0].
    a in group 1: mean 1/3, std sqrt(1/3): [1.1547, -0.5774, -0.5774]; b in group 1: all equal, 0 / (0 + eps) = 0;
    group 2 the same with a and b swapped: r = [1.1547, -0.5774, -0.5774] in both groups; over the 6, mean 0 and
    std sqrt((2 x 1.3333 + 4 x 0.3333) / 5) = sqrt(0.8) = 0.8944, so A = [1.2910, -0.6455, -0.6455] twice. (Summed
    first, both groups' rewards are [1, 0, 0] and GRPO's group-normalised A is [1.1547, -0.5774, -0.5774].)"""
    grouped = terms.view(-1, k, terms.shape[-1])                                   # (G, k, T)
    normed = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (_nanstd(grouped, 1, keepdim=True) + eps)
    rewards = (normed.view(-1, terms.shape[-1]) * weights.to(terms.dtype)).nansum(-1)   # (N,)
    return F.standardize(rewards, eps, sum_over)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int | None = None,
              tokens_per_rank: float | None = None) -> torch.Tensor:
    """Reduce per-token losses (N, L) under `mask` to a scalar as TRL's `loss_type` does (see the module doc)."""
    if loss_type in ("grpo", "sapo"):
        return F.masked_mean(per_token, mask, dim=-1).mean()
    if loss_type == "luspo":
        return F.masked_sum(per_token, mask, dim=-1).mean()
    total = F.masked_sum(per_token, mask)
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * (max_new_tokens or per_token.shape[1]))
    if loss_type in ("dapo", "cispo", "vespo"):
        return total / (tokens_per_rank if tokens_per_rank else mask.sum().clamp(min=1))   # (0 tokens: total is 0)
    raise ValueError(f"GRPO: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


class GRPO(Objective):
    """GRPO: group-normalised advantages, token-level PPO clipping, k3 KL in the loss (see the module docstring).

    Args:
        k: responses per prompt (the group), >= 2.
        kl_coef: beta on the per-token k3 KL to the reference in the loss.
        clip_eps: PPO clip range of the per-token ratio.
        loss_type: TRL's names: how per-token losses are aggregated ('grpo', 'bnpo', 'dr_grpo', 'dapo'), or another
            per-token term ('cispo', 'sapo', 'luspo', 'vespo'; see the module docstring).
        scale_rewards: advantages divided by the group's std ('group'), the rollout's ('batch'), or only centred ('none').
        dual_clip: c > 1 bounds the surrogate of negative advantages below by c * A (None: off; TRL's `delta`).
        importance_sampling_level: 'token' (GRPO: each token's ratio clipped) or 'sequence' (GSPO: one ratio per
            response, the exp of its tokens' mean log-ratio).
        kl_in_reward: subtract beta times the rollout's sequence KL from each reward before the advantages, instead
            of the k3 KL term in the loss (veRL's use_kl_in_reward).
        clip_eps_high: the upper clip bound, 1 + clip_eps_high (DAPO's clip-higher, TRL's `epsilon_high`; DAPO uses
            0.28 with clip_eps 0.2). None: clip_eps. clip_eps, clip_eps_high and dual_clip: the clipped loss types.
        off_policy_mask: a response with A < 0 whose mean log(pi_sampler / pi) per token exceeds this leaves the
            policy term (TRL's `off_policy_mask_threshold`, e.g. 0.5); None: off.
        multi_objective_aggregation: with a composed reward, 'sum_then_normalize' (default) normalises the weighted
            sum of its terms; 'normalize_then_sum' (GDPO) each term within its group, then their weighted sum over
            the rollout (`decoupled_advantages`). TRL's argument.
        kl_bias_correction: the k3 KL term times the ratio, for the unbiased reverse-KL gradient (TRL's
            `use_bias_correction_kl`, on by default there; off here).
        kl_estimator: the per-token KL term: 'k3' (TRL's), 'k1', 'k2', 'low_var_kl' (veRL's clamped k3), 'k1+' or
            'k3+' (that value with k2's gradient; veRL's `kl_loss_type` names).
        cispo_max: 'cispo': the bound of the detached ratio (TRL's `epsilon_high` there; ScaleRL's 5.0).
        sapo_temperature_pos: 'sapo': the gate's temperature tau where A > 0 (TRL's).
        sapo_temperature_neg: 'sapo': tau where A <= 0 (TRL's).
        vespo_k_pos: 'vespo': the gamma weight's power k where A >= 0 (TRL's).
        vespo_lambda_pos: 'vespo': its decay lambda where A >= 0.
        vespo_k_neg: 'vespo': k where A < 0.
        vespo_lambda_neg: 'vespo': lambda where A < 0.
    """

    separable_groups = True        # per-token terms over the minibatch's rows or tokens

    def __init__(self, k: int = 4, kl_coef: float = 0.04, clip_eps: float = 0.2,
                 loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "grpo",
                 scale_rewards: Literal["group", "batch", "none"] = "group", dual_clip: float | None = None,
                 importance_sampling_level: Literal["token", "sequence"] = "token", kl_in_reward: bool = False,
                 clip_eps_high: float | None = None, cispo_max: float = 5.0, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, kl_bias_correction: bool = False,
                 off_policy_mask: float | None = None,
                 multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
                 kl_estimator: Literal["k3", "k1", "k2", "low_var_kl", "k1+", "k3+"] = "k3"):
        super().__init__()
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"GRPO: importance_sampling_level must be 'token' or 'sequence', got "
                             f"{importance_sampling_level!r}")
        if k < 2:
            raise ValueError(f"GRPO needs a group of k >= 2 responses, got {k}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPO: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"GRPO: scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        check_clipping("GRPO", clip_eps, dual_clip, clip_eps_high)
        if loss_type not in CLIPPED and (clip_eps_high, dual_clip) != (None, None):
            raise ValueError(f"GRPO: clip_eps_high / dual_clip bound PPO's clipped term, which loss_type {loss_type!r} "
                             f"does not have{' (its bound is cispo_max)' if loss_type == 'cispo' else ''}")
        for name, value in (("cispo_max", cispo_max), ("sapo_temperature_pos", sapo_temperature_pos),
                            ("sapo_temperature_neg", sapo_temperature_neg), ("vespo_lambda_pos", vespo_lambda_pos),
                            ("vespo_lambda_neg", vespo_lambda_neg)):
            if not value > 0:
                raise ValueError(f"GRPO: {name}={value}; expected > 0")
        if kl_bias_correction and kl_in_reward:
            raise ValueError("GRPO: kl_bias_correction weights the KL term of the loss, which kl_in_reward removes")
        if kl_estimator not in F.KL_ESTIMATORS:
            raise ValueError(f"GRPO: kl_estimator={kl_estimator!r}; expected one of {F.KL_ESTIMATORS}")
        if kl_estimator != "k3" and (kl_in_reward or kl_bias_correction):
            raise ValueError(f"GRPO: kl_estimator={kl_estimator!r} chooses the KL term of the loss; "
                             f"{'kl_in_reward removes that term' if kl_in_reward else 'kl_bias_correction is defined for k3'}"
                             ": set kl_estimator: k3")
        if off_policy_mask is not None and not off_policy_mask >= 0:
            raise ValueError(f"GRPO: off_policy_mask={off_policy_mask}; expected a threshold >= 0 (TRL suggests 0.5), or "
                             "null (off)")
        if multi_objective_aggregation not in AGGREGATIONS:
            raise ValueError(f"GRPO: multi_objective_aggregation={multi_objective_aggregation!r}; expected one of "
                             f"{AGGREGATIONS}")
        if multi_objective_aggregation == "normalize_then_sum" and (kl_in_reward or scale_rewards != "group"):
            raise ValueError("GRPO: multi_objective_aggregation 'normalize_then_sum' normalises each reward term within "
                             "its group, then their sum over the rollout; it takes neither kl_in_reward nor scale_rewards "
                             f"(got kl_in_reward={kl_in_reward}, scale_rewards={scale_rewards!r})")
        self.multi_objective_aggregation = multi_objective_aggregation
        self.needs_reward_terms = multi_objective_aggregation == "normalize_then_sum"
        self.kl_bias_correction, self.off_policy_mask = kl_bias_correction, off_policy_mask
        self.kl_estimator = kl_estimator
        self.cispo_max, self.sapo_temperatures = cispo_max, (sapo_temperature_pos, sapo_temperature_neg)
        self.vespo = {"k_pos": vespo_k_pos, "lambda_pos": vespo_lambda_pos, "k_neg": vespo_k_neg,
                      "lambda_neg": vespo_lambda_neg}
        self.responses_per_prompt, self.kl_coef, self.clip_eps = k, kl_coef, clip_eps
        self.loss_type, self.scale_rewards, self.dual_clip = loss_type, scale_rewards, dual_clip
        self.importance_sampling_level, self.kl_in_reward = importance_sampling_level, kl_in_reward
        self.clip_eps_high = clip_eps_high

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        if self.needs_reward_terms:                               # GDPO: the terms normalised apart, then summed
            if batch.reward_terms is None:
                raise ValueError("GRPO: multi_objective_aggregation 'normalize_then_sum' needs the reward's terms "
                                 "(a modules.rewards.Composed reward)")
            return {"advantages": decoupled_advantages(batch.reward_terms.float(), batch.reward_weights,
                                                       batch.group_size, sum_over=batch.sum_over_ranks)}
        rewards = batch.rewards.float()
        if self.kl_in_reward:                                     # r - beta * sum_t (old - ref), the rollout's KL
            rewards = rewards - self.kl_coef * F.sequence_logprobs(batch.old_logp - batch.ref_logp, batch.mask)
        return {"advantages": group_normalized_advantages(rewards, batch.group_size, self.scale_rewards,
                                                          sum_over=batch.sum_over_ranks)}

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        adv = batch.extra["advantages"][:, None]                                            # (N, 1)
        token_log_ratio = log_ratio = batch.logp - batch.old_logp                           # (N, L)
        if self.importance_sampling_level == "sequence":          # GSPO: each response's mean log-ratio, per token
            per_response = F.masked_sum(log_ratio, batch.mask, -1) / batch.mask.sum(-1).clamp(min=1)   # (N,)
            log_ratio = per_response[:, None].expand_as(log_ratio)
        mask, weights = batch.loss_mask(), batch.token_weights()  # (mask_truncated: less the cut-off responses)
        ratio = log_ratio.detach().exp()
        metrics = {}
        if self.loss_type == "cispo":
            surrogate = F.cispo_surrogate(batch.logp, log_ratio, adv, self.cispo_max)
            metrics["clipfrac"] = F.masked_mean(((ratio > self.cispo_max) & (adv > 0)).float(), mask)     # (TRL's)
        elif self.loss_type == "sapo":
            surrogate = F.sapo_surrogate(log_ratio, adv, *self.sapo_temperatures)
        elif self.loss_type == "vespo":     # the mismatch correction enters the sequence weight, not the loss
            log_sampler = None if batch.sampler_weights is None else batch.sampler_weights.log()
            phi = F.vespo_weights(token_log_ratio, batch.mask, adv, log_sampler, **self.vespo)             # (N, 1)
            surrogate, weights = phi * adv * batch.logp, batch.token_weights(correction=False)
            metrics["vespo_weight_mean"] = phi.mean()
        else:
            surrogate = F.clipped_surrogate(log_ratio, adv, self.clip_eps, self.dual_clip, self.clip_eps_high)
            metrics["clipfrac"] = F.clip_fraction(ratio, self.clip_eps, mask, self.clip_eps_high)
        if self.off_policy_mask is not None:         # DeepSeek-V3.2: far off-policy responses with A < 0 drop out
            sampled = batch.sampler_logp if batch.sampler_logp is not None else batch.old_logp
            keep = F.off_policy_keep(batch.logp, sampled, batch.mask, adv, self.off_policy_mask)          # (N, 1)
            surrogate = surrogate * keep
            metrics["off_policy_masked"] = 1 - keep.mean()
        kl = F.kl_penalty(batch.logp, batch.ref_logp, self.kl_estimator)                    # (N, L)
        beta = 0.0 if self.kl_in_reward else self.kl_coef                                  # (else in the reward)
        penalty = kl * log_ratio.exp() if self.kl_bias_correction else kl                 # (rho k3: unbiased)
        per_token = -(surrogate * weights - beta * penalty)                             # TRL: IS weights the PG term
        loss = aggregate(per_token, mask, self.loss_type, batch.max_new_tokens, batch.tokens_per_rank)
        return ObjectiveOutput(loss, {
            "loss": loss.detach(), **metrics, "ratio_mean": F.masked_mean(ratio, mask),
            "kl_ref": F.masked_mean(kl.detach(), mask),
        })
