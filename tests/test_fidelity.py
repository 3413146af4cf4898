"""Each objective against its reference implementation, item by item, on literal tensors.

The expected numbers are worked out in each docstring. Sequences have one token unless a mask says otherwise,
so a sequence logprob equals its token logprob.
"""
import math

import pytest
import torch
import torch.nn.functional as TF

from modules import functional as F
from modules.batch import ObjectiveInput
from modules.objectives.dpo import OnlineDPO
from modules.objectives.grpo import GRPO, group_normalized_advantages
from modules.objectives.p3o import P3O, group_pairs
from modules.objectives.ppo import PPO, gae
from modules.objectives.rloo import RLOO

E21 = math.exp(21.0)


def make_input(logp, old, ref, rewards, group_size=2, mask=None, **fields):
    col = lambda x: torch.tensor(x, dtype=torch.float32).view(len(rewards), -1)  # noqa: E731
    logp = col(logp).requires_grad_(True)
    return ObjectiveInput(logp=logp, old_logp=col(old), ref_logp=col(ref),
                          mask=torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=torch.float32),
                          rewards=torch.tensor(rewards, dtype=torch.float32), group_size=group_size, **fields)


def grad(objective, batch):
    batch.logp.grad = None
    batch.extra = objective.prepare(batch)
    out = objective(batch)
    out.loss.backward()
    return out.loss.detach(), batch.logp.grad.clone()


# 1. A clamp of the log-ratio must not zero the gradient of the active branch.

def test_clipped_surrogate_keeps_the_gradient_of_a_huge_ratio_with_negative_advantage():
    """log rho = 21, A = -1: min(-e^21, -1.2) = -e^21 is active, d/d(log rho) = -e^21 = -1.3188e9.
    dual_clip c = 3 bounds it by c * A = -3 (gradient 0); at rho = 2 < c the surrogate is min(-2, -1.2) = -2 and
    the gradient -2. A positive advantage is never dual-clipped: min(e^21, 1.2) = 1.2 (clipped, gradient 0)."""
    log_ratio = torch.tensor([21.0, math.log(2.0), 21.0], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0])
    F.clipped_surrogate(log_ratio, adv, 0.2).sum().backward()
    assert torch.allclose(log_ratio.grad, torch.tensor([-E21, -2.0, 0.0]), rtol=1e-6)
    log_ratio.grad = None
    out = F.clipped_surrogate(log_ratio, adv, 0.2, dual_clip=3.0)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([-3.0, -2.0, 1.2]))
    assert torch.allclose(log_ratio.grad, torch.tensor([0.0, -2.0, 0.0]))


