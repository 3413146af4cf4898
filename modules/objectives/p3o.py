"""P3O: Pairwise Proximal Policy Optimization.

Paper: Wu, Zhu, Zhang, Wen, Ramchandran, Jiao, "Pairwise Proximal Policy Optimization: Harnessing Relative
Feedback for LLM Alignment", arXiv 2310.00212. Maths as in docs/algorithms.md sections 2-6:
two responses per prompt; the sequence-level KL-shaped reward difference
    Delta = [r1 - beta (logp1 - ref1)] - [r2 - beta (logp2 - ref2)]     (detached, current policy's logp)
drives a clipped, importance-weighted pairwise policy gradient; no value function.
  v1 (separate clipping): each response clips its own ratio rho_i, the partner's ratio is a detached weight
      capped to [1/R, R];
  v2 (joint clipping): one joint weight sg[clamp(rho1 rho2, 1/R, R)] and one clip of L = logp1 - logp2
      to [L_old - eps, L_old + eps].
Options, all off by default (the paper's defaults):
  * `k` > 2 responses per prompt (the paper's future work): the loss is the mean over all K(K-1)/2 pairs of each
    group, every pair with its own clipping and importance weights. K = 2 is exactly the paper's P3O; with one
    epoch, ratios 1 and no clipping its gradient equals RLOO-K's exactly (constant 1; `tests/test_p3o.py`).
  * `reward_clip` clips raw rewards to +-value; `scale_q` then divides the *rewards* (not the KL term) by a
    running std of all rewards seen so far (every process's), with Bessel's correction (the authors' code):
    Delta = r1/sigma - r2/sigma - beta (KL1 - KL2). The running std mixes prompts but is one number per rollout,
    so shift invariance holds only up to how a shift changes sigma (a per-prompt shift changes it).
  * `avg_tokenwise` (the authors' later code): the summed pair loss is divided by the response tokens of the
    minibatch (both responses; and by K - 1, the pairs each response is in) instead of averaged over pairs, so the
    step size depends on response length.
  * `normalize_terms` (not the paper's; P3O's counterpart of GDPO, with a `modules.rewards.Composed` reward): each
    term's pair differences are divided by their root mean square over the rollout's pairs (every process's),
    Delta = sum_t w_t (r_t,i - r_t,j) / rms_t - beta (KL_i - KL_j) (`normalized_term_rewards`), so a weight says how
    much its term counts whatever the term's units. A difference does not change when a term is shifted per
    prompt, so shift invariance holds term by term, unlike `scale_q`'s std of the rewards themselves.
  * `kl_in_loss` (not the paper's): the KL leaves the reward difference, Delta = r1 - r2, and enters the loss as
    beta times each response's sequence KL (the sum over its tokens of the k3 estimate, as GRPO's per-token
    penalty), averaged over responses. On a 0 / 1 reward most pairs tie, and their Delta is then the KL difference
    alone. An ablation (benchmarks/results/verifiable): moving GRPO's KL into its reward slows it to P3O's pace,
    but P3O with `kl_in_loss` was no faster there.
Deviations from the authors' code:
  * V2 clips L = logp1 - logp2 around L_old; the authors clip (logp1 - ref1) - (logp2 - ref2) around the same
    quantity at pi_old. The two differ by the constant ref1 - ref2: the same gradient and clip decisions, while the
    loss *value* (`train/loss`) is shifted by 1/2 Delta w (ref1 - ref2) per pair.
  * Ratios are exp of the unclamped log-ratios (`functional.clipped_surrogate`), so every gradient is the
    formula's for finite inputs; only the detached IS weights are capped (in log space).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.objectives.base import Objective, RunningMoments, check_clipping


def pair_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) with pairs in consecutive rows -> (first, second), each (N/2,)."""
    pairs = x.view(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def group_pairs(n: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (i, j), i < j, of every pair within each group of k consecutive rows: 2 x (n/k * k(k-1)/2,).
    For k = 2 they are (0, 1), (2, 3), ...: the consecutive pairs of `pair_view`."""
    first, second = torch.triu_indices(k, k, offset=1, device=device)       # (M,) each, M = k(k-1)/2
    offsets = torch.arange(0, n, k, device=device)[:, None]                  # (G, 1)
    return (offsets + first).flatten(), (offsets + second).flatten()


def normalized_term_rewards(terms: torch.Tensor, weights: torch.Tensor, k: int, eps: float = 1e-4,
                            sum_over=None) -> torch.Tensor:
    """Rewards whose pair differences are `normalize_terms`' Delta: r_i = sum_t w_t r_t,i / (rms_t + eps), rms_t the
    root mean square of term t's differences r_t,i - r_t,j over every pair of every group of k (every process's
    with `sum_over`, `functional.moments`); a NaN term (one that does not apply) adds nothing to a reward and its
    differences are left out of rms_t. terms (N, T), weights (T,) -> (N,).

    Example, k 2, weights [1, 0.25]: terms [[1, 3], [0, -3], [1, 6], [1, 0]]. Differences: correct [1, 0], rms
    sqrt(1 / 2) = 0.7071; judge [6, 6], rms 6. Rewards [1.4142 + 0.125, -0.125, 1.4142 + 0.25, 1.4142], so the
    pairs' Delta (before the KL) is [1.6642, 0.25]: correctness counts 1 / 0.7071 per unit and the judge 0.25 / 6."""
    i, j = group_pairs(len(terms), k, terms.device)
    diffs = terms[i] - terms[j]                                                  # (P, T)
    valid = ~diffs.isnan()
    totals = torch.cat([diffs.nan_to_num().pow(2).sum(0), valid.sum(0).to(terms.dtype)])       # (2T,)
    totals = totals if sum_over is None else sum_over(totals)
    rms = (totals[: terms.shape[1]] / totals[terms.shape[1]:].clamp(min=1)).sqrt()             # (T,)
    return (terms.nan_to_num() * (weights.to(terms.dtype) / (rms + eps))).sum(-1)


def p3o_v1_terms(delta, log_rho1, log_rho2, eps: float, cap: float,
                 eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair J_V1 (P,) and clipped fraction (P,). All inputs (P,); `delta` detached.

    J_V1 = 1/2 [min(D c2 rho1, D c2 clip(rho1)) + min(-D c1 rho2, -D c1 clip(rho2))], c_i = sg[clamp(rho_i, 1/R, R)],
    clip to [1 - eps, 1 + eps_high] (eps_high None: eps; `functional.clipped_surrogate`).
    """
    log_cap = math.log(cap)
    c1 = log_rho1.detach().clamp(-log_cap, log_cap).exp()
    c2 = log_rho2.detach().clamp(-log_cap, log_cap).exp()
    term1 = F.clipped_surrogate(log_rho1, delta * c2, eps, eps_high=eps_high)
    term2 = F.clipped_surrogate(log_rho2, -delta * c1, eps, eps_high=eps_high)
    high = eps if eps_high is None else eps_high
    clipped = sum(((r.detach().exp() < 1 - eps) | (r.detach().exp() > 1 + high)).float() for r in (log_rho1, log_rho2))
    return 0.5 * (term1 + term2), clipped / 2


def p3o_v2_terms(delta, logp1, logp2, old1, old2, eps: float, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair J_V2 (P,) and clipped indicator (P,). Sequence logprobs (P,); `delta` detached."""
    log_w = (logp1 - old1 + logp2 - old2).detach().clamp(-math.log(cap), math.log(cap))
    w = log_w.exp()                                              # sg[clamp(rho1 * rho2, 1/R, R)]
    rel, rel_old = logp1 - logp2, old1 - old2                    # L(theta), L_old
    rel_clipped = torch.max(torch.min(rel, rel_old + eps), rel_old - eps)
    objective = 0.5 * torch.min(delta * w * rel, delta * w * rel_clipped)
    return objective, ((rel - rel_old).abs() > eps).float().detach()


class P3O(Objective):
    """P3O: the clipped pairwise policy gradient on the KL-shaped reward difference of two responses to a prompt.

    Args:
        variant: 'v1' (separate clipping) or 'v2' (joint clipping; the default, more stable in the paper).
        clip_eps: PPO-style clip range eps (0.2).
        kl_coef: beta of the KL-shaped reward (0.05).
        is_cap: R, the cap of the importance weights to [1/R, R] (10).
        k: responses per prompt (2 = the paper); the loss averages over all pairs of each group.
        reward_clip: clip raw rewards to [-reward_clip, reward_clip] (None = off).
        scale_q: divide the (clipped) rewards by their running std (Bessel-corrected) before the KL term.
        normalize_terms: with a composed reward, each term's pair differences divided by their root mean square over
            the rollout before the weighted sum (`normalized_term_rewards`; P3O's counterpart of GDPO).
        avg_tokenwise: normalise the summed pair loss by response tokens instead of averaging over pairs.
        kl_in_loss: beta times the mean sequence k3 KL to the reference in the loss instead of the KL-shaped reward
            difference (not the paper's; see the module docstring).
        clip_eps_high: v1 only: each ratio clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher, TRL's
            `epsilon_high`); None: clip_eps. v2 clips the pair's relative logprob, where only the bound in the
            reward difference's direction is ever active: a larger clip_eps is all clip-higher could mean there.
    """

    separable_groups = True        # each group's pairs over the minibatch's pair (or token) count

    def __init__(self, variant: Literal["v1", "v2"] = "v2", clip_eps: float = 0.2, kl_coef: float = 0.05,
                 is_cap: float = 10.0, k: int = 2, reward_clip: float | None = None, scale_q: bool = False,
                 avg_tokenwise: bool = False, kl_in_loss: bool = False, clip_eps_high: float | None = None,
                 normalize_terms: bool = False):
        super().__init__()
        if variant not in ("v1", "v2"):
            raise ValueError(f"P3O: variant must be 'v1' or 'v2', got {variant!r}")
        if k < 2:
            raise ValueError(f"P3O: k must be >= 2 responses per prompt, got {k}")
        check_clipping("P3O", clip_eps, clip_eps_high=clip_eps_high)
        if clip_eps_high is not None and variant == "v2":
            raise ValueError(f"P3O: clip_eps_high={clip_eps_high} with variant v2; v2 clips the pair's relative "
                             "logprob, where only the bound in the reward difference's direction is active: set "
                             "clip_eps, or use variant: v1 (each response's ratio clipped to [1 - clip_eps, "
                             "1 + clip_eps_high])")
        if not is_cap > 0:
            raise ValueError(f"P3O: is_cap={is_cap}; expected > 0")
        if normalize_terms and (scale_q or reward_clip is not None):
            raise ValueError("P3O: normalize_terms scales each term of the composed reward by its own pair differences; "
                             f"scale_q and reward_clip act on their sum (got scale_q={scale_q}, "
                             f"reward_clip={reward_clip}): set them to false / null")
        self.variant, self.clip_eps, self.kl_coef, self.is_cap = variant, clip_eps, kl_coef, is_cap
        self.clip_eps_high = clip_eps_high
        self.responses_per_prompt, self.reward_clip = k, reward_clip
        self.scale_q, self.avg_tokenwise, self.kl_in_loss = scale_q, avg_tokenwise, kl_in_loss
        self.reward_stats = RunningMoments()
        self.normalize_terms = self.needs_reward_terms = normalize_terms

    def rewards(self, batch: ObjectiveInput) -> torch.Tensor:
        r = batch.rewards.float()
        return r.clamp(-self.reward_clip, self.reward_clip) if self.reward_clip is not None else r

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        if self.scale_q:
            self.reward_stats.update(self.rewards(batch), batch.sum_over_ranks)
        if self.normalize_terms:
            if batch.reward_terms is None:
                raise ValueError("P3O: normalize_terms needs the reward's terms (a modules.rewards.Composed reward)")
            return {"term_rewards": normalized_term_rewards(batch.reward_terms.float(), batch.reward_weights,
                                                            self.responses_per_prompt, sum_over=batch.sum_over_ranks)}
        return {}

    def scaled_rewards(self, batch: ObjectiveInput) -> torch.Tensor:
        """r (clipped), divided by the running std when `scale_q`; `normalize_terms`: the rollout's
        `normalized_term_rewards`. (N,)"""
        if self.normalize_terms:
            return batch.extra["term_rewards"]
        r = self.rewards(batch)
        return r / self.reward_stats.unbiased_std.to(r.dtype) if self.scale_q else r

    def pair_differences(self, batch: ObjectiveInput, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """f(x, y_i, y_j) of each pair (P,) from a pairwise reward (`batch.pair_rewards`), clipped by `reward_clip`.
        It replaces r_i - r_j; `scale_q` needs scalar rewards."""
        if self.scale_q:
            raise ValueError("P3O: scale_q divides scalar rewards by their running std; with a pairwise reward set "
                             "scale_q: false")
        d = batch.pair_rewards[i, j % self.responses_per_prompt].float()
        return d.clamp(-self.reward_clip, self.reward_clip) if self.reward_clip is not None else d

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        K = self.responses_per_prompt
        if batch.group_size != K:
            raise ValueError(f"P3O(k={K}) needs {K} responses per prompt, got group_size={batch.group_size}")
        logp = F.sequence_logprobs(batch.policy_logp(), batch.mask)        # (N,) (forks: their gradient alone)
        old = F.sequence_logprobs(batch.old_logp, batch.mask)              # (N,)
        ref = F.sequence_logprobs(batch.ref_logp, batch.mask)              # (N,)
        i, j = group_pairs(len(logp), K, logp.device)                     # (P,) each
        beta = 0.0 if self.kl_in_loss else self.kl_coef                   # (kl_in_loss: in the loss, below)
        if batch.pair_rewards is None:
            r_hat = self.scaled_rewards(batch) - beta * (logp.detach() - ref)  # (N,) KL-shaped, detached
            delta = r_hat[i] - r_hat[j]                                    # (P,)
        else:                                                              # a pairwise reward: f(x, y_i, y_j)
            kl = logp.detach() - ref
            delta = self.pair_differences(batch, i, j) - beta * (kl[i] - kl[j])
        if self.variant == "v1":
            objective, clipped = p3o_v1_terms(delta, logp[i] - old[i], logp[j] - old[j], self.clip_eps, self.is_cap,
                                              self.clip_eps_high)
        else:
            objective, clipped = p3o_v2_terms(delta, logp[i], logp[j], old[i], old[j], self.clip_eps, self.is_cap)
        weight = batch.sequence_weights()                                  # (N,) or 1.0: engine mismatch correction
        if torch.is_tensor(weight):
            objective = objective * weight[i] * weight[j]                  # a pair is weighted by both responses'
        if self.avg_tokenwise:
            loss = -2 * objective.sum() / ((K - 1) * batch.loss_mask().sum().clamp(min=1))
        else:
            loss = -objective.mean()
        if self.kl_in_loss:                                                # mean over responses of sum_t k3_t
            loss = loss + self.kl_coef * F.sequence_logprobs(F.kl_penalty(batch.logp, batch.ref_logp, "k3"),
                                                             batch.mask).mean()
        ratio = (logp - old).detach().exp()
        # how far the better and the worse response of each pair whose rewards differ (not their KL) have moved,
        # log pi / pi_old; 0 in a minibatch without such a pair
        shift, r = (logp - old).detach(), self.rewards(batch)
        raw = self.pair_differences(batch, i, j) if batch.pair_rewards is not None else r[i] - r[j]      # (P,)
        decided = raw != 0
        better, worse = torch.where(raw > 0, i, j)[decided], torch.where(raw > 0, j, i)[decided]
        metrics = {
            "loss": loss.detach(), "clipfrac": clipped.mean(), "ratio_mean": ratio.mean(), "ratio_max": ratio.max(),
            "delta_abs": delta.abs().mean(), "approx_kl_old": (0.5 * (logp - old).detach() ** 2).mean(),
            "kl_ref": (logp.detach() - ref).mean(),
            "better_shift": shift[better].sum() / max(len(better), 1),
            "worse_shift": shift[worse].sum() / max(len(worse), 1),
        }
        return ObjectiveOutput(loss, metrics)
