"""PPO, online DPO, RLOO and GRPO maths on literal tensors, and P3O's place among them."""
import math

import pytest
import torch

from modules import functional as F
from modules.batch import ObjectiveInput
from modules.objectives.dpo import OnlineDPO
from modules.objectives.grpo import GRPO, group_normalized_advantages
from modules.objectives.p3o import P3O
from modules.objectives.ppo import PPO, gae, last_token_mask
from modules.objectives.rloo import RLOO, leave_one_out_advantages


def make_input(logp, old=None, ref=None, rewards=None, group_size=2, mask=None, values=None):
    logp = torch.tensor(logp, dtype=torch.float32)
    logp = (logp if logp.dim() == 2 else logp[:, None]).requires_grad_(True)
    like = lambda x: logp.detach().clone() if x is None else torch.tensor(x, dtype=torch.float32).view_as(logp)  # noqa
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return ObjectiveInput(logp=logp, old_logp=like(old), ref_logp=like(ref), mask=mask,
                          rewards=torch.tensor(rewards, dtype=torch.float32), group_size=group_size,
                          values=None if values is None else torch.tensor(values, dtype=torch.float32),
                          old_values=None if values is None else torch.tensor(values, dtype=torch.float32))


def grad(objective, batch):
    batch.logp.grad = None
    batch.extra = objective.prepare(batch)   # as the RL module does once per rollout
    objective(batch).loss.backward()
    return batch.logp.grad.clone()


def test_dpo_loss_is_log2_when_policy_equals_reference():
    batch = make_input([-1.0, -2.0, -0.5, -3.0], ref=[-1.0, -2.0, -0.5, -3.0], rewards=[1.0, 0.0, 0.0, 2.0])
    assert math.isclose(OnlineDPO(beta=0.1)(batch).loss.item(), math.log(2.0), rel_tol=1e-6)
    assert math.isclose(OnlineDPO(beta=0.1, soft_labels=True)(batch).loss.item(), math.log(2.0), rel_tol=1e-6)


def test_dpo_winner_is_picked_by_the_reward_and_ties_carry_no_preference():
    """Pair 0 has r = (0, 1): y2 wins, so the gradient raises logp2 and lowers logp1. At the reference
    d loss / d logp_w = -beta * sigmoid(0) = -beta / 2, averaged over the 1 non-tied pair; pair 1 is a tie."""
    batch = make_input([0.0, 0.0, 0.0, 0.0], ref=[0.0] * 4, rewards=[0.0, 1.0, 5.0, 5.0])
    g = grad(OnlineDPO(beta=0.4), batch).view(-1)
    assert torch.allclose(g, torch.tensor([0.2, -0.2, 0.0, 0.0]))


def test_dpo_soft_labels_weight_both_orderings():
    """r = (2, 0): p = sigmoid(2); loss = -[p log s(m) + (1-p) log s(-m)], m = beta * (h1 - h2) = 0.1 * 1."""
    batch = make_input([1.0, 0.0], ref=[0.0, 0.0], rewards=[2.0, 0.0])
    p, m = 1 / (1 + math.exp(-2.0)), 0.1
    ls = lambda x: -math.log(1 + math.exp(-x))  # noqa: E731
    expected = -(p * ls(m) + (1 - p) * ls(-m))
    assert math.isclose(OnlineDPO(beta=0.1, soft_labels=True)(batch).loss.item(), expected, rel_tol=1e-6)


def test_kl_estimators_literal_and_grpo_refusals():
    """`functional.kl_penalty`'s example at logp - ref = 1 and -30 (values and gradients); GRPO's `kl_estimator` other
    than k3 with `kl_in_reward` or `kl_bias_correction`, or an unknown name: one line."""
    e = math.exp(-1.0)
    for name, value, slope in (("k1", 1.0, 1.0), ("k2", 0.5, 1.0), ("k3", e, 1 - e), ("low_var_kl", e, 1 - e),
                               ("k1+", 1.0, 1.0), ("k3+", e, 1.0)):
        x = torch.tensor(1.0, requires_grad=True)
        out = F.kl_penalty(x, torch.tensor(0.0), name)
        out.backward()
        assert (out.item(), x.grad.item()) == (pytest.approx(value, rel=1e-6), pytest.approx(slope, rel=1e-6)), name
    x = torch.tensor(-30.0, requires_grad=True)
    out = F.kl_penalty(x, torch.tensor(0.0), "low_var_kl")
    out.backward()
    assert (out.item(), x.grad.item()) == (10.0, 0.0)
    for options, message in (({"kl_in_reward": True}, "kl_in_reward removes that term"),
                             ({"kl_bias_correction": True}, "kl_bias_correction is defined for k3"),
                             ({"kl_estimator": "k4"}, "expected one of")):
        with pytest.raises(ValueError, match=message):
            GRPO(**{"kl_estimator": "k1", **options})