def test_p3o_v1_gradient_at_log_ratio_21_with_negative_delta():
    """Pair r = (0, 1), beta = 0, so Delta = -1; log rho = (21, 0). c2 = 1, c1 = clamp(e^21, 0.1, 10) = 10.
    term1 = min(-e^21, -1.2) = -e^21 -> dJ/dlogp1 = 1/2 * -e^21; term2 = min(10 rho2, 10 clip(rho2)) -> dJ/dlogp2
    = 1/2 * 10 = 5. loss = -J (one pair): gradients (e^21 / 2, -5) = (6.594e8, -5): the authors' formula."""
    _, g = grad(P3O(variant="v1", kl_coef=0.0), make_input([21.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    assert torch.allclose(g.view(-1), torch.tensor([E21 / 2, -5.0]), rtol=1e-6)


def test_rloo_grpo_and_ppo_gradients_at_log_ratio_21_with_negative_advantage():
    """RLOO k = 2, r = (0, 1), beta = 0: A = (-1, 1); loss = -mean(surrogates): gradients (e^21 / 2, -1/2).
    GRPO k = 2: A = (-0.5, 0.5) / (std 0.70711 + 1e-4) = (-0.707007, 0.707007); 'grpo' aggregation averages two
    one-token sequences: gradient of row 0 = 0.707007 * e^21 / 2 = 4.6620e8 (ref = logp so the k3 term is 0).
    PPO, one token, advantage -1 given: pg = -min(-e^21, -1.2) = e^21, gradient e^21 = 1.3188e9."""
    _, g = grad(RLOO(k=2, kl_coef=0.0), make_input([21.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    assert torch.allclose(g.view(-1), torch.tensor([E21 / 2, -0.5]), rtol=1e-6)
    _, g = grad(GRPO(k=2, kl_coef=0.0), make_input([21.0, 0.0], [0.0, 0.0], [21.0, 0.0], [0.0, 1.0]))
    assert torch.allclose(g[0, 0], torch.tensor(0.5 / (math.sqrt(0.5) + 1e-4) * E21 / 2), rtol=1e-6)
    ppo = PPO(vf_coef=0.0)
    batch = make_input([21.0], [0.0], [0.0], [0.0], group_size=1, values=torch.zeros(1, 1),
                       old_values=torch.zeros(1, 1), extra={"advantages": torch.tensor([[-1.0]]),
                                                            "returns": torch.zeros(1, 1)})
    ppo(batch).loss.backward()
    assert torch.allclose(batch.logp.grad, torch.tensor([[E21]]), rtol=1e-6)


# 2. scale_q: clipped rewards divided by a running, Bessel-corrected std, before the KL term.

@pytest.mark.parametrize("reward_clip, sigma, deltas", [
    (None, math.sqrt(8 / 3), (2 / math.sqrt(8 / 3) - 0.1, 2 / math.sqrt(8 / 3))),
    (2.5, math.sqrt(6.1875 / 3), (1.5 / math.sqrt(6.1875 / 3) - 0.1, 2 / math.sqrt(6.1875 / 3))),
])
def test_scale_q_is_the_authors_option(reward_clip, sigma, deltas):
    """r = (3, 1, 1, -1), beta = 0.5, logp - ref = (0.4, 0.2, 0, 0), ratios 1 (V2, in the band).
    No clip: mean 1, squared deviations 4 + 0 + 0 + 4 = 8, sigma = sqrt(8/3) = 1.63299 (Bessel);
    Delta0 = (3 - 1)/sigma - 0.5 (0.4 - 0.2) = 1.22474 - 0.1 = 1.12474, Delta1 = 2/sigma = 1.22474.
    Clip at 2.5: r = (2.5, 1, 1, -1), mean 0.875, squared deviations 6.1875, sigma = sqrt(6.1875/3) = 1.43614;
    Delta0 = 1.5/sigma - 0.1 = 0.94447, Delta1 = 2/sigma = 1.39262. In the band -grad = 1/2 Delta (+1, -1) / 2 pairs.
    (Dividing the whole Delta by the population std, as before, gives Delta0 = 1.9/1.41421 = 1.34350.)"""
    objective = P3O(variant="v2", kl_coef=0.5, scale_q=True, reward_clip=reward_clip)
    logp = [-1.0, -2.0, -1.5, -0.5]
    _, g = grad(objective, make_input(logp, logp, [-1.4, -2.2, -1.5, -0.5], [3.0, 1.0, 1.0, -1.0]))
    assert objective.reward_stats.unbiased_std.item() == pytest.approx(sigma, rel=1e-6)
    d0, d1 = deltas
    assert torch.allclose(-g.view(-1), torch.tensor([d0, -d0, d1, -d1]) / 4, atol=1e-6)


# 3. Soft-label online DPO on ties follows the authors: p = 1/2 pulls the implicit margin towards 0.

def test_soft_label_dpo_pulls_a_tie_towards_zero_margin():
    """r1 = r2 = 1 -> p = 1/2; h = logp - ref = (0.5, -0.5), beta = 0.5 -> x = beta (h1 - h2) = 0.5.
    loss = -[1/2 log s(0.5) + 1/2 log s(-0.5)] = 1/2 (0.474077 + 0.974077) = 0.724077.
    dloss/dx = s(x) - p = 0.622459 - 0.5 = 0.122459; dx/dlogp = (0.5, -0.5) -> grad (0.061230, -0.061230).
    (Masking ties, as before, gave log 2 and no gradient.)"""
    loss, g = grad(OnlineDPO(beta=0.5, soft_labels=True), make_input([-1.0, -2.0], [0.0, 0.0], [-1.5, -1.5], [1.0, 1.0]))
    assert loss.item() == pytest.approx(0.724077, abs=1e-6)
    assert torch.allclose(g.view(-1), torch.tensor([0.0612296, -0.0612296]), atol=1e-6)


# 4. RLOO shapes the reward with the rollout's KL (old - ref), fixed across epochs.

def test_rloo_kl_shaping_uses_the_rollout_logprobs():
    """r = (1, 0), beta = 0.5, old - ref = (0.4, 0), current logp - old = (0.1, -0.1) (inside the clip).
    Reference: r_hat = (0.8, 0), A = (0.8, -0.8); loss = -mean(A rho) -> grad = -A rho / 2 =
    (-0.8 e^0.1 / 2, 0.8 e^-0.1 / 2) = (-0.442068, 0.361935).
    kl_on_current_policy: logp - ref = (0.5, -0.1), r_hat = (0.75, 0.05), A = (0.7, -0.7) -> (-0.386810, 0.316693)."""
    args = ([-0.9, -2.1], [-1.0, -2.0], [-1.4, -2.0], [1.0, 0.0])
    _, g = grad(RLOO(k=2, kl_coef=0.5), make_input(*args))
    assert torch.allclose(g.view(-1), torch.tensor([-0.442068, 0.361935]), atol=1e-6)
    _, g = grad(RLOO(k=2, kl_coef=0.5, kl_on_current_policy=True), make_input(*args))
    assert torch.allclose(g.view(-1), torch.tensor([-0.386810, 0.316693]), atol=1e-6)


# 5. GRPO: TRL's loss_type and scale_rewards.

def grpo_batch(**fields):
    """k = 2, r = (1, 0), ratios 1, ref = logp; lengths 2 and 3 tokens (5 in all), 3 columns."""
    zeros = [[0.0] * 3] * 2
    return make_input(zeros, zeros, zeros, [1.0, 0.0], mask=[[1, 1, 0], [1, 1, 1]], **fields)


@pytest.mark.parametrize("loss_type, fields, loss, g0, g1", [
    # A = +-0.5 / (0.707107 + 1e-4) = +-0.707007; per-token loss -A: row 0 -0.707007 (2 tokens), row 1 +0.707007 (3)
    ("grpo", {}, 0.0, -0.707007 / 4, 0.707007 / 6),                              # mean of sequence means
    ("bnpo", {}, 0.707007 / 5, -0.707007 / 5, 0.707007 / 5),                     # sum / 5 tokens
    ("dr_grpo", {"max_new_tokens": 4}, 0.707007 / 8, -0.707007 / 8, 0.707007 / 8),  # sum / (2 rows x 4)
    ("dapo", {"tokens_per_rank": 10.0}, 0.707007 / 10, -0.707007 / 10, 0.707007 / 10),  # sum / global tokens
    ("dapo", {}, 0.707007 / 5, -0.707007 / 5, 0.707007 / 5),                     # one process: = bnpo
])
def test_grpo_loss_types(loss_type, fields, loss, g0, g1):
    value, g = grad(GRPO(k=2, kl_coef=0.0, loss_type=loss_type), grpo_batch(**fields))
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert torch.allclose(g, torch.tensor([[g0, g0, 0.0], [g1, g1, g1]]), atol=1e-6)


def test_grpo_scale_rewards():
    """r = (1, 0 | 3, 3). group: (+-0.5 / (0.707107 + 1e-4), 0 / (0 + 1e-4)) = (0.707007, -0.707007, 0, 0);
    batch: std of all four (mean 1.75, squared deviations 6.75, /3 = 2.25) = 1.5 -> (0.5, -0.5, 0, 0) / 1.5001;
    none: (0.5, -0.5, 0, 0)."""
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    assert torch.allclose(group_normalized_advantages(r, 2, "group"), torch.tensor([0.707007, -0.707007, 0, 0]), atol=1e-6)
    assert torch.allclose(group_normalized_advantages(r, 2, "batch"), torch.tensor([0.5, -0.5, 0, 0]) / 1.5001, atol=1e-6)
    assert torch.allclose(group_normalized_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0, 0]))
    with pytest.raises(ValueError, match="loss_type"):
        GRPO(loss_type="sum")
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPO(scale_rewards="global")


def test_gspo_clips_one_length_normalised_ratio_per_response():
    """k = 2, r = (1, 0): A = (+0.707007, -0.707007); both responses have token log-ratios (0.1, 0.3), so each has
    one ratio exp(0.2) = 1.221403 > 1 + 0.2. Response 0 (A > 0) is clipped: per-token loss -1.2 A = -0.848408,
    gradient 0. Response 1 (A < 0) is not: per-token loss 1.221403 * 0.707007 = 0.863539, and with 'grpo'
    aggregation (half of its token mean) each token's gradient is 1/2 * 1/2 * 0.863539 = 0.215885 (the ratio's
    derivative through the mean of 2 tokens). Loss (-0.848408 + 0.863539) / 2 = 0.007566. At token level the same
    tokens clip differently: (0.1, 0.3) -> ratios 1.105 (inside) and 1.350 (outside)."""
    batch = make_input([[0.1, 0.3], [0.1, 0.3]], [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2, [1.0, 0.0])
    value, g = grad(GRPO(k=2, kl_coef=0.0, importance_sampling_level="sequence"), batch)
    assert value.item() == pytest.approx(0.007566, abs=1e-6)
    assert torch.allclose(g, torch.tensor([[0.0, 0.0], [0.215885, 0.215885]]), atol=1e-6)
    with pytest.raises(ValueError, match="importance_sampling_level must be 'token' or 'sequence'"):
        GRPO(importance_sampling_level="group")


def test_p3o_kl_in_loss_leaves_the_reward_difference_and_adds_the_sequence_k3():
    """Pair r = (1, 0), one token each, logp = old = 0, ref = (-0.5, 0.5), beta 0.5. The paper's P3O shapes the
    difference: Delta = (1 - 0.5 * 0.5) - (0 - 0.5 * -0.5) = 0.5, gradients (-0.25, 0.25). With kl_in_loss, Delta = 1
    (gradients (-0.5, 0.5) from the pair) plus beta * mean_n k3_n, whose gradient is beta / 2 * (1 - e^(ref - logp)):
    (0.098367, -0.162180). So (-0.401633, 0.337820); loss 0 + 0.5 * (0.106531 + 0.148721) / 2 = 0.063813."""
    args = ([0.0, 0.0], [0.0, 0.0], [-0.5, 0.5], [1.0, 0.0])
    _, g = grad(P3O(kl_coef=0.5), make_input(*args))
    assert torch.allclose(g.view(-1), torch.tensor([-0.25, 0.25]), atol=1e-6)
    value, g = grad(P3O(kl_coef=0.5, kl_in_loss=True), make_input(*args))
    assert value.item() == pytest.approx(0.063813, abs=1e-6)
    assert torch.allclose(g.view(-1), torch.tensor([-0.401633, 0.337820]), atol=1e-6)


def test_grpo_kl_in_reward_shapes_the_rewards_and_drops_the_kl_loss():
    """k = 2, r = (1, 0), logp = old = 0, ref = (-0.5, 0.5): the rollout's KL old - ref = (0.5, -0.5); beta 0.5 ->
    shaped rewards (1 - 0.25, 0 + 0.25) = (0.75, 0.25), centred +-0.25, group std 0.353553 -> A = +-0.25 / 0.353653
    = +-0.706907. At ratio 1 the gradient is -A / 2 per row: (-0.353453, 0.353453), with no k3 KL term (in the loss
    it would add beta (1 - e^(ref - logp)) / 2 = 0.098367 to row 0's). Loss: the mean of -A = 0."""
    batch = make_input([0.0, 0.0], [0.0, 0.0], [-0.5, 0.5], [1.0, 0.0])
    value, g = grad(GRPO(k=2, kl_coef=0.5, kl_in_reward=True), batch)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(g.view(-1), torch.tensor([-0.353453, 0.353453]), atol=1e-6)
    _, in_loss = grad(GRPO(k=2, kl_coef=0.5), make_input([0.0, 0.0], [0.0, 0.0], [-0.5, 0.5], [1.0, 0.0]))
    assert in_loss.view(-1)[0].item() == pytest.approx(-0.707007 / 2 + 0.5 * (1 - math.exp(-0.5)) / 2, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_gspo_equals_trls_sequence_level_formula(loss_type):
    """TRL 1.16's `_compute_loss` with `importance_sampling_level='sequence'`, written out: the mean masked log-ratio
    per sequence (B, 1), coef_2 = clamp(coef_1, 1 - eps, 1 + eps), -min(coef_1 A, coef_2 A) + beta * k3 KL per
    token, aggregated by `loss_type`. Random tensors, ragged masks: the same loss and gradient."""
    torch.manual_seed(0)
    logp, old, ref = (torch.randn(4, 5) * 0.3 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist())
    value, g = grad(GRPO(k=2, kl_coef=0.04, loss_type=loss_type, importance_sampling_level="sequence"), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    log_w = ((theirs - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss = trl_grpo_loss(torch.exp(log_w.unsqueeze(-1)), adv, theirs, ref, mask, loss_type, 0.2, 0.2)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6)


def ragged_case(seed: int, spread: float, centre: float = 0.5):
    """Two groups of 2 responses of up to 5 tokens, ragged masks (3, 5, 1, 4 tokens), rewards [1, 0, 0.5, 2]: logp and
    ref ~ 0.3 N(0, 1), old = logp - (U(0, 1) - centre) * spread, so the log-ratios reach +-spread / 2 (the draws in
    that order, from `seed`)."""
    torch.manual_seed(seed)
    logp, ref = torch.randn(4, 5) * 0.3, torch.randn(4, 5) * 0.3
    old = logp - (torch.rand(4, 5) - centre) * spread
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    return logp, old, ref, mask, torch.tensor([1.0, 0.0, 0.5, 2.0])


def trl_grpo_loss(coef_1, adv, logp, ref, mask, loss_type: str, eps_low: float, eps_high: float, beta: float = 0.04,
                  use_bias_correction_kl: bool = False, delta: float | None = None, entropy_mask=None, is_ratio=None):
    """TRL 1.16's `_compute_loss` from the ratios on: coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high),
    -min(coef_1 A, coef_2 A) + beta k3 per token (k3 times coef_1 with `use_bias_correction_kl`, TRL's default; ours
    is `kl_bias_correction`, off by default), then 'grpo' (the mean over sequences of each one's token mean) or the
    token mean of the batch ('bnpo', and 'dapo' on one process). `entropy_mask` (`top_entropy_quantile`) and
    `is_ratio` (the vLLM correction) multiply the policy term, in TRL's order."""
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    if use_bias_correction_kl:
        kl = kl * coef_1
    if delta is not None:                                   # INTELLECT-2's two-sided clipping (TRL's `delta`)
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if entropy_mask is not None:                            # (TRL's `top_entropy_quantile`)
        per_token = per_token * entropy_mask
    if is_ratio is not None:                                # (TRL's `importance_sampling_ratio`: vLLM's correction)
        per_token = per_token * is_ratio
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_clip_higher_equals_trls_epsilon_high(loss_type):
    """TRL 1.16's `_compute_loss` with `epsilon=0.2, epsilon_high=0.28` (DAPO's clip-higher), written out: coef_2 =
    clamp(coef_1, 1 - eps_low, 1 + eps_high) per token, -min(coef_1 A, coef_2 A) + beta k3, aggregated by
    `loss_type` (dapo: over the batch's tokens). Log-ratios up to +-0.4, so both bounds bind somewhere: the same loss
    and gradient, and a different one from the symmetric clip."""
    logp, old, ref, mask, rewards = ragged_case(1, spread=0.8)
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist(),
                       tokens_per_rank=float(mask.sum()))
    value, g = grad(GRPO(k=2, kl_coef=0.04, loss_type=loss_type, clip_eps_high=0.28), batch)
    _, symmetric = grad(GRPO(k=2, kl_coef=0.04, loss_type=loss_type), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    loss = trl_grpo_loss(torch.exp(theirs - old), adv, theirs, ref, mask, loss_type, 0.2, 0.28)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6) and not torch.allclose(g, symmetric, atol=1e-4)


def trl_loss_types(logp, old, ref, adv, mask, loss_type: str, level: str, is_ratio=None, beta: float = 0.04,
                   eps: float = 0.2, eps_high: float = 5.0, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0),
                   entropy_mask=None):
    """TRL 1.16's `GRPOTrainer._compute_loss` and `get_gamma_weights` for 'cispo', 'sapo', 'luspo' and 'vespo',
    written out line by line on one process without accumulation (so 'cispo' and 'vespo' normalise by the batch's
    tokens). `eps_high` is TRL's `epsilon_high`, which 'cispo' takes as its bound; `is_ratio` TRL's
    `importance_sampling_ratio` (the vLLM correction)."""
    log_ratio = logp - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * logp
    elif loss_type == "luspo":
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, sapo[0], sapo[1])
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    else:                                                       # vespo: get_gamma_weights, under no_grad
        with torch.no_grad():
            lower = math.log(1e-8)
            seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
            if is_ratio is not None:
                seq_log_ratio += torch.sum(torch.clamp(torch.log(is_ratio), lower, 20.0), dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq_log_ratio, lower, 20.0)
            k_seq = torch.where(adv >= 0, vespo[0], vespo[2])
            lambda_seq = torch.where(adv >= 0, vespo[1], vespo[3]).clamp(min=1e-4)
            phi_seq = torch.exp(lambda_seq + k_seq * log_w_seq - lambda_seq * torch.exp(log_w_seq)).nan_to_num(
                nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * adv * logp
    if entropy_mask is not None:                                # (TRL's `top_entropy_quantile`)
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "sapo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


LOSS_TYPE_CASES = [("cispo", "token"), ("cispo", "sequence"), ("sapo", "token"), ("sapo", "sequence"),
                   ("luspo", "sequence"), ("luspo", "token"), ("vespo", "token")]


@pytest.mark.parametrize("correction", [False, True], ids=["plain", "mismatch"])
@pytest.mark.parametrize("loss_type, level", LOSS_TYPE_CASES, ids=[f"{t}-{lv}" for t, lv in LOSS_TYPE_CASES])
def test_cispo_sapo_luspo_vespo_equal_trls(loss_type, level, correction):
    """GRPO's `loss_type` cispo, sapo, luspo and vespo against TRL 1.16's code written out (`trl_loss_types`):
    log-ratios up to +-1.5, so CISPO's bound (here 1.5, not TRL's 5.0, to bind) and the gates act somewhere; ragged
    masks, both importance-sampling levels, and a vLLM mismatch correction (TRL's `importance_sampling_ratio`, which
    multiplies every loss type's term but VESPO's, whose sequence weight it enters): the same loss and gradient."""
    logp, old, ref, mask, rewards = ragged_case(2, spread=3.0)
    weights = (torch.rand(4, 5) + 0.5) * mask if correction else None
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist(),
                       tokens_per_rank=float(mask.sum()), sampler_weights=weights)
    value, g = grad(GRPO(k=2, kl_coef=0.04, loss_type=loss_type, importance_sampling_level=level, cispo_max=1.5), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    is_ratio = None if weights is None else torch.where(mask.bool(), weights, 1.0)    # (TRL's: 1 on padding)
    loss = trl_loss_types(theirs, old, ref, adv, mask, loss_type, level, is_ratio, eps_high=1.5)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6)


FORK_CASES = [("grpo", "token"), ("dapo", "token"), ("cispo", "token"), ("sapo", "sequence"), ("luspo", "sequence"),
              ("vespo", "token")]


@pytest.mark.parametrize("loss_type, level", FORK_CASES, ids=[f"{t}-{lv}" for t, lv in FORK_CASES])
def test_forking_tokens_equal_trls_top_entropy_quantile(loss_type, level):
    """TRL 1.16's `top_entropy_quantile`: its `entropy_mask` multiplies each token's policy term (after the
    off-policy mask, before the vLLM weights and the KL term), here with a mismatch correction too: GRPO given the
    same mask as `forks` has the same loss and gradient for every loss type, and a different one without it."""
    logp, old, ref, mask, rewards = ragged_case(3, spread=1.0)
    torch.manual_seed(3)
    forks = (torch.rand(4, 5) > 0.5) & mask.bool()
    weights = (torch.rand(4, 5) + 0.5) * mask
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist(),
                       tokens_per_rank=float(mask.sum()), sampler_weights=weights, forks=forks)
    objective = GRPO(k=2, kl_coef=0.04, loss_type=loss_type, importance_sampling_level=level, cispo_max=1.5)
    value, g = grad(objective, batch)
    batch.forks = None
    _, unmasked = grad(objective, batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    is_ratio = torch.where(mask.bool(), weights, 1.0)
    if loss_type in ("grpo", "dapo"):
        loss = trl_grpo_loss(torch.exp(theirs - old), adv, theirs, ref, mask, loss_type, 0.2, 0.2,
                             entropy_mask=forks.float(), is_ratio=is_ratio)
    else:
        loss = trl_loss_types(theirs, old, ref, adv, mask, loss_type, level, is_ratio, eps_high=1.5,
                              entropy_mask=forks.float())
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6) and not torch.allclose(g, unmasked, atol=1e-4)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_kl_bias_correction_equals_trls_default(level):
    """TRL 1.16's default `use_bias_correction_kl=True`, written out (`trl_grpo_loss`): the k3 term times the
    differentiable ratio coef_1, at either importance-sampling level. Ours with `kl_bias_correction` gives the same
    loss and gradient; without it, a different gradient (beta 0.5, so the KL term weighs)."""
    logp, old, ref, mask, rewards = ragged_case(3, spread=0.8)
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist())
    value, g = grad(GRPO(k=2, kl_coef=0.5, importance_sampling_level=level, kl_bias_correction=True), batch)
    _, plain = grad(GRPO(k=2, kl_coef=0.5, importance_sampling_level=level), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    log_w = theirs - old if level == "token" else (((theirs - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    loss = trl_grpo_loss(torch.exp(log_w), adv, theirs, ref, mask, "grpo", 0.2, 0.2, 0.5, use_bias_correction_kl=True)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6) and not torch.allclose(g, plain, atol=1e-3)


def test_kl_bias_correction_at_ratio_one_is_the_log_ratios_gradient():
    """The module docstring: at rho = 1, d(rho k3)/d logp = k3 + (1 - e^(ref - logp)) = logp - ref. One token,
    logp = old = 0, ref = -0.5, A = 0 (equal rewards), beta 1: gradient 0.5 with the correction, 1 - e^-0.5 =
    0.393469 (k3's own) without; the group's other token (ref 0) gives 0 either way."""
    for correction, expected in [(True, 0.5), (False, 1 - math.exp(-0.5))]:
        batch = make_input([0.0, 0.0], [0.0, 0.0], [-0.5, 0.0], [1.0, 1.0])
        _, g = grad(GRPO(k=2, kl_coef=1.0, kl_bias_correction=correction), batch)
        assert g.view(-1).tolist() == pytest.approx([expected / 2, 0.0], abs=1e-6)      # (the mean over 2 rows)
    with pytest.raises(ValueError, match=r"GRPO: kl_bias_correction weights the KL term of the loss, which kl_in_reward"):
        GRPO(kl_bias_correction=True, kl_in_reward=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_dual_clip_equals_trls_delta(loss_type):
    """TRL 1.16's `delta` (INTELLECT-2's two-sided clipping: coef_1 clamped at delta before -min(coef_1 A, coef_2 A))
    is Ye et al.'s dual clip: for A < 0 both give max(min(rho, c), clip(rho)) A, for A > 0 neither acts (c > 1 + eps).
    Log-ratios up to +-1.5 (ratios past c = 2 on both signs of A): the same loss and gradient as ours with
    `dual_clip: 2`, and a different one from no dual clip."""
    logp, old, ref, mask, rewards = ragged_case(4, spread=3.0)
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist(),
                       tokens_per_rank=float(mask.sum()))
    value, g = grad(GRPO(k=2, loss_type=loss_type, dual_clip=2.0), batch)
    _, plain = grad(GRPO(k=2, loss_type=loss_type), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    loss = trl_grpo_loss(torch.exp(theirs - old), adv, theirs, ref, mask, loss_type, 0.2, 0.2, delta=2.0)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6) and not torch.allclose(g, plain, atol=1e-4)


@pytest.mark.parametrize("engine", [False, True], ids=["old", "sampler"])
def test_grpo_off_policy_mask_equals_trls(engine):
    """TRL 1.16's `get_off_policy_mask` and its use in `_compute_loss`, written out: the mean over each response's
    tokens of sampling_logp - logp (the sampler's logprobs with vLLM, else pi_old's), kept where A >= 0 or that mean
    <= the threshold, the per-token policy loss times the keep mask before the mismatch weight and the KL. Gaps up to
    +-1.5, threshold 0.1, so some responses with A < 0 drop: the same loss and gradient, and not those without it."""
    logp, old, ref, mask, rewards = ragged_case(5, spread=-1.5, centre=0.3)
    sampler = old + (torch.rand(4, 5) - 0.5) * 0.4 if engine else None
    weights = torch.exp(old - sampler).clamp(max=3.0) * mask if engine else None
    batch = make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist(),
                       tokens_per_rank=float(mask.sum()), sampler_logp=sampler, sampler_weights=weights)
    value, g = grad(GRPO(k=2, loss_type="dapo", off_policy_mask=0.1), batch)
    _, plain = grad(GRPO(k=2, loss_type="dapo"), batch)

    theirs = logp.clone().requires_grad_(True)
    adv = group_normalized_advantages(rewards, 2)[:, None]
    sampling = old if sampler is None else sampler
    kl_div = torch.nan_to_num(sampling - theirs.detach(), nan=0.0)
    avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    off_policy_mask = ((adv >= 0) | (avg_seq_kl <= 0.1)).to(mask.dtype)
    assert 0 < off_policy_mask.sum() < 4
    coef_1 = torch.exp(theirs - old)
    per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv) * off_policy_mask
    if weights is not None:
        per_token = per_token * torch.where(mask.bool(), weights, 1.0)
    per_token = per_token + 0.04 * (torch.exp(ref - theirs) - (ref - theirs) - 1)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6) and not torch.allclose(g, plain, atol=1e-4)
    with pytest.raises(ValueError, match=r"GRPO: off_policy_mask=-1; expected a threshold >= 0"):
        GRPO(off_policy_mask=-1)


def test_loss_types_without_a_clip_refuse_its_bounds():
    """cispo, sapo and vespo have no PPO clip: clip_eps_high or dual_clip with them is one line (cispo's own bound is
    cispo_max); a bound or temperature <= 0 is refused."""
    for loss_type in ("cispo", "sapo", "vespo"):
        with pytest.raises(ValueError, match=rf"GRPO: clip_eps_high / dual_clip bound PPO's clipped term, which loss_type "
                                             rf"'{loss_type}' does not have"):
            GRPO(loss_type=loss_type, clip_eps_high=0.28)
    with pytest.raises(ValueError, match=r"does not have \(its bound is cispo_max\)"):
        GRPO(loss_type="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match=r"GRPO: sapo_temperature_neg=0; expected > 0"):
        GRPO(loss_type="sapo", sapo_temperature_neg=0)
    GRPO(loss_type="luspo", clip_eps_high=0.28, importance_sampling_level="sequence")     # (luspo clips)


def test_clip_higher_in_rloo_ppo_and_p3o_v1_lets_a_good_response_rise_further():
    """One response with A > 0 at ratio 1.25: clip 0.2 stops it (gradient 0), clip_eps_high 0.28 does not (RLOO:
    -A rho / N; P3O-V1's first response of a pair with Delta = 1, partner at ratio 1: -1/2 Delta rho); P3O-V2 and
    values <= 0 are refused in one line."""
    up = math.log(1.25)
    for high, expected in [(None, 0.0), (0.28, -1.25 / 2)]:
        _, g = grad(RLOO(k=2, kl_coef=0.0, clip_eps_high=high), make_input([up, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
        assert g.view(-1)[0].item() == pytest.approx(expected, abs=1e-6)       # A = 1 - 0 = 1, mean over 2 rows
        _, g = grad(P3O(variant="v1", kl_coef=0.0, clip_eps_high=high),
                    make_input([up, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]))
        assert g.view(-1)[0].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"P3O: clip_eps_high=0.28 with variant v2; v2 clips the pair's relative"):
        P3O(clip_eps_high=0.28)
    for make in (RLOO, GRPO, PPO):
        with pytest.raises(ValueError, match=r"clip_eps_high=0; expected > 0"):
            make(clip_eps_high=0)


# 6. P3O avg_tokenwise: the summed pair loss over response tokens.

def test_p3o_avg_tokenwise():
    """Two pairs, r = (1, 0 | 0, 2), beta = 0, ratios 1: Delta = (1, -2). Response lengths (2, 1 | 1, 1): n = 5.
    Authors: loss = sum_pairs -Delta w L / n -> d/dlogp(y1) = -Delta / n: row 0 -0.2 per token, row 1 0.2,
    row 2 0.4, row 3 -0.4. The paper's per-pair mean: -1/2 Delta / 2 pairs: -0.25, 0.25, 0.5, -0.5."""
    mask = [[1, 1], [1, 0], [1, 0], [1, 0]]
    zeros = [[0.0, 0.0]] * 4
    _, g = grad(P3O(kl_coef=0.0, avg_tokenwise=True), make_input(zeros, zeros, zeros, [1.0, 0.0, 0.0, 2.0], mask=mask))
    assert torch.allclose(g, torch.tensor([[-0.2, -0.2], [0.2, 0], [0.4, 0], [-0.4, 0]]), atol=1e-6)
    _, g = grad(P3O(kl_coef=0.0), make_input(zeros, zeros, zeros, [1.0, 0.0, 0.0, 2.0], mask=mask))
    assert torch.allclose(g, torch.tensor([[-0.25, -0.25], [0.25, 0], [0.5, 0], [-0.5, 0]]), atol=1e-6)


# 7. PPO's score placement (documented, not changed).

def test_ppo_score_at_eos_against_trl_placement():
    """Two response tokens (EOS at t = 1), score 1, V = (0.5, 0.25), gamma = 1, lambda = 0.9, no KL.
    Ours (score at EOS, V = 0 after): delta1 = 1 - 0.25 = 0.75 = A1; delta0 = 0.25 - 0.5 = -0.25,
    A0 = -0.25 + 0.9 * 0.75 = 0.425. TRL (score one position later, V_old = 0.1 kept there): A2 = 0.9,
    A1 = (0.1 - 0.25) + 0.9 * 0.9 = 0.66, A0 = -0.25 + 0.9 * 0.66 = 0.344. With lambda = 1 both give A0 = 0.5."""
    ours, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.9)
    trl, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.1]]), torch.ones(1, 3), 1.0, 0.9)
    assert torch.allclose(ours, torch.tensor([[0.425, 0.75]]))
    assert torch.allclose(trl, torch.tensor([[0.344, 0.66, 0.9]]))
    ours, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    trl, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.1]]), torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ours, trl[:, :2])


