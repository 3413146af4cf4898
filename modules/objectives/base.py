"""The objective interface: the plug-in point of the RL stage.

An objective is a small `nn.Module` holding its hyperparameters (and, if it needs them, running statistics as
buffers, so they are checkpointed). It receives an `ObjectiveInput` of tensors and returns an
`ObjectiveOutput(loss, metrics)`; it never calls a model, a tokenizer or `self.log`. Class attributes tell the
RL module what it needs:
  responses_per_prompt  K responses sampled per prompt (2 for P3O and online DPO)
  needs_values          the module keeps a value head and fills `ObjectiveInput.values` (PPO)
  needs_reward_terms    the reward must be a `modules.rewards.Composed`; the module fills `ObjectiveInput.reward_terms`
                        and `reward_weights` (GRPO's `multi_objective_aggregation: normalize_then_sum`)
  separable_groups      the loss is a sum of per-group terms, each a function of its own group's rows of `logp`
                        and `values` alone, divided by constants of the minibatch (its token, pair or group
                        counts; never a statistic of the current `logp`). Then a micro-batch of whole groups has
                        its exact gradient with the other rows at any value, and a micro-batched update needs one
                        forward per micro-batch instead of two (`RLModule.backward_minibatch`; `forward` then
                        runs once per micro-batch, so it must not update state: that belongs in `prepare`). False
                        (the safe default for a new objective): the update pays the extra forward and is exact
                        either way.
Add an algorithm = one file with a subclass, selected in YAML by `class_path`.
"""
from __future__ import annotations

import torch
from torch import nn

from modules import functional as F
from modules.batch import ObjectiveInput, ObjectiveOutput


class Objective(nn.Module):
    responses_per_prompt: int = 1
    needs_values: bool = False
    needs_reward_terms: bool = False
    separable_groups: bool = False

    @torch.no_grad()
    def prepare(self, batch: ObjectiveInput) -> dict[str, torch.Tensor]:
        """Called once per rollout, before the epochs, on the whole rollout (`logp` = `old_logp`, no gradient).
        Update running statistics here and return per-row tensors (first dim N, e.g. advantages) that are then
        sliced into `batch.extra` for every minibatch. Each process holds its own rows of the rollout: a statistic of
        the whole rollout (a std, a whitening, a mean) takes `batch.sum_over_ranks` (`functional.moments`), so every
        process computes the same number: the one a single process would compute from the global batch."""
        return {}

    def forward(self, batch: ObjectiveInput) -> ObjectiveOutput:
        raise NotImplementedError


def check_clipping(name: str, clip_eps: float, dual_clip: float | None = None, clip_eps_high: float | None = None) -> None:
    """The ratio clip of the PPO-style objectives: `clip_eps` > 0, `clip_eps_high` > 0 when set, and `dual_clip`
    (Ye et al.'s c) > 1 when set."""
    if not clip_eps > 0:
        raise ValueError(f"{name}: clip_eps={clip_eps}; expected > 0")
    if clip_eps_high is not None and not clip_eps_high > 0:
        raise ValueError(f"{name}: clip_eps_high={clip_eps_high}; expected > 0 (DAPO uses 0.28 with clip_eps 0.2), or "
                         "null for clip_eps")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"{name}: dual_clip={dual_clip}; expected > 1, or null (off)")


class RunningMoments(nn.Module):
    """Running mean / std over everything passed to `update` (Chan et al. parallel algorithm), checkpointed; the
    same on every process when each update passes `sum_over`."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, sum_over=None) -> None:
        """Add the entries of `x` (every process's with `sum_over`, `functional.moments`)."""
        n, mean, var = F.moments(x.detach().double().flatten(), sum_over=sum_over)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        """Population std of everything seen."""
        return self.var.clamp(min=1e-12).sqrt()

    @property
    def unbiased_std(self) -> torch.Tensor:
        """Std with Bessel's correction, sqrt(var * n / (n - 1)) (trlx's `RunningMoments.std`)."""
        n = self.count.clamp(min=2.0)
        return (self.var * n / (n - 1)).clamp(min=1e-12).sqrt()
