"""The RL module's containers: a rollout of sampled responses and what an objective sees and returns.
N = rows (responses), P = prompt length, L = response length. The datamodule's containers (`PairBatch`,
`Sequences`) live in `datamodules.batch`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modules.functional import sequence_weight


@dataclass
class Rollout:
    """K sampled responses per prompt, flattened prompt-major: row i*K + k is the k-th response to prompt i.

    Written by `modules.sampling.sample` (+ scoring) and consumed by the RL module. Sequence-level values
    are sums over the response mask; per-token values are aligned with `response_ids`.
    """

    input_ids: torch.Tensor        # (N, P + L) left-padded prompt then response (pads after EOS)
    attention_mask: torch.Tensor   # (N, P + L) 1 on every real token (with tools: the tool results too)
    response_mask: torch.Tensor    # (N, L) the policy's own tokens: 1 up to and including the first EOS (with tools:
                                   # each turn's tokens, 0 on the tool results between them; `datamodules.tools`)
    prompt_length: int             # P: response token l sits at column P + l
    group_size: int                # K responses per prompt; N = num_prompts * K
    prompts: list                  # (N,) each row's prompt: its text, or its conversation (a list of messages)
    responses: list[str]           # (N,) decoded response text (truncated after EOS)
    has_eos: torch.Tensor          # (N,) bool
    rewards: torch.Tensor | None = None      # (N,) reward used for training (penalties included)
    old_logp: torch.Tensor | None = None     # (N, L) per-token logprobs under pi_old
    ref_logp: torch.Tensor | None = None     # (N, L) per-token logprobs under pi_ref
    values: torch.Tensor | None = None       # (N, L) value estimates (objectives with needs_values)
    sampler_logp: torch.Tensor | None = None  # (N, L) the engine's own logprobs, kept when pi_old is a forward's
    sampler_weights: torch.Tensor | None = None  # (N, L) mismatch correction pi_old / pi_sampler (engine.correction)
    pair_rewards: torch.Tensor | None = None  # (N, K) pairwise reward of each response over each of its group's
    entropy: torch.Tensor | None = None      # (N, L) entropy of the distribution each token was drawn from (our sampler;
                                             # pi_old's forward's where `top_entropy_quantile` needs it and that is pi_old)
    forks: torch.Tensor | None = None        # (N, L) bool: the tokens the policy gradient flows through
                                             # (`RLModule top_entropy_quantile`; None: every trained token)
    timings: dict[str, float] = field(default_factory=dict)  # perf/* seconds spent building it
    fields: dict[str, list] = field(default_factory=dict)    # the reward's record fields: name -> (N,) values, row's prompt
    reward_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # a composed reward's terms: name -> (N,)
    messages: list[list[dict]] | None = None  # (N,) with tools: each response as its assistant and tool messages
    environments: list | None = None          # (N,) with a tools environment: each response's instance (rewards read it)
    extras: dict[str, list] = field(default_factory=dict)    # the columns a reward logged (TRL's `log_extra`): name -> (N,)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]  # (N, L)

    def completion_ids(self) -> list[list[int]]:
        """Each response's token ids up to and including its EOS (all of them without one), tool results included:
        what a reward that takes `completion_ids` gets (TRL's name; `modules.rewards.call_text_reward`)."""
        ids, mask = self.response_ids.cpu(), self.attention_mask[:, self.prompt_length:].bool().cpu()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The sub-rollout of the given row indices (whole groups are the caller's business)."""
        idx = rows.tolist()
        take = lambda t: None if t is None else t[rows]  # noqa: E731
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_length,
                       self.group_size, [self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                       self.has_eos[rows], take(self.rewards), take(self.old_logp), take(self.ref_logp),
                       take(self.values), take(self.sampler_logp), take(self.sampler_weights),
                       take(self.pair_rewards), take(self.entropy), take(self.forks),
                       fields={name: [values[i] for i in idx] for name, values in self.fields.items()},
                       reward_terms={name: values[rows.to(values.device)] for name, values in self.reward_terms.items()},
                       messages=None if self.messages is None else [self.messages[i] for i in idx],
                       environments=None if self.environments is None else [self.environments[i] for i in idx],
                       extras={name: [values[i] for i in idx] for name, values in self.extras.items()})

    def with_fields(self, fields: dict[str, list]) -> "Rollout":
        """Set `fields` from the prompts' record fields (name -> one value per prompt): each repeated for the K
        responses to its prompt. Returns the rollout."""
        K = self.group_size
        self.fields = {name: [value for value in values for _ in range(K)] for name, values in fields.items()}
        return self


def loss_mask(mask: torch.Tensor, trained: torch.Tensor | None) -> torch.Tensor:
    """(N, L) `mask` less the rows (N,) that are not `trained`; `mask` itself when `trained` is None."""
    return mask if trained is None else mask * trained[:, None].to(mask.dtype)


@dataclass
class ObjectiveInput:
    """Everything an objective sees: tensors only. N = rows (groups of `group_size` consecutive rows share a
    prompt), L = response length. Per-token tensors are aligned with the response tokens."""

    logp: torch.Tensor         # (N, L) logprobs under the current policy (carries the gradient)
    old_logp: torch.Tensor     # (N, L) logprobs under pi_old, the policy that sampled the rollout
    ref_logp: torch.Tensor     # (N, L) logprobs under the frozen reference policy
    mask: torch.Tensor         # (N, L) 1 on response tokens up to and including the first EOS
    rewards: torch.Tensor      # (N,) sequence rewards (penalties included)
    group_size: int            # K responses per prompt
    values: torch.Tensor | None = None       # (N, L) current value estimates (objectives with needs_values)
    old_values: torch.Tensor | None = None   # (N, L) value estimates recorded with the rollout
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row tensors from `Objective.prepare`
    max_new_tokens: int | None = None        # the sampler's response budget (Dr. GRPO's constant normaliser)
    tokens_per_rank: float | None = None     # response tokens of this update's minibatch, mean over ranks (DAPO)
    sampler_weights: torch.Tensor | None = None  # (N, L) detached pi_old / pi_sampler weights (engine.correction)
    pair_rewards: torch.Tensor | None = None  # (N, K) a pairwise reward's M[i K + a, b] = f(x_i, y_a, y_b) (else None)
    trained: torch.Tensor | None = None      # (N,) bool: rows whose tokens carry the loss (None: all; mask_truncated)
    sampler_logp: torch.Tensor | None = None  # (N, L) the engine's own logprobs where pi_old is a forward's (else None)
    forks: torch.Tensor | None = None        # (N, L) bool: the forking tokens, the policy gradient's alone (None: all)
    reward_terms: torch.Tensor | None = None  # (N, T) a composed reward's terms (NaN where one does not apply), for
    reward_weights: torch.Tensor | None = None  # (T,) their weights; objectives with `needs_reward_terms` (else None)
    # in `prepare` only: a tensor summed over the processes (every process calls it there at the same point), so
    # that a statistic of the rollout (a std, a whitening, a mean KL) is of every process's rows; None in one process
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    def loss_mask(self) -> torch.Tensor:
        """(N, L) the tokens that carry the loss: `mask` less the rows that are not `trained` (`RLModule
        mask_truncated`: responses cut off before EOS). Token-level means and counts of a loss are over these;
        advantages, baselines and KL shaping use `mask`, every response as sampled.

        Example: mask [[1, 1, 0], [1, 1, 1]], trained [True, False] -> [[1, 1, 0], [0, 0, 0]]."""
        return loss_mask(self.mask, self.trained)

    def policy_mask(self) -> torch.Tensor:
        """(N, L) the tokens whose policy term trains: `loss_mask()` less the tokens that are not `forks`. (Means
        and counts of a loss stay over `loss_mask()`; the entropy bonus is a mean over these.)

        Example: mask [[1, 1, 0], [1, 1, 1]], trained None, forks [[0, 1, 1], [1, 0, 0]] -> [[0, 1, 0], [1, 0, 0]]."""
        mask = self.loss_mask()
        return mask if self.forks is None else mask * self.forks.to(mask.dtype)

    def token_weights(self, correction: bool = True) -> torch.Tensor | float:
        """(N, L) weights of each token's policy loss: the mismatch correction's (unless not `correction`) times
        0 on the tokens that are not `forks`; 1.0 without either."""
        weights = self.sampler_weights if correction and self.sampler_weights is not None else 1.0
        return weights if self.forks is None else weights * self.forks.to(self.logp.dtype)

    def policy_logp(self) -> torch.Tensor:
        """`logp` for a sequence-level policy term: its gradient only through the `forks` (the same values).

        Example: logp [[-1, -2]], forks [[True, False]]: sum(policy_logp) = -3, its gradient [[1, 0]]."""
        return self.logp if self.forks is None else torch.where(self.forks, self.logp, self.logp.detach())

    def sequence_weights(self) -> torch.Tensor | float:
        """(N,) mismatch-correction weight of each response (`functional.sequence_weight`); 1.0 without one."""
        return 1.0 if self.sampler_weights is None else sequence_weight(self.sampler_weights, self.mask)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                                          # scalar, differentiable
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, logged under train/