# 8. P3O V2 clips logp1 - logp2; the authors clip (logp1 - ref1) - (logp2 - ref2).

def test_p3o_v2_loss_is_the_authors_shifted_by_a_constant():
    """logp = (-1, -2), old = (-1.05, -1.9), ref = (-1.5, -1.0), r = (1, 0), beta = 0: Delta = 1,
    w = exp(0.05 - 0.1) = 0.951229. Ours: L = 1.0, L_old = 0.85 (in band): J = 1/2 w L = 0.475615, loss -0.475615.
    Authors: L' = 0.5 - (-1.0) = 1.5, L'_old = 1.35 (in band): loss -0.713422 = ours + 1/2 Delta w (ref1 - ref2)
    = -0.475615 - 0.237807. The gradients are equal: (-w/2, w/2) = (-0.475615, 0.475615)."""
    batch = make_input([-1.0, -2.0], [-1.05, -1.9], [-1.5, -1.0], [1.0, 0.0])
    loss, g = grad(P3O(variant="v2", kl_coef=0.0), batch)
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    w, rel, rel_old = math.exp(-0.05), (logp[0] + 1.5) - (logp[1] + 1.0), torch.tensor(0.45 + 0.9)
    authors = -0.5 * torch.min(w * rel, w * rel.clamp(rel_old - 0.2, rel_old + 0.2))
    authors.backward()
    assert loss.item() == pytest.approx(-0.475615, abs=1e-6)
    assert authors.item() == pytest.approx(-0.713422, abs=1e-6)
    assert authors.item() - loss.item() == pytest.approx(0.5 * w * (-1.5 + 1.0), abs=1e-6)
    assert torch.allclose(g.view(-1), logp.grad, atol=1e-6)