def test_online_ipo_squares_the_margin_from_one_over_two_beta():
    """TRL's online `loss_type: ipo`, beta 0.5: pair 0 has r = (0, 1), so y2 wins, h = logp - ref = (0.5, 1.0): loss
    (h_w - h_l - 1 / (2 beta))^2 = (0.5 - 1)^2 = 0.25, gradient 2 (0.5 - 1) = -1 on logp2 and +1 on logp1; pair 1
    ties (left out). With soft labels: one line."""
    batch = make_input([0.5, 1.0, 0.0, 0.0], ref=[0.0] * 4, rewards=[0.0, 1.0, 5.0, 5.0])
    ipo = OnlineDPO(beta=0.5, loss_type="ipo")
    assert ipo(batch).loss.item() == pytest.approx(0.25)
    assert torch.allclose(grad(ipo, batch).view(-1), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="soft_labels weights the two orderings of the sigmoid loss"):
        OnlineDPO(soft_labels=True, loss_type="ipo")


def test_gae_against_a_hand_computed_example():
    """gamma = 1, lambda = 0.5, rewards (0, 0, 1), values (0.5, 0.6, 0.7):
    deltas: d2 = 1 - 0.7 = 0.3, d1 = 0 + 0.7 - 0.6 = 0.1, d0 = 0 + 0.6 - 0.5 = 0.1
    A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225; returns = A + V.
    The fourth position is padding: zero advantage, and it does not bootstrap the last real token."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0]]))
    assert torch.allclose(ret[:, :3], torch.tensor([[0.725, 0.85, 1.0]]))


def test_ppo_token_rewards_put_the_score_on_the_last_token():
    """beta = 0.5, k1 KL per token = old - ref = (0.2, 0.4, 0); score 3 on the last real token (index 1)."""
    batch = make_input([[0.0, 0.0, 0.0]], old=[[0.2, 0.4, 0.0]], ref=[[0.0, 0.0, 0.0]], rewards=[3.0],
                       mask=[[1.0, 1.0, 0.0]], group_size=1)
    assert torch.equal(last_token_mask(batch.mask), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.allclose(PPO(kl_coef=0.5).token_rewards(batch), torch.tensor([[-0.1, -0.2 + 3.0, 0.0]]))


def pair_batch(rewards, seed=0):
    torch.manual_seed(seed)
    n = len(rewards)
    logp = (-torch.rand(n) * 2).tolist()
    old = (torch.tensor(logp) + 0.05 * torch.randn(n)).tolist()  # inside the clip band
    ref = (torch.tensor(logp) - torch.rand(n)).tolist()
    return logp, old, ref


def test_ppo_is_not_shift_invariant_but_p3o_is():
    rewards = torch.tensor([1.0, -0.5, 0.3, 2.0])
    shift = torch.tensor([5.0, 5.0, -3.0, -3.0])                 # one delta per prompt (pairs of rows)
    logp, old, ref = pair_batch(rewards.tolist())
    values = [[0.1], [0.2], [0.3], [0.4]]

    def ppo_grad(r):
        return grad(PPO(whiten_advantages=False), make_input(logp, old, ref, r.tolist(), group_size=1, values=values))

    def p3o_grad(r):
        return grad(P3O(), make_input(logp, old, ref, r.tolist()))

    assert not torch.allclose(ppo_grad(rewards), ppo_grad(rewards + shift), atol=1e-3)
    assert torch.allclose(p3o_grad(rewards), p3o_grad(rewards + shift), atol=1e-6)


def test_p3o_reduces_to_rloo_with_two_samples():
    """Ratios 1 (old = logp), clip inactive: P3O-V1, P3O-V2 and RLOO(k=2) give the same gradient."""
    rewards = [1.0, -0.5, 0.3, 2.0, 0.0, 0.7]
    logp, _, ref = pair_batch(rewards, seed=1)
    g_rloo = grad(RLOO(k=2, kl_coef=0.05), make_input(logp, logp, ref, rewards))
    for variant in ("v1", "v2"):
        g_p3o = grad(P3O(variant=variant, kl_coef=0.05), make_input(logp, logp, ref, rewards))
        assert torch.allclose(g_p3o, g_rloo, atol=1e-6), variant


def test_leave_one_out_and_group_normalised_advantages():
    """Group (1, 2, 6): baselines (4, 3.5, 1.5) -> A = (-3, -1.5, 4.5). GRPO with k = 2 loses the magnitude:
    (r - mean) / std = +-1/sqrt(2) whatever the difference."""
    assert torch.allclose(leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))
    for gap in (0.1, 10.0):
        adv = group_normalized_advantages(torch.tensor([gap, 0.0]), 2)
        assert torch.allclose(adv, torch.tensor([1.0, -1.0]) / math.sqrt(2), atol=1e-3)


def test_grpo_gradient_at_ratio_one_and_reference():
    """logp = old = ref: the k3 KL has zero gradient, clip inactive -> d loss / d logp_t = -A_i / (L_i * N)."""
    batch = make_input([[0.0, 0.0], [0.0, 0.0]], rewards=[1.0, 0.0], mask=[[1.0, 1.0], [1.0, 0.0]])
    g = grad(GRPO(k=2, kl_coef=0.1), batch)
    a = 1 / math.sqrt(2) / (1 + 1e-4 * math.sqrt(2))
    assert torch.allclose(g, torch.tensor([[-a / 4, -a / 4], [a / 2, 0.0]]), atol=1e-5)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    """KL 2x the target: error clipped to 0.2; beta *= 1 + 0.2 * N / horizon = 1 + 0.2 * 2 / 10."""
    ppo = PPO(kl_coef=0.1, target_kl=1.0, kl_horizon=10)
    batch = make_input([[0.0], [0.0]], old=[[2.0], [2.0]], ref=[[0.0], [0.0]], rewards=[0.0, 0.0], group_size=1,
                       values=[[0.0], [0.0]])
    ppo.prepare(batch)
    assert math.isclose(ppo.kl_coef.item(), 0.1 * 1.04, rel_tol=1e-6)


def test_ppo_needs_values_and_objectives_validate_group_sizes():
    with pytest.raises(ValueError, match="value estimates"):
        PPO().prepare(make_input([0.0], rewards=[1.0], group_size=1))
    with pytest.raises(ValueError, match="k >= 2"):
        RLOO(k=1)
    assert PPO.needs_values and OnlineDPO.responses_per_prompt == 2 and GRPO(k=4).responses_per_prompt == 4


@pytest.mark.parametrize("build, message", [
    (lambda: P3O(clip_eps=0.0), r"^P3O: clip_eps=0.0; expected > 0$"),
    (lambda: P3O(is_cap=-1.0), r"^P3O: is_cap=-1.0; expected > 0$"),
    (lambda: PPO(dual_clip=1.0), r"^PPO: dual_clip=1.0; expected > 1, or null \(off\)$"),
    (lambda: PPO(kl_estimator="k4"), r"^PPO: kl_estimator='k4'; expected 'k1', 'k2', 'k3' or 'low_var_kl'$"),
    (lambda: PPO(lam=1.5), r"^PPO: gamma=1.0, lam=1.5; expected both in \[0, 1\]$"),
    (lambda: RLOO(clip_eps=-0.2), r"^RLOO: clip_eps=-0.2; expected > 0$"),
    (lambda: GRPO(dual_clip=0.5), r"^GRPO: dual_clip=0.5; expected > 1, or null \(off\)$"),
    (lambda: OnlineDPO(beta=0.0), r"^OnlineDPO: beta=0.0; expected > 0$"),
], ids=["p3o_clip", "p3o_cap", "ppo_dual", "ppo_kl", "ppo_lam", "rloo_clip", "grpo_dual", "dpo_beta"])
def test_objectives_refuse_hyperparameters_outside_their_range(build, message):
    """Checked when the config is read (`train.py` prints the message as one line). Before: a kl_estimator typo
    failed at the first update, the rest ran (clip_eps 0 pins the clipped ratio at 1, dual_clip <= 1 is no lower
    bound: Ye et al.'s c > 1)."""
    with pytest.raises(ValueError, match=message):
        build()
    P3O(clip_eps=1e9), PPO(dual_clip=3.0, gamma=0.0, lam=1.0), GRPO(dual_clip=1.01), OnlineDPO(beta=1e-3)  # in range


def test_rloo_reward_clip_range_and_normalize_advantages():
    """The docstring's example: rewards [3, -1] clamped to [-0.5, 2] are [2, -0.5], minus 0.5 x KL [1, 0]: [1.5,
    -0.5], so A = [2, -2]. Normalised, two groups' A [2, -2, 1, -1]: mean 0, std sqrt(10 / 3) = 1.8257, so [1.0954,
    -1.0954, 0.5477, -0.5477] (eps 1e-4 aside). A range that is not [low < high], or normalising with the advantages
    recomputed every minibatch, is one line."""
    rloo = RLOO(k=2, kl_coef=0.5, reward_clip_range=(-0.5, 2.0))
    batch = make_input([[0.0], [0.0]], old=[[1.0], [0.0]], ref=[[0.0], [0.0]], rewards=[3.0, -1.0])
    assert rloo.prepare(batch)["advantages"].tolist() == [2.0, -2.0]
    batch = make_input([[0.0]] * 4, rewards=[2.0, -2.0, 1.0, -1.0])
    normalized = RLOO(k=2, kl_coef=0.0, normalize_advantages=True).prepare(batch)["advantages"]
    assert torch.allclose(normalized, torch.tensor([1.0954, -1.0954, 0.5477, -0.5477]), atol=1e-4)
    with pytest.raises(ValueError, match=r"reward_clip_range=\(2.0, 1.0\); expected \[low, high\] with low < high"):
        RLOO(reward_clip_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="normalize_advantages normalises the rollout's advantages once"):
        RLOO(normalize_advantages=True, kl_on_current_policy=True)


def test_p3o_normalize_terms_scales_each_term_by_its_pair_differences():
    """`normalized_term_rewards`' example: K 2, weights [1, 0.25], terms [[1, 3], [0, -3], [1, 6], [1, 0]]: rms of the
    differences sqrt(1/2) (correct) and 6 (judge), so the pairs' Delta before the KL is [1.6642, 0.25] (eps aside).
    A term shifted by a constant per prompt leaves every Delta as it was (each term's differences are), and a term
    that does not apply (NaN) to a group adds nothing. P3O with the option trains on these Deltas; with `scale_q` or
    `reward_clip`, one line."""
    from modules.objectives.p3o import normalized_term_rewards

    terms, weights = torch.tensor([[1.0, 3.0], [0.0, -3.0], [1.0, 6.0], [1.0, 0.0]]), torch.tensor([1.0, 0.25])
    rewards = normalized_term_rewards(terms, weights, 2)
    assert torch.allclose(rewards[0::2] - rewards[1::2], torch.tensor([1.6642, 0.25]), atol=1e-3)
    shifted = terms + torch.tensor([[5.0, -100.0], [5.0, -100.0], [-2.0, 7.0], [-2.0, 7.0]])
    moved = normalized_term_rewards(shifted, weights, 2)
    assert torch.allclose(moved[0::2] - moved[1::2], rewards[0::2] - rewards[1::2], atol=1e-5)
    missing = torch.cat([terms, torch.tensor([[float("nan")], [float("nan")], [4.0], [0.0]])], -1)
    three = normalized_term_rewards(missing, torch.tensor([1.0, 0.25, 1.0]), 2)      # third term: rms 4 over 1 pair
    assert torch.allclose(three[0::2] - three[1::2], torch.tensor([1.6642, 0.25 + 1.0]), atol=1e-3)
    p3o = P3O(kl_coef=0.0, normalize_terms=True)
    batch = make_input([[0.0]] * 4, rewards=(terms @ weights).tolist())
    batch.reward_terms, batch.reward_weights = terms, weights
    batch.extra = p3o.prepare(batch)
    assert p3o(batch).metrics["delta_abs"].item() == pytest.approx((1.6642 + 0.25) / 2, abs=1e-3)
    for option in ({"scale_q": True}, {"reward_clip": 1.0}):
        with pytest.raises(ValueError, match="normalize_terms scales each term of the composed reward by its own"):
            P3O(normalize_terms=True, **option)


def rollout_input(rows: slice, seed: int = 0, groups: int = 4, K: int = 4, L: int = 3) -> ObjectiveInput:
    """Rows `rows` of a rollout of `groups` x K responses whose second half's rewards (and their terms) are 4x as
    spread as the first's and whose responses end at different lengths; values for PPO, two reward terms for GDPO."""
    gen = torch.Generator().manual_seed(seed)
    N = groups * K
    old, ref, values = -torch.rand(N, L, generator=gen), -torch.rand(N, L, generator=gen), torch.randn(N, L, generator=gen)
    mask = torch.ones(N, L)
    mask[1::3, 2:] = 0
    spread = torch.where(torch.arange(N) >= N // 2, 4.0, 1.0)
    terms = torch.randn(N, 2, generator=gen) * spread[:, None]
    return ObjectiveInput(logp=old[rows], old_logp=old[rows], ref_logp=ref[rows], mask=mask[rows],
                          rewards=(terms @ torch.tensor([1.0, 0.5]))[rows], group_size=K, values=values[rows],
                          old_values=values[rows], reward_terms=terms[rows], reward_weights=torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("build", [
    lambda: GRPO(k=4, scale_rewards="batch"),
    lambda: GRPO(k=4, multi_objective_aggregation="normalize_then_sum"),                 # GDPO's sum over the rollout
    lambda: PPO(target_kl=0.25, kl_horizon=10),     # whitening; adaptive KL (first rollout's mean KL 0.26 / 0.29 /
                                                     # 0.275 for the halves / all: inside the controller's clamp)
    lambda: P3O(k=4, scale_q=True),                                                      # the rewards' running std
    lambda: RLOO(k=4, normalize_advantages=True),
    lambda: P3O(k=4, normalize_terms=True),                                    # each term's pair-difference rms
], ids=["grpo batch std", "gdpo", "ppo whiten and target_kl", "p3o scale_q", "rloo normalize_advantages",
        "p3o normalize_terms"])
def test_rollout_statistics_are_every_process_rows(build):
    """Two processes (threads summing through `in_threads`), each with 2 of the rollout's 4 groups, two rollouts:
    with `sum_over_ranks` the statistics an objective takes of the whole rollout (GRPO's batch std, GDPO's
    normalisation of the summed terms, PPO's whitening and its adaptive KL's mean, P3O's running reward std) are
    every process's, so each process's advantages and buffers equal one process's on all rows (1e-6). Without it
    they are each process's own (the same rollouts differ by more than 1e-2: the halves' rewards differ in spread)."""
    from tests.helpers import in_threads

    whole, alone = build(), build()

    def prepared(objective, rows, sum_over):
        extras = []
        for seed in (0, 1):
            batch = rollout_input(rows, seed)
            batch.sum_over_ranks = sum_over
            extras.append(objective.prepare(batch))
        return extras, {name: b.clone() for name, b in objective.named_buffers()}

    expected, expected_buffers = prepared(whole, slice(None), None)

    def rank(r, sum_over):
        return prepared(build(), slice(8 * r, 8 * r + 8), sum_over)

    ranks = in_threads(rank)
    own = prepared(alone, slice(8, 16), None)                 # the second half, alone
    for _, buffers in ranks:
        for name, value in buffers.items():
            assert torch.allclose(value, expected_buffers[name], rtol=1e-6, atol=0), (name, value)
    for seed in (0, 1):
        for key, value in expected[seed].items():
            split = torch.cat([ranks[0][0][seed][key], ranks[1][0][seed][key]])
            assert torch.allclose(split, value, atol=1e-6), (key, (split - value).abs().max())
    gap = max([(own[0][s][k] - expected[s][k][8:]).abs().max().item() for s in (0, 1) for k in expected[s]] +
              [((own[1][n] - b).abs() / b.abs()).max().item() for n, b in expected_buffers.items()])
    assert gap > 1e-2
