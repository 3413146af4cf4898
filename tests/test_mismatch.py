"""The sampler/trainer mismatch correction (`functional.mismatch_weights`, `engines.MismatchCorrection`) on literal
tensors against TRL 1.16's GRPOTrainer formulas, and how every objective applies it."""
import math

import pytest
import torch

from modules import functional as F
from modules.engines import MismatchCorrection
from modules.objectives.dpo import OnlineDPO
from modules.objectives.grpo import GRPO
from modules.objectives.p3o import P3O
from modules.objectives.ppo import PPO
from modules.objectives.rloo import RLOO
from tests.test_objectives import make_input

OLD = torch.tensor([[-1.0, -2.0]])
SAMPLER = torch.tensor([[-1.5, -1.0]])
ONES = torch.ones(1, 2)


@pytest.mark.parametrize("level, mode, high, expected", [
    ("token", "truncate", 3.0, [math.exp(0.5), math.exp(-1.0)]),
    ("token", "mask", 3.0, [math.exp(0.5), math.exp(-1.0)]),
    ("token", "truncate", 1.5, [1.5, math.exp(-1.0)]),
    ("token", "mask", 1.5, [0.0, math.exp(-1.0)]),
    ("sequence", "truncate", 3.0, [math.exp(-0.5)] * 2),
    ("sequence", "mask", 3.0, [math.exp(-0.5)] * 2),
])
def test_mismatch_weights_match_the_docstring_example(level, mode, high, expected):
    """d = old - sampler = [0.5, -1.0]; token: exp(d) per token; sequence: exp(-0.5) on every token."""
    w = F.mismatch_weights(OLD, SAMPLER, ONES, level, mode, None, high)
    assert torch.allclose(w, torch.tensor([expected]), atol=1e-6)