# P3O with K responses per prompt.

def test_group_pairs_for_k_2_are_the_consecutive_pairs_and_for_k_3_every_pair():
    assert [t.tolist() for t in group_pairs(4, 2)] == [[0, 2], [1, 3]]
    assert [t.tolist() for t in group_pairs(6, 3)] == [[0, 0, 1, 3, 3, 4], [1, 2, 2, 4, 5, 5]]


def random_group_input(k: int, groups: int = 3, seed: int = 0, ratio_one: bool = False, shift=None):
    gen = torch.Generator().manual_seed(seed)
    n = k * groups
    logp = -torch.rand(n, generator=gen) * 3
    old = logp.clone() if ratio_one else logp + 0.3 * torch.randn(n, generator=gen)
    ref = logp - torch.rand(n, generator=gen)
    rewards = torch.randn(n, generator=gen) + (0 if shift is None else shift)
    return make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), group_size=k)


@pytest.mark.parametrize("k", [2, 4])
def test_rloo_reward_clip_range_and_normalize_advantages_equal_trls_code(k):
    """TRL 1.16's RLOOTrainer, its advantages written out (`_generate_and_score_completions`): rewards clamped to
    `reward_clip_range`, minus beta times the sum over the response of (old - ref), leave-one-out baselines, then with
    `normalize_advantages` (A - nanmean) / (nanstd + 1e-4), nanstd with Bessel's correction. Ragged masks, K 2 and 4;
    the loss and gradient are those of the unnormalised option with these advantages."""
    gen = torch.Generator().manual_seed(k)
    n, L, beta, low, high = 4 * k, 5, 0.05, -1.0, 1.5
    old, ref = -torch.rand(n, L, generator=gen) * 2, -torch.rand(n, L, generator=gen) * 2
    mask = (torch.arange(L) < torch.randint(1, L + 1, (n, 1), generator=gen)).float()
    rewards = torch.randn(n, generator=gen) * 2
    # TRL, as written there
    trl_rewards = rewards.clamp(min=low, max=high)
    trl_rewards = trl_rewards - beta * ((old - ref) * mask).sum(-1)
    grouped = trl_rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    advantages = trl_rewards - baselines

    def nanstd(t):
        variance = torch.nanmean((t - torch.nanmean(t, keepdim=True)) ** 2)
        count = torch.sum(~torch.isnan(t))
        return torch.sqrt(variance * count / (count - 1))

    normalized = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    for normalize, expected in ((False, advantages), (True, normalized)):
        ours = RLOO(k=k, kl_coef=beta, reward_clip_range=(low, high), normalize_advantages=normalize)
        batch = ObjectiveInput(logp=old.clone().requires_grad_(True), old_logp=old, ref_logp=ref, mask=mask,
                               rewards=rewards, group_size=k)
        assert torch.allclose(ours.prepare(batch)["advantages"], expected, atol=1e-6), normalize


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    """veRL's `core_algos.kl_penalty` (with `kl_penalty_forward`), written out."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base in ("kl", "k1"):
        forward = logprob - ref_logprob
    elif base in ("mse", "k2"):
        forward = 0.5 * (logprob - ref_logprob).square()
    else:                                                  # "low_var_kl", "k3": veRL clamps both
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


@pytest.mark.parametrize("ours, theirs", [("k1", "k1"), ("k2", "k2"), ("low_var_kl", "low_var_kl"), ("k1+", "k1+"),
                                          ("k3+", "k3+"), ("k3", None)])
def test_kl_estimators_equal_verls(ours, theirs):
    """`functional.kl_penalty` against veRL's `kl_penalty` (its `kl_loss_type` names) on log-ratios from -30 to 30:
    values and gradients within float rounding. Our 'k3' is TRL's, unclamped: equal to veRL's clamped one (which
    veRL also calls k3) where nothing is clamped, |log ratio| <= 2.3 (k3 <= 10 there)."""
    logp = torch.tensor([-30.0, -5.0, -2.0, -0.3, 0.0, 0.7, 2.0, 5.0, 30.0]) - 1.0
    ref = torch.full_like(logp, -1.0)
    if theirs is None:
        logp, ref, theirs = logp[2:7], ref[2:7], "low_var_kl"
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    mine, verl = F.kl_penalty(a, ref, ours), verl_kl_penalty(b, ref, theirs)
    mine.sum().backward()
    verl.sum().backward()
    assert torch.allclose(mine, verl, rtol=1e-6, atol=1e-6) and torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ours, theirs", [("k1", "kl"), ("k2", "mse"), ("low_var_kl", "low_var_kl")])
def test_ppo_token_rewards_equal_verls_kl_in_reward(ours, theirs):
    """PPO's per-token rewards against veRL's `apply_kl_penalty` written out: token_level_scores (the sequence reward
    on the last response token) - beta * kl_penalty(old, ref, algorithm.kl_penalty) * response_mask. Log-ratios up
    to 30 in size, where low_var_kl clamps (k3 would give e^30 there) and a ragged mask."""
    old = torch.tensor([[-31.0, -1.2, -0.5], [-0.1, 29.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0, -0.4], [-0.3, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = make_input(old.tolist(), old.tolist(), ref.tolist(), [2.0, -1.0], group_size=1, mask=mask.tolist())
    scores = torch.zeros_like(old)
    scores[0, 2], scores[1, 1] = 2.0, -1.0
    verl = scores - 0.1 * verl_kl_penalty(old, ref, theirs) * mask
    assert torch.allclose(PPO(kl_coef=0.1, kl_estimator=ours).token_rewards(batch), verl, rtol=1e-6, atol=1e-6)
    if ours == "low_var_kl":
        assert verl.abs().max() < 3 and PPO(kl_coef=0.1, kl_estimator="k3").token_rewards(batch).abs().max() > 1e10


def test_grpo_k3_plus_is_the_bias_corrected_kl_gradient_at_ratio_one():
    """At ratio 1, TRL's bias-corrected k3 (rho k3) and veRL's straight-through k3+ are the same term: value k3,
    gradient (logp - ref) per token. GRPO's loss and gradient are then equal; at ratio != 1 they differ."""
    batch = lambda old: make_input([[-1.0, -2.0], [-0.5, -1.5]], old, [[-1.5, -1.0], [-0.2, -2.5]], [1.0, 0.0])  # noqa: E731
    at_one = [[-1.0, -2.0], [-0.5, -1.5]]
    loss_a, g_a = grad(GRPO(k=2, kl_estimator="k3+"), batch(at_one))
    loss_b, g_b = grad(GRPO(k=2, kl_bias_correction=True), batch(at_one))
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6) and torch.allclose(g_a, g_b, atol=1e-7)
    _, g_c = grad(GRPO(k=2, kl_estimator="k3+"), batch([[-1.2, -2.0], [-0.5, -1.0]]))
    _, g_d = grad(GRPO(k=2, kl_bias_correction=True), batch([[-1.2, -2.0], [-0.5, -1.0]]))
    assert not torch.allclose(g_c, g_d, atol=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_equals_trls_online_trainer_on_decided_pairs(loss_type):
    """TRL 1.16's OnlineDPOTrainer, its loss written out (`training_step`): the first half of the pairs against the
    second, chosen where its score is >= the other's, logits = (chosen - ref) - (rejected - ref) of the masked sums,
    -logsigmoid(beta logits) or (logits - 1 / (2 beta))^2, the mean over pairs. Ours on the same pairs (no tie: TRL
    makes the first response the winner of one, ours leaves it out), as consecutive rows; loss and gradient."""
    gen = torch.Generator().manual_seed(3)
    pairs, L, beta = 6, 4, 0.2
    logp, ref = -torch.rand(2 * pairs, L, generator=gen) * 3, -torch.rand(2 * pairs, L, generator=gen) * 3
    mask = (torch.arange(L) < torch.randint(1, L + 1, (2 * pairs, 1), generator=gen)).float()
    rewards = torch.randn(2 * pairs, generator=gen)
    first, second = torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)   # TRL's halves, our pairs
    theirs = logp.clone().requires_grad_(True)
    sums, ref_sums = (theirs * mask).sum(1), (ref * mask).sum(1)
    chosen_first = rewards[first] >= rewards[second]
    chosen, rejected = torch.where(chosen_first, first, second), torch.where(chosen_first, second, first)
    logits = (sums[chosen] - ref_sums[chosen]) - (sums[rejected] - ref_sums[rejected])
    losses = -TF.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    losses.mean().backward()
    loss, g = grad(OnlineDPO(beta=beta, loss_type=loss_type),
                   make_input(logp.tolist(), logp.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist()))
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert torch.allclose(g, theirs.grad, atol=1e-6)


