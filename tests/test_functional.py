"""Maths on literal tensors; expected values worked out by hand in each docstring."""
import math

import pytest
import torch

from modules import functional as F


def test_masked_mean_ignores_masked_entries():
    """(1 + 3) / 2 = 2 for the first row; 10 for the second; overall (1 + 3 + 10) / 3."""
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    m = torch.tensor([[1, 0, 1], [1, 0, 0]])
    assert torch.allclose(F.masked_mean(x, m, dim=-1), torch.tensor([2.0, 10.0]))
    assert torch.isclose(F.masked_mean(x, m), torch.tensor(14.0 / 3))


def test_masked_whiten_mean_zero_unit_std_on_mask():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    w = F.masked_whiten(x, m)
    assert torch.allclose(w[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)  # mean 2, sample std 1


def test_moments_and_std_of_every_process_entries():
    """The docstrings' examples: [1, 2, 3, (6 masked)]: count 3, mean 2, variance 2 / 3; split over two processes
    (threads summing with `in_threads`) each gets the same. Mean and std of [1, 2, 3]: 2 and 1, also as [1, 2] + [3];
    [2, -2, 1, -1] standardized. The whitening over both processes' entries equals the whitening of all of them."""
    from tests.helpers import in_threads

    values, mask = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([1, 1, 1, 0])
    assert [round(float(x), 4) for x in F.moments(values, mask)] == [3.0, 2.0, 0.6667]
    halves = in_threads(lambda rank, sum_over: F.moments(values[2 * rank:2 * rank + 2], mask[2 * rank:2 * rank + 2],
                                                          sum_over))
    assert all([round(float(x), 4) for x in half] == [3.0, 2.0, 0.6667] for half in halves)
    assert [float(x) for x in F.mean_std(torch.tensor([1.0, 2.0, 3.0]))] == [2.0, 1.0]
    halves = in_threads(lambda rank, sum_over: F.mean_std(torch.tensor([[1.0, 2.0], [3.0]][rank]), sum_over))
    assert [[float(x) for x in half] for half in halves] == [[2.0, 1.0], [2.0, 1.0]]
    assert torch.allclose(F.standardize(torch.tensor([2.0, -2.0, 1.0, -1.0])),
                          torch.tensor([1.0954, -1.0954, 0.5477, -0.5477]), atol=1e-4)
    x, m = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    whole = F.masked_whiten(x, m)
    split = in_threads(lambda rank, sum_over: F.masked_whiten(x[3 * rank:3 * rank + 3], m[3 * rank:3 * rank + 3],
                                                              sum_over=sum_over))
    assert torch.allclose(torch.cat(split) * m, whole * m, atol=1e-6)


def test_last_token_index_left_right_and_both_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding -> 2
                         [0, 0, 1, 1, 1],    # left padding -> 4
                         [0, 1, 1, 0, 0],    # both -> 2
                         [1, 1, 1, 1, 1]])   # none -> 4
    assert F.last_token_index(mask).tolist() == [2, 4, 2, 4]
    values = torch.arange(20.0).view(4, 5)
    assert F.gather_last(values, mask).tolist() == [2.0, 9.0, 12.0, 19.0]


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert F.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2]]


def test_response_mask_truncates_after_first_eos():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, 9, 7, 9],    # EOS at 2: keep 0..2
                        [5, 6, 7, 8, 4],    # no EOS: keep all
                        [9, 5, 5, 5, 5],    # EOS first
                        [5, 6, 0, 0, 0]])   # no EOS, padded with a distinct pad id
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert F.response_mask(ids, eos, pad).tolist() == expected
    assert F.has_eos(ids, eos).tolist() == [True, False, True, False]


