"""P3O maths on literal tensors (docs/algorithms.md sections 5, 6 and 10).

Responses have one token each, so a sequence logprob equals its token logprob and every number below can be
checked by hand. Rows come in pairs (y1, y2) of the same prompt.
"""
import math

import pytest
import torch

from modules.batch import ObjectiveInput
from modules.objectives.p3o import P3O


def make_input(logp, old, ref, rewards):
    logp = torch.tensor(logp, dtype=torch.float32).view(-1, 1).requires_grad_(True)
    as_col = lambda x: torch.tensor(x, dtype=torch.float32).view(-1, 1)  # noqa: E731
    return ObjectiveInput(logp=logp, old_logp=as_col(old), ref_logp=as_col(ref), mask=torch.ones_like(logp),
                          rewards=torch.tensor(rewards, dtype=torch.float32), group_size=2)


def grad(objective, batch):
    batch.logp.grad = None
    objective(batch).loss.backward()
    return batch.logp.grad.view(-1).clone()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_shift_invariance(variant):
    """Adding delta(x) to both rewards of a prompt leaves the gradient unchanged (to float tolerance)."""
    torch.manual_seed(0)
    n = 16
    logp = (-torch.rand(n) * 3).tolist()
    old = (torch.tensor(logp) + 0.3 * torch.randn(n)).tolist()   # some ratios clipped, some not
    ref = (torch.tensor(logp) - torch.rand(n)).tolist()
    rewards = torch.randn(n)
    shift = (torch.randn(n // 2) * 100).repeat_interleave(2)      # one delta per prompt
    objective = P3O(variant=variant)
    g = grad(objective, make_input(logp, old, ref, rewards.tolist()))
    g_shift = grad(objective, make_input(logp, old, ref, (rewards + shift).tolist()))
    assert g.abs().sum() > 0
    assert torch.allclose(g, g_shift, atol=1e-5)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_reduces_to_pairwise_policy_gradient_at_ratio_one(variant):
    """Ratios 1, clip inactive: -grad loss = 1/2 * Delta * (+1, -1) / P, with Delta the KL-shaped difference.

    Pair 0: r = (1, 0), logp - ref = (0.2, 0.4), beta = 0.5 -> r_hat = (0.9, -0.2), Delta = 1.1.
    Pair 1: r = (0, 2), logp - ref = (0, 0) -> Delta = -2. P = 2 pairs.
    """
    logp = [-1.0, -2.0, -1.5, -0.5]
    ref = [-1.2, -2.4, -1.5, -0.5]
    objective = P3O(variant=variant, kl_coef=0.5)
    g = grad(objective, make_input(logp, logp, ref, [1.0, 0.0, 0.0, 2.0]))
    expected = torch.tensor([0.5 * 1.1, -0.5 * 1.1, 0.5 * -2.0, -0.5 * -2.0]) / 2
    assert torch.allclose(-g, expected, atol=1e-6)


def test_v1_clips_each_ratio_by_the_sign_of_delta():
    """Delta = +1 (r = (1, 0), beta = 0). Pair rows: (rho1, rho2).

    rho1 = 1.5 > 1 + eps with Delta > 0: term 1 is clipped -> zero gradient on y1.
    rho2 = 1.0: term 2 = -Delta * c1 * rho2 with c1 = sg[clamp(1.5)] = 1.5 -> d/dlogp2 = -1/2 * 1.5 (per pair).
    """
    objective = P3O(variant="v1", kl_coef=0.0, clip_eps=0.2)
    g = grad(objective, make_input([math.log(1.5), 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert g[0] == 0.0
    assert math.isclose(-g[1].item(), -0.5 * 1.5, rel_tol=1e-6)

    # rho1 = 0.5 < 1 - eps with Delta > 0: the unclipped branch is the min -> gradient 1/2 * Delta * c2 * rho1.
    g = grad(objective, make_input([math.log(0.5), 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert math.isclose(-g[0].item(), 0.5 * 1.0 * 0.5, rel_tol=1e-6)

    # Delta < 0 (r = (0, 1)): now rho1 = 1.5 is NOT clipped and rho1 = 0.5 is.
    g = grad(objective, make_input([math.log(1.5), 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    assert math.isclose(-g[0].item(), 0.5 * -1.0 * 1.5, rel_tol=1e-6)
    g = grad(objective, make_input([math.log(0.5), 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    assert g[0] == 0.0


def test_v1_partner_weight_is_capped_at_R():
    """rho2 = 100 -> c2 = R = 10; rho1 = 1: d(-loss)/dlogp1 = 1/2 * Delta * c2 * rho1 = 5 (Delta = 1).
    rho2 = 1e-4 -> c2 = 1/R: d(-loss)/dlogp1 = 1/2 * 0.1 = 0.05."""
    objective = P3O(variant="v1", kl_coef=0.0, is_cap=10.0)
    g = grad(objective, make_input([0.0, math.log(100.0)], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert math.isclose(-g[0].item(), 5.0, rel_tol=1e-5)
    g = grad(objective, make_input([0.0, math.log(1e-4)], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert math.isclose(-g[0].item(), 0.5 * 0.1, rel_tol=1e-5)      # c2 = 1/R


def test_v2_joint_clip_on_the_relative_log_likelihood():
    """L_old = 0. Delta = +1: L = 0.3 > eps -> clipped, zero gradient; L = 0.1 -> gradient 1/2 * w * (+1, -1)
    with w = rho1 * rho2 = e^0.1 * 1. Delta = -1 and L = 0.3 -> not clipped (min picks the unclipped branch)."""
    objective = P3O(variant="v2", kl_coef=0.0, clip_eps=0.2)
    g = grad(objective, make_input([0.3, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert torch.equal(g, torch.zeros(2))
    g = grad(objective, make_input([0.1, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    w = math.exp(0.1)
    assert torch.allclose(-g, torch.tensor([0.5 * w, -0.5 * w]), atol=1e-6)
    g = grad(objective, make_input([0.3, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    w = math.exp(0.3)
    assert torch.allclose(-g, torch.tensor([-0.5 * w, 0.5 * w]), atol=1e-6)


def test_v2_joint_weight_is_capped():
    """rho1 * rho2 = e^5 > R = 10 -> w = 10. L - L_old = 0 (both ratios move together): inside the band."""
    objective = P3O(variant="v2", kl_coef=0.0, is_cap=10.0)
    g = grad(objective, make_input([2.5, 2.5], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert torch.allclose(-g, torch.tensor([5.0, -5.0]), atol=1e-5)
    g = grad(objective, make_input([-2.5, -2.5], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert torch.allclose(-g, torch.tensor([0.05, -0.05]), atol=1e-6)


def test_metrics_and_errors():
    objective = P3O(variant="v1")
    out = objective(make_input([0.0, math.log(1.5)], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
    assert out.metrics["clipfrac"].item() == 0.5 and math.isclose(out.metrics["ratio_max"].item(), 1.5, rel_tol=1e-6)
    assert all(not v.requires_grad for v in out.metrics.values())
    bad = make_input([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0])
    bad.group_size = 4
    with pytest.raises(ValueError, match="2 responses per prompt"):
        objective(bad)
    with pytest.raises(ValueError, match="variant"):
        P3O(variant="v3")


def test_scale_q_breaks_shift_invariance_because_its_running_std_mixes_prompts():
    """With scale_q the reward difference is divided by the running std of rewards over *all* prompts. Rewards
    [1, 0, 0, 1] have std 0.577; shifted by +10 / -10 per prompt, [11, 10, -10, -9] have std 11.56: the same
    reward differences weigh 20x less, so the gradient shrinks. Without scale_q the two gradients are equal."""
    logp, old, ref = [-1.0, -1.2, -0.8, -1.1], [-1.0, -1.2, -0.8, -1.1], [-1.3, -1.0, -0.9, -1.0]
    rewards, shifted = [1.0, 0.0, 0.0, 1.0], [11.0, 10.0, -10.0, -9.0]
    for scale_q in (False, True):
        grads = []
        for r in (rewards, shifted):
            objective = P3O(variant="v2", scale_q=scale_q, kl_coef=0.0)
            batch = make_input(logp, old, ref, r)
            objective.prepare(batch)
            grads.append(grad(objective, batch))
        if scale_q:
            assert grads[1].abs().sum() < grads[0].abs().sum() / 10
        else:
            assert torch.allclose(grads[0], grads[1], atol=1e-6)