@pytest.mark.parametrize("k", [3, 4])
def test_p3o_k_equals_rloo_k_at_ratio_one_without_clipping(k):
    """Per group, sum_{i<j} 1/2 (r_i - r_j)(grad_i - grad_j) = K/2 sum_i (r_i - mean) grad_i; over the
    G K(K-1)/2 pairs that is -(1 / (G (K-1))) sum_i (r_i - mean) grad_i, exactly RLOO-K's
    -(1/(G K)) sum_i K/(K-1) (r_i - mean) grad_i: the constant is 1."""
    for variant in ("v1", "v2"):
        _, g_p3o = grad(P3O(variant=variant, k=k, kl_coef=0.05), random_group_input(k, ratio_one=True))
        _, g_rloo = grad(RLOO(k=k, kl_coef=0.05), random_group_input(k, ratio_one=True))
        assert g_p3o.abs().sum() > 0
        assert torch.allclose(g_p3o, g_rloo, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_p3o_k_is_shift_invariant(k, variant):
    shift = (torch.randn(3, generator=torch.Generator().manual_seed(1)) * 100).repeat_interleave(k)
    _, g = grad(P3O(variant=variant, k=k), random_group_input(k))
    _, g_shift = grad(P3O(variant=variant, k=k), random_group_input(k, shift=shift))
    assert g.abs().sum() > 0
    assert torch.allclose(g, g_shift, atol=1e-5)


def test_p3o_v1_without_its_partner_weight_is_rloo_with_the_kl_on_the_current_policy():
    """The twins of benchmarks/results/verifiable: P3O-V1 with `is_cap` 1 (each term's partner weight is 1) and RLOO
    at K = 2 with `kl_on_current_policy` have the same loss and gradient, clipping and KL shaping included: ratios
    up to e^+-0.3 (clipped at 0.2 somewhere), ragged masks, 0 / 1 rewards."""
    torch.manual_seed(0)
    mask = torch.ones(8, 3)
    mask[1, 2], mask[4, 1:] = 0, 0
    old, ref = -torch.rand(8, 3) * mask, -torch.rand(8, 3) * mask
    logp = old + (torch.rand(8, 3) - 0.5) * 0.6 * mask
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    batch = lambda: make_input(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask=mask.tolist())  # noqa: E731
    p3o_loss, p3o_grad = grad(P3O(variant="v1", kl_coef=0.05, is_cap=1.0), batch())
    rloo_loss, rloo_grad = grad(RLOO(k=2, kl_coef=0.05, kl_on_current_policy=True), batch())
    assert p3o_loss.item() == pytest.approx(rloo_loss.item(), abs=1e-7)
    assert torch.allclose(p3o_grad, rloo_grad, atol=1e-7) and p3o_grad.abs().max() > 0
    ratios = ((logp - old) * mask).sum(-1).exp()                 # the sequence ratios both objectives clip
    assert ((ratios - 1).abs() > 0.2).any() and ((ratios - 1).abs() < 0.2).any()


def trl_normalize_then_sum(rewards_per_func, weights, num_generations):
    """TRL 1.16's `_generate_and_score_completions` with `multi_objective_aggregation="normalize_then_sum"`, written
    out on one process (its `nanstd`: Bessel's correction, NaN below 2 values), to the advantages."""
    def nanstd(tensor, dim=None, keepdim=False):
        mean = torch.nanmean(tensor, dim=dim, keepdim=True)
        variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
        correction = torch.where(count > 1, count / (count - 1), torch.full_like(count / 1.0, float("nan")))
        std = torch.sqrt(variance * correction)
        return std if keepdim else std.squeeze() if dim is None else std.squeeze(dim)

    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    std_rewards = nanstd(rewards).expand_as(rewards)
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4), nan=0.0)