def test_token_logprobs_divide_by_temperature():
    """Uniform logits [0, 0] -> log 1/2 at any temperature; logits [2, 0] at T=2 -> softmax of [1, 0]."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])       # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    got = F.token_logprobs(logits, labels, temperature=2.0)
    expected = torch.tensor([[math.log(0.5), 1.0 - math.log(math.e + 1.0)]])
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(F.sequence_logprobs(got, torch.tensor([[1, 0]])), expected[:, 0])


def test_token_logprobs_value_and_gradient_at_temperature_one():
    """Logits [ln 3, 0], label 0: softmax [3/4, 1/4], so log p = log 3/4, and d log p / d logits = onehot - softmax
    = [1/4, -1/4]."""
    logits = torch.tensor([[[math.log(3.0), 0.0]]], requires_grad=True)
    got = F.token_logprobs(logits, torch.tensor([[0]]))
    got.sum().backward()
    assert torch.allclose(got, torch.tensor([[math.log(0.75)]]), atol=1e-6)
    assert torch.allclose(logits.grad, torch.tensor([[[0.25, -0.25]]]), atol=1e-6)


def test_response_only_nll_masks_prompt_and_padding():
    """Two-token vocabulary. Sequence [p, r1, r2, pad]; loss mask on r1, r2. Position t predicts t+1, so only
    the predictions made at positions 0 and 1 count: -log softmax([0, 0])[1] = log 2 and
    -log softmax([3, 0])[0] = log(1 + e^-3). Position 2 (predicting the pad, logits [100, -100]: log p = -200)
    is ignored."""
    logits = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [100.0, -100.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0, 1]])
    loss_mask = torch.tensor([[0, 1, 1, 0]])
    target_logp = F.token_logprobs(logits[:, :-1], ids[:, 1:])                 # (1, 3)
    expected = (math.log(2.0) + math.log(1.0 + math.exp(-3.0))) / 2
    assert math.isclose(F.response_only_nll(target_logp, loss_mask).item(), expected, rel_tol=1e-5)


def test_linear_token_logprobs_literal_example_in_any_chunking():
    """The docstring's example: hidden = I (2 x 2), weight [[1, 0], [0, 1], [0, 0]], labels [0, 2]: logits
    [[1, 0, 0], [0, 1, 0]], logsumexp log(e + 2) in both rows, logprobs [1 - log(e + 2), -log(e + 2)]."""
    hidden, weight = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    lse = math.log(math.e + 2)
    for chunk in (0, 1, 2):
        got = F.linear_token_logprobs(hidden, weight, None, torch.tensor([0, 2]), chunk=chunk)
        assert torch.allclose(got, torch.tensor([1 - lse, -lse]), atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp32-by-vocab", "bf16-autocast", "bf16-weights"])
def test_chunked_linear_logprobs_equal_the_whole_logits_in_value_and_gradient(precision, monkeypatch):
    """37 rows in chunks of 5 (the last one of 2) against one (37, V) logits tensor, with a bias and T = 0.7:
    logprobs and the gradients of hidden, weight and bias agree within float rounding; in bf16 (autocast or bf16
    weights) the backward recomputes the logits in bf16 as the forward did, by slices of the vocabulary (6 of the
    50 columns a slice: 9 slices); `fp32-by-vocab` runs that path in float32, to 1e-5."""
    from tests.helpers import by_vocabulary

    by_vocabulary(monkeypatch, precision == "fp32-by-vocab")
    torch.manual_seed(0)
    M, H, V = 37, 16, 50
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    leaves = [torch.randn(shape).to(dtype).requires_grad_() for shape in ((M, H), (V, H), (V,))]
    labels, weights = torch.randint(0, V, (M,)), torch.randn(M)
    results = []
    for chunk in (0, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            logp = F.linear_token_logprobs(*leaves, labels, temperature=0.7, chunk=chunk)
        grads = torch.autograd.grad((logp * weights).sum(), leaves)
        results.append((logp, *grads))
    tol = 1e-5 if precision.startswith("fp32") else 2e-2
    for plain, chunked in zip(*results):
        assert plain.dtype == chunked.dtype and torch.allclose(plain, chunked, atol=tol, rtol=tol)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad pass", "training forward"])
def test_a_frozen_head_is_cast_to_bf16_once_per_forward_not_once_per_chunk(grad):
    """Under bf16 autocast autocast caches the bf16 cast of a weight that requires grad, and of no other: a frozen
    head (the reference's, a LoRA policy's) was cast again for each chunk of rows (5 casts of the whole (V, H) head
    for 40 rows in chunks of 8; at 151,936 x 2,048 and 1,024 tokens its no-grad pass took 4.8 s against 2.4 on 2 CPU
    cores). The chunked head casts it once (counted with a dispatch mode; the values are the same)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WholeHeadCasts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape
            return func(*args, **(kwargs or {}))

    M, H, V = 40, 16, 300
    hidden, weight, labels = torch.randn(M, H, requires_grad=grad), torch.randn(V, H), torch.randint(0, V, (M,))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16), WholeHeadCasts((V, H)) as casts:
        chunked = F.linear_token_logprobs(hidden, weight, None, labels, 1.0, 8)
        whole = F.linear_token_logprobs(hidden, weight, None, labels, 1.0, 0)
    assert casts.count == 2 and torch.allclose(chunked, whole, atol=2e-2)        # one per call


def test_bradley_terry_loss_value():
    """r_w - r_l = 0 -> log 2; = 2 -> log(1 + e^-2)."""
    loss = F.bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert math.isclose(loss.item(), (math.log(2.0) + math.log(1 + math.exp(-2.0))) / 2, rel_tol=1e-6)