def test_sequence_weights_above_the_bound_are_truncated_or_masked_and_padding_is_zero():
    """d = [2.0, 0.0] -> w = e^2 = 7.389 > 3: truncate gives 3, mask gives 0. A lower bound masks from below
    (TRL's clip_min), and positions outside the mask carry weight 0 and no difference."""
    old, sampler = torch.tensor([[-1.0, -1.0, 9.0]]), torch.tensor([[-3.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(F.mismatch_weights(old, sampler, mask, "sequence", "truncate", None, 3.0),
                          torch.tensor([[3.0, 3.0, 0.0]]))
    assert torch.equal(F.mismatch_weights(old, sampler, mask, "sequence", "mask", None, 3.0), torch.zeros(1, 3))
    low = F.mismatch_weights(sampler, old, mask, "sequence", "mask", 0.5, None)   # w = e^-2 = 0.135 < 0.5
    assert torch.equal(low, torch.zeros(1, 3))
    assert torch.allclose(F.mismatch_weights(sampler, old, mask, "sequence", "truncate", 0.5, None),
                          torch.tensor([[0.5, 0.5, 0.0]]))


def test_mismatch_weights_equal_trls_formula():
    """TRL 1.16 GRPOTrainer._generate_and_score_completions: per_token_logps_diff = (old - sampling) * mask;
    sequence modes sum it over tokens (keepdim); ratio = exp(diff); *_truncate: clamp(ratio, clip_min, clip_max);
    *_mask: ratio.masked_fill((ratio < min) | (ratio > max), 0). Here on random tensors, every mode."""
    gen = torch.Generator().manual_seed(0)
    old, sampler = torch.randn(6, 5, generator=gen) * 0.5 - 2, torch.randn(6, 5, generator=gen) * 0.5 - 2
    mask = (torch.rand(6, 5, generator=gen) > 0.2).float()
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            diff = (old - sampler) * mask
            ratio = torch.exp(diff.sum(-1, keepdim=True) if level == "sequence" else diff)
            if mode == "truncate":
                ratio = torch.clamp(ratio, min=0.5, max=2.0)
            else:
                ratio = ratio.masked_fill((ratio < 0.5) | (ratio > 2.0), 0.0)
            ours = MismatchCorrection(level, mode, max=2.0, min=0.5).weights(old, sampler, mask)
            assert torch.allclose(ours, (ratio * torch.ones_like(old)) * mask), (level, mode)


def test_sequence_weight_is_the_mean_over_the_response():
    w = torch.tensor([[0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(F.sequence_weight(w, torch.tensor([[1, 1, 0], [0, 0, 0]])), torch.tensor([1.0, 1.0]))


def test_correction_config_names_the_bad_field():
    with pytest.raises(ValueError, match="level='tokens'"):
        MismatchCorrection(level="tokens")
    with pytest.raises(ValueError, match="mode='clip'"):
        MismatchCorrection(mode="clip")


def _with_weights(batch, weights):
    batch.sampler_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return batch


def _loss_and_grad(objective, batch):
    batch.logp.grad = None
    batch.extra = objective.prepare(batch)
    loss = objective(batch).loss
    loss.backward()
    return loss.detach(), batch.logp.grad.clone()


LOGP = [[-1.0, -0.5], [-2.0, -0.2], [-0.3, -1.1], [-0.7, -0.9]]
OLD4 = [[-1.1, -0.4], [-1.8, -0.3], [-0.3, -1.0], [-0.9, -0.9]]
REF4 = [[-1.2, -0.6], [-1.9, -0.1], [-0.4, -1.2], [-0.8, -1.0]]
REWARDS = [1.0, -0.5, 0.3, 0.8]


@pytest.mark.parametrize("objective", [P3O(), P3O(variant="v1"), RLOO(), GRPO(k=2), OnlineDPO(), PPO()],
                         ids=["p3o_v2", "p3o_v1", "rloo", "grpo", "dpo", "ppo"])
def test_unit_weights_change_nothing_and_zero_weights_remove_the_policy_gradient(objective):
    """Every objective: weights of 1 give the uncorrected loss and gradient; weights of 0 on every token leave no
    policy gradient (PPO keeps its value loss, GRPO its KL term)."""
    values = [[0.1, 0.2]] * 4
    batch = lambda: make_input(LOGP, OLD4, REF4, REWARDS, mask=[[1, 1]] * 4, values=values)  # noqa: E731
    plain = _loss_and_grad(objective, batch())
    ones = _loss_and_grad(objective, _with_weights(batch(), [[1.0, 1.0]] * 4))
    assert torch.allclose(plain[0], ones[0]) and torch.allclose(plain[1], ones[1])
    zero_loss, zero_grad = _loss_and_grad(objective, _with_weights(batch(), [[0.0, 0.0]] * 4))
    if isinstance(objective, GRPO):      # only the KL term's gradient is left: beta * d k3 / d logp
        kl_only = GRPO(k=2, clip_eps=0.2)
        b = batch()
        b.extra = kl_only.prepare(b)
        F.masked_mean(kl_only.kl_coef * F.kl_penalty(b.logp, b.ref_logp, "k3"), b.mask, -1).mean().backward()
        assert torch.allclose(zero_grad, b.logp.grad)
    else:
        assert torch.count_nonzero(zero_grad) == 0


def test_grpo_weights_multiply_the_per_token_surrogate_as_trl_does():
    """TRL 1.16 GRPOTrainer._compute_loss: per_token_loss = -min(coef_1 A, coef_2 A); then
    per_token_loss *= importance_sampling_ratio; then + beta * per_token_kl; 'grpo' loss: mean over sequences of
    each sequence's token mean. Worked on literal tensors, with token weights [[2, 0.5], ...]."""
    weights = [[2.0, 0.5], [1.0, 0.0], [0.25, 1.0], [1.0, 1.0]]
    batch = _with_weights(make_input(LOGP, OLD4, REF4, REWARDS, mask=[[1, 1]] * 4), weights)
    grpo = GRPO(k=2, kl_coef=0.04, clip_eps=0.2)
    batch.extra = grpo.prepare(batch)
    ours = grpo(batch).loss
    logp, old, ref, w = batch.logp.detach(), batch.old_logp, batch.ref_logp, torch.tensor(weights)
    adv = batch.extra["advantages"][:, None]
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) * w
    per_token = per_token + 0.04 * (torch.exp(ref - logp) - (ref - logp) - 1)
    assert torch.allclose(ours.detach(), per_token.mean(-1).mean(), atol=1e-6)


def test_p3o_and_dpo_weight_each_pair_by_both_responses_and_rloo_each_response():
    """Sequence weights s = mean token weight of each response: here s = [2, 0.5, 1, 3] (token weights constant
    per row). P3O-V2's pair objectives are multiplied by s_i s_j = [1, 3]; online DPO's pair losses likewise; RLOO's
    per-response surrogates by s. So the weighted loss equals the unweighted per-pair (per-response) terms
    reweighted by hand."""
    s = [2.0, 0.5, 1.0, 3.0]
    weights = [[x, x] for x in s]
    pair_w = torch.tensor([s[0] * s[1], s[2] * s[3]])
    mk = lambda: make_input(LOGP, OLD4, REF4, REWARDS, mask=[[1, 1]] * 4)  # noqa: E731
    from modules.objectives.p3o import group_pairs, p3o_v2_terms

    b = mk()
    logp, old, ref = (F.sequence_logprobs(x.detach(), b.mask) for x in (b.logp, b.old_logp, b.ref_logp))
    r_hat = b.rewards - 0.05 * (logp - ref)
    i, j = group_pairs(4, 2)
    terms, _ = p3o_v2_terms(r_hat[i] - r_hat[j], logp[i], logp[j], old[i], old[j], 0.2, 10.0)
    assert torch.allclose(P3O()(_with_weights(mk(), weights)).loss, -(terms * pair_w).mean(), atol=1e-6)

    plain = OnlineDPO(beta=0.1)
    b = mk()
    h = F.sequence_logprobs(b.logp.detach() - b.ref_logp, b.mask)
    margin = 0.1 * (h[0::2] - h[1::2]) * torch.sign(b.rewards[0::2] - b.rewards[1::2])
    expected = (-torch.nn.functional.logsigmoid(margin) * pair_w).mean()
    assert torch.allclose(plain(_with_weights(mk(), weights)).loss, expected, atol=1e-6)

    rloo = RLOO(k=2)
    b = _with_weights(mk(), weights)
    b.extra = rloo.prepare(b)
    adv = b.extra["advantages"]
    ratio = torch.exp(logp - old)
    surrogate = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    assert torch.allclose(rloo(b).loss, -(surrogate * torch.tensor(s)).mean(), atol=1e-6)