def test_gdpo_literal_example():
    """`decoupled_advantages`' docstring: k = 3, group 1 a [1, 0, 0], b tied; group 2 the other way round: each term
    normalised in its group (the tied one 0), summed, normalised over the 6: [1.2910, -0.6455, -0.6455] twice
    (eps 1e-4 moves the 4th decimal), where GRPO's group-normalised sum gives [1.1547, -0.5774, -0.5774]."""
    from modules.objectives.grpo import decoupled_advantages

    terms = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    gdpo = decoupled_advantages(terms, torch.tensor([1.0, 1.0]), 3)
    assert torch.allclose(gdpo, torch.tensor([1.2910, -0.6455, -0.6455] * 2), atol=2e-4)
    summed = group_normalized_advantages(terms.sum(-1), 3)
    assert torch.allclose(summed, torch.tensor([1.1547, -0.5774, -0.5774] * 2), atol=2e-4)


@pytest.mark.parametrize("k", [2, 4])
def test_gdpo_equals_trls_normalize_then_sum(k):
    """GRPO's `multi_objective_aggregation: normalize_then_sum` against TRL 1.16's code written out: three terms of
    different scales and weights, one of them NaN (not applying) on a third of the responses, one group where a term
    ties: the same advantages, and so the same loss and gradient; a different one from summing first."""
    torch.manual_seed(0)
    N = 4 * k
    terms = torch.stack([torch.rand(N), 10 * torch.randn(N), (torch.rand(N) > 0.5).float()], -1)
    terms[::3, 1] = float("nan")
    terms[:k, 2] = 1.0                                                   # (a group where the third term ties)
    weights = torch.tensor([1.0, 0.1, 0.5])
    objective = GRPO(k=k, multi_objective_aggregation="normalize_then_sum")
    rewards = (torch.nan_to_num(terms) * weights).sum(-1)
    batch = make_input(torch.zeros(N).tolist(), torch.zeros(N).tolist(), torch.zeros(N).tolist(), rewards.tolist(),
                       group_size=k, reward_terms=terms, reward_weights=weights)
    ours = objective.prepare(batch)["advantages"]
    assert torch.allclose(ours, trl_normalize_then_sum(terms, weights, k), atol=1e-5)
    assert not torch.allclose(ours, GRPO(k=k).prepare(batch)["advantages"], atol=1e-2)


def test_gdpo_refuses_what_it_would_ignore():
    for kwargs in ({"kl_in_reward": True}, {"scale_rewards": "batch"}):
        with pytest.raises(ValueError, match="takes neither kl_in_reward nor scale_rewards"):
            GRPO(multi_objective_aggregation="normalize_then_sum", **kwargs)
    with pytest.raises(ValueError, match="multi_objective_aggregation='sum'; expected one of"):
        GRPO(multi_objective_aggregation="sum")
    with pytest.raises(ValueError, match="needs the reward's terms"):
        GRPO(k=2, multi_objective_aggregation="normalize_then_sum").prepare(make_input([0, 0], [0, 0], [0, 0], [1, 0]))