def test_kl_estimators():
    """log ratio 0.5: k1 = 0.5, k2 = 0.125, k3 = e^-0.5 - 1 + 0.5."""
    logp, ref = torch.tensor([0.0]), torch.tensor([-0.5])
    assert math.isclose(F.kl_penalty(logp, ref, "k1").item(), 0.5)
    assert math.isclose(F.kl_penalty(logp, ref, "k2").item(), 0.125)
    assert math.isclose(F.kl_penalty(logp, ref, "k3").item(), math.exp(-0.5) - 0.5, rel_tol=1e-6)


def test_clip_fraction():
    assert F.clip_fraction(torch.tensor([1.0, 1.3, 0.7, 1.1]), 0.2).item() == 0.5


def test_inverse_cdf_sample_literal():
    """Docstring example: cumulative [0.25, 0.5, 1.0]; zero-probability indices are never returned, even at u = 1."""
    probs = torch.tensor([[0.25, 0.25, 0.5]]).repeat(5, 1)
    assert F.inverse_cdf_sample(probs, torch.tensor([0.1, 0.25, 0.4, 0.5, 0.999])).tolist() == [0, 1, 1, 2, 2]
    sparse = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(3, 1)
    assert F.inverse_cdf_sample(sparse, torch.tensor([0.0, 0.5, 1.0])).tolist() == [1, 3, 3]
    # unnormalised rows (top-k leaves a sum of 1 only up to rounding) scale with their own total
    assert F.inverse_cdf_sample(torch.tensor([[2.0, 6.0]]), torch.tensor([0.24])).tolist() == [0]
    assert F.inverse_cdf_sample(torch.tensor([[2.0, 6.0]]), torch.tensor([0.26])).tolist() == [1]


def test_tied_groups_is_the_share_of_groups_whose_rewards_all_equal():
    """Docstring example: [1, 1, 0, 1, 0, 0], K = 2 -> (1, 1) and (0, 0) tie, (0, 1) does not: 2/3; K = 3 -> (1, 1, 0)
    and (1, 0, 0): none."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert F.tied_groups(rewards, 2).item() == pytest.approx(2 / 3)
    assert F.tied_groups(rewards, 3).item() == 0.0
    assert F.tied_groups(torch.tensor([0.5, 0.5 + 1e-9]), 2).item() == 1.0       # equal within float tolerance


def test_entropy_literal_examples():
    """`F.entropy`'s docstring: log [1/2, 1/4, 1/4] -> 1.5 log 2; a one-hot distribution -> 0 (its -inf entries add
    nothing, where 0 * -inf would be NaN); uniform over 8 -> log 8."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
    assert torch.allclose(F.entropy(logp), torch.tensor([1.5 * math.log(2), 0.0]), atol=1e-6)
    assert torch.allclose(F.entropy(torch.full((8,), -math.log(8))), torch.tensor(math.log(8)), atol=1e-6)


def test_token_logprobs_and_entropy_is_token_logprobs_with_the_entropy_of_the_same_distribution():
    """The docstring's example: logits [0, -log 2, -log 2], label 1 -> (log 1/4, 1.5 log 2); on random logits at
    T = 0.7, the logprobs are `token_logprobs`'s exactly, and the entropy is -sum p log p of softmax(logits / T)."""
    logp, entropy = F.token_logprobs_and_entropy(torch.tensor([0.0, -math.log(2), -math.log(2)]), torch.tensor(1))
    assert torch.allclose(logp, torch.tensor(math.log(0.25)), atol=1e-6)
    assert torch.allclose(entropy, torch.tensor(1.5 * math.log(2)), atol=1e-6)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    logp, entropy = F.token_logprobs_and_entropy(logits, labels, 0.7)
    assert torch.equal(logp, F.token_logprobs(logits, labels, 0.7))
    p = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)


def test_clipped_surrogate_clip_higher_literal_example():
    """The docstring's example: A = 1, rho = 1.25: eps 0.2 gives 1.2 with gradient 0 (clipped), eps_high 0.28 gives
    1.25 with gradient d(rho A)/d(log rho) = 1.25; A = -1, rho = 0.75: -0.8 either way (the lower bound). The clip
    fraction counts ratios outside [1 - eps, 1 + eps_high]."""
    for eps_high, value, gradient in [(None, 1.2, 0.0), (0.28, 1.25, 1.25)]:
        log_ratio = torch.tensor(math.log(1.25), requires_grad=True)
        out = F.clipped_surrogate(log_ratio, torch.tensor(1.0), 0.2, eps_high=eps_high)
        out.backward()
        assert out.item() == pytest.approx(value) and log_ratio.grad.item() == pytest.approx(gradient)
        low = F.clipped_surrogate(torch.tensor(math.log(0.75)), torch.tensor(-1.0), 0.2, eps_high=eps_high)
        assert low.item() == pytest.approx(-0.8)
    ratios = torch.tensor([0.75, 0.9, 1.1, 1.25, 1.3])
    assert F.clip_fraction(ratios, 0.2).item() == pytest.approx(3 / 5)
    assert F.clip_fraction(ratios, 0.2, eps_high=0.28).item() == pytest.approx(2 / 5)


def test_best_of_groups_literal_examples():
    """The docstring's examples: [0, 1, 0, 0, 0, 0, 0, 0] in groups of 4 -> [1, 0]; [0.2, 0.7, -1, 0.1] in 2s ->
    [0.7, 0.1]."""
    assert F.best_of_groups(torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0]), 4).tolist() == [1.0, 0.0]
    assert torch.allclose(F.best_of_groups(torch.tensor([0.2, 0.7, -1.0, 0.1]), 2), torch.tensor([0.7, 0.1]))


def test_cispo_surrogate_literal_examples():
    """The docstring: logp -1, A = 1: rho 2 (under max 5) -> value -2, gradient (in logp) 2, where PPO's clip at 0.2
    gives 0; rho 6 -> the weight 5: value -5, gradient 5. The weight is detached: no gradient through the ratio."""
    for rho, value, gradient in [(2.0, -2.0, 2.0), (6.0, -5.0, 5.0)]:
        logp = torch.tensor([-1.0], requires_grad=True)
        log_ratio = torch.tensor([math.log(rho)], requires_grad=True)
        out = F.cispo_surrogate(logp, log_ratio, torch.tensor([1.0]), 5.0)
        out.backward()
        assert out.item() == pytest.approx(value) and logp.grad.item() == pytest.approx(gradient)
        assert log_ratio.grad is None or log_ratio.grad.item() == 0.0
    ppo = torch.tensor([math.log(2.0)], requires_grad=True)
    F.clipped_surrogate(ppo, torch.tensor([1.0]), 0.2).backward()
    assert ppo.grad.item() == 0.0


def test_sapo_surrogate_literal_examples():
    """The docstring: A = 1, rho = 1 -> 2 with gradient (in log rho) 1, the policy gradient; rho = e^0.5 -> 2.6269,
    gradient 1.4867; A = -1, rho = 1 (tau 1.05) -> -1.9048, gradient -1."""
    for log_rho, adv, value, gradient in [(0.0, 1.0, 2.0, 1.0), (0.5, 1.0, 2.6269, 1.4867), (0.0, -1.0, -1.9048, -1.0)]:
        log_ratio = torch.tensor([log_rho], requires_grad=True)
        out = F.sapo_surrogate(log_ratio, torch.tensor([adv]))
        out.backward()
        assert out.item() == pytest.approx(value, abs=1e-4) and log_ratio.grad.item() == pytest.approx(gradient, abs=1e-4)


def test_vespo_weights_literal_examples():
    """The docstring: a sequence log-ratio log 2 (here two tokens of log 2 / 2; the third is padding, whatever it
    holds): phi = 4 e^-3 for A >= 0 (k 2, lambda 3), 8 e^-2 for A < 0 (k 3, lambda 2); log-ratio 0 -> 1; a mismatch
    correction's log-weights add to the sequence's (log 2 from the ratio, log 1/2 from the correction: w = 1)."""
    half = math.log(2) / 2
    log_ratio, mask = torch.tensor([[half, half, 5.0]] * 3), torch.tensor([[1.0, 1.0, 0.0]] * 3)
    phi = F.vespo_weights(log_ratio, mask, torch.tensor([[1.0], [-1.0], [0.0]]))
    assert phi.view(-1).tolist() == pytest.approx([4 * math.exp(-3), 8 * math.exp(-2), 4 * math.exp(-3)], rel=1e-5)
    assert F.vespo_weights(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0]])).item() == pytest.approx(1.0)
    correction = torch.tensor([[-half, -half, float("-inf")]])       # (log 0 outside the mask)
    assert F.vespo_weights(log_ratio[:1], mask[:1], torch.tensor([[1.0]]), correction).item() == pytest.approx(1.0)


def test_off_policy_keep_literal_examples():
    """The docstring, threshold 0.5: mean gap 0.6 (NaN counting 0 is not reached here) drops a response with A = -1,
    keeps one with A = +1 (and A = 0); mean 0.4 keeps both; a padded third token does not count."""
    logp = torch.zeros(4, 3)
    sampled = torch.tensor([[0.6, 0.6, 9.0], [0.6, 0.6, 9.0], [0.4, 0.4, 9.0], [0.4, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 4)
    adv = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])
    assert F.off_policy_keep(logp, sampled, mask, adv, 0.5).view(-1).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert F.off_policy_keep(logp, sampled, mask, torch.zeros(4, 1), 0.5).view(-1).tolist() == [1.0] * 4
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])                  # an unscored token: no evidence (0)
    assert F.off_policy_keep(torch.zeros(1, 3), nan, mask[:1], torch.tensor([[-1.0]]), 0.5).item() == 1.0
