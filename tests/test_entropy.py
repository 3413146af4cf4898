"""The entropy in the loss: the forking-token mask (`top_entropy_quantile`, Wang et al. 2025 / TRL) and the entropy
bonus (`entropy_coef`): literal examples, the entropy from every logprob path equal to the whole logits', and both
options in an update and a run."""
import math

import pytest
import torch

from modules import functional as F
from modules.backbone import BackboneSpec, build_causal_lm
from modules.batch import ObjectiveInput
from modules.entropy import EntropyControl
from modules.forward import response_logprobs
from tests.helpers import TINY_SHAPE, by_vocabulary, grouped_rows, run_train, tiny_rl_config


def test_high_entropy_mask_literal_example():
    """The docstring's example: pool [0.1, 2.0, 0.5, 1.0, 3.0], top 0.4: threshold 1.4, the tokens at 2.0 and 3.0
    (9.9 lies outside the mask); top 1 keeps every masked token, top 0 the largest alone."""
    entropy = torch.tensor([[0.1, 2.0, 0.5], [1.0, 3.0, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert F.high_entropy_mask(entropy, mask, 0.4).tolist() == [[False, True, False], [False, True, False]]
    assert F.high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()
    assert F.high_entropy_mask(entropy, mask, 0.0).tolist() == [[False, False, False], [False, True, False]]
    assert not F.high_entropy_mask(entropy, torch.zeros_like(mask), 0.4).any()
    pooled = F.high_entropy_mask(entropy, mask, 0.4, pool=torch.tensor([5.0, 6.0]))    # (another process's tokens)
    assert not pooled.any()                                             # (threshold 5.6: above every masked token)


@pytest.mark.slow
def test_quantile_equals_torchs_and_takes_more_values_than_torchs():
    """`F.quantile` (the forking threshold): the docstring's example; equal to `torch.quantile` bit for bit on 2,000
    random pools (1-300 values, ties among them) and q's (0 and 1 among them), and on 2**24 values, torch's
    largest; NaN where a value is NaN, as torch's. One more value, where torch's refuses ("input tensor is too
    large"), is the interpolation between the two order statistics around the rank q (n - 1), taken in float64."""
    assert F.quantile(torch.tensor([3.0, 1.0, 4.0, 2.0]), 0.5).item() == 2.5
    assert F.quantile(torch.tensor([3.0, 1.0, 4.0, 2.0]), 1.0).item() == 4.0
    g = torch.Generator().manual_seed(0)
    for trial in range(2000):
        n = int(torch.randint(1, 300, (1,), generator=g))
        values = torch.randn(n, generator=g) if trial % 2 else torch.randint(0, 5, (n,), generator=g).float()
        q = (0.0, 1.0, 0.5)[trial % 3] if trial % 7 == 0 else float(torch.rand(1, generator=g))
        assert torch.equal(F.quantile(values, q), torch.quantile(values, q)), (n, q)
    assert torch.isnan(F.quantile(torch.tensor([1.0, float("nan"), 2.0]), 0.5))
    values = torch.rand(2 ** 24, generator=g)
    assert torch.equal(F.quantile(values, 0.8), torch.quantile(values, 0.8))
    values = torch.randperm(2 ** 24 + 1, generator=g).float()          # 0, 1, ..., 2**24 shuffled (exact in float32)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(values, 0.8)
    for q in (0.8, 0.3):    # consecutive integers: the quantile is the rank q (n - 1) itself, in float32 (spacing 1
        assert abs(F.quantile(values, q).item() - q * 2 ** 24) <= 0.5       # there; a rank off by one is 0.8 away)


def test_high_entropy_mask_equals_trl():
    """Against TRL 1.16's `GRPOTrainer.get_high_entropy_mask` (threshold 1 - rho) on random entropies with
    padding, one process; skipped where TRL (the `bench` extra) is not installed."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

    class OneProcess:
        pad_across_processes = staticmethod(lambda x, dim, pad_index: x)
        gather = staticmethod(lambda x: x)

    torch.manual_seed(0)
    entropy, mask = torch.rand(6, 9) * 3, torch.rand(6, 9) > 0.3
    for rho in (0.0, 0.2, 0.5, 0.8, 1.0):
        theirs = trainer.get_high_entropy_mask(type("T", (), {"accelerator": OneProcess})(), entropy, mask, 1 - rho)
        assert torch.equal(F.high_entropy_mask(entropy, mask, rho), theirs), rho


def test_linear_token_logprobs_with_entropy_literal_example_in_any_chunking():
    """The docstring's example: both rows' probabilities (e, 1, 1) / (e + 2), entropy log(e + 2) - e / (e + 2)."""
    hidden, weight = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    lse = math.log(math.e + 2)
    for chunk in (0, 1, 2):
        logp, entropy = F.linear_token_logprobs(hidden, weight, None, torch.tensor([0, 2]), chunk=chunk,
                                                with_entropy=True)
        assert torch.allclose(logp, torch.tensor([1 - lse, -lse]), atol=1e-6)
        assert torch.allclose(entropy, torch.full((2,), lse - math.e / (math.e + 2)), atol=1e-6)
        assert math.isclose(entropy[0].item(), 0.9753, abs_tol=1e-4)


@pytest.mark.parametrize("by_vocab", [False, True], ids=["by-rows", "by-vocab"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_the_chunked_heads_written_out_backward_literal_example(chunk, by_vocab, monkeypatch):
    """`_ChunkedLinearLogprobs`' docstring: hidden = I, weight [[1, 0], [0, 1], [0, 0]], labels [0, 2]. A loss of
    row 0's logprob puts dL/dz = onehot_0 - p = (0.4239, -0.2119, -0.2119) in the weight's first column; a loss of
    row 0's entropy puts -p (log p + H) = (-0.2442, 0.1221, 0.1221) there; the second column (row 1's) is 0. The
    same by slices of the vocabulary (chunk 1 of 2 rows: slices of 1 column; chunk 2 is the whole, plain path)."""
    by_vocabulary(monkeypatch, by_vocab)
    for which, column in ((0, [0.4239, -0.2119, -0.2119]), (1, [-0.2442, 0.1221, 0.1221])):
        weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
        out = F.linear_token_logprobs(torch.eye(2), weight, None, torch.tensor([0, 2]), chunk=chunk, with_entropy=True)
        out[which][0].backward()
        assert torch.allclose(weight.grad[:, 0], torch.tensor(column), atol=1e-4)
        assert torch.equal(weight.grad[:, 1], torch.zeros(3))


@pytest.mark.parametrize("by_vocab", [False, True], ids=["by-rows", "by-vocab"])
def test_a_banned_token_leaves_the_chunked_heads_values_and_gradients_finite_and_equal(by_vocab, monkeypatch):
    """A bias of -inf on one token (a banned token: probability 0, log-probability -inf), and entropy weights up to
    about 100: the entropies and every gradient are finite, chunked (by rows or by vocabulary) or whole, and equal.
    (`F.entropy` clamped -inf to the most negative float, whose product with such a weight overflowed in its
    backward: NaN gradients on the whole logits' path.)"""
    by_vocabulary(monkeypatch, by_vocab)
    torch.manual_seed(0)
    M, H, V = 12, 8, 20
    bias = torch.zeros(V)
    bias[3] = float("-inf")
    leaves = [torch.randn(M, H, requires_grad=True), torch.randn(V, H, requires_grad=True)]
    labels, a, b = torch.randint(4, V, (M,)), torch.randn(M), 50 * torch.randn(M)
    results = []
    for chunk in (0, 5):
        logp, entropy = F.linear_token_logprobs(*leaves, bias, labels, chunk=chunk, with_entropy=True)
        results.append((logp, entropy, *torch.autograd.grad((logp * a + entropy * b).sum(), leaves)))
    for plain, chunked in zip(*results):
        assert torch.isfinite(plain).all() and torch.isfinite(chunked).all()
        assert torch.allclose(plain, chunked, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "fp32-by-vocab", "bf16-autocast", "bf16-weights"])
def test_chunked_logprobs_and_entropies_equal_the_whole_logits_in_value_and_gradient(precision, monkeypatch):
    """37 rows in chunks of 5 against one (37, V) logits tensor, with a bias and T = 0.7: logprobs, entropies and
    the gradients of hidden, weight and bias of a loss reading both agree within float rounding; the entropies
    are those of `F.entropy` on the log-softmax. bf16 goes by slices of the vocabulary (6 columns: 9 slices, the
    labels spread over them); `fp32-by-vocab` runs that path in float32, to 1e-5."""
    by_vocabulary(monkeypatch, precision == "fp32-by-vocab")
    torch.manual_seed(0)
    M, H, V = 37, 16, 50
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    leaves = [torch.randn(shape).to(dtype).requires_grad_() for shape in ((M, H), (V, H), (V,))]
    labels, a, b = torch.randint(0, V, (M,)), torch.randn(M), torch.randn(M)
    results = []
    for chunk in (0, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            logp, entropy = F.linear_token_logprobs(*leaves, labels, temperature=0.7, chunk=chunk, with_entropy=True)
        grads = torch.autograd.grad((logp * a + entropy * b).sum(), leaves)
        results.append((logp, entropy, *grads))
    tol = 1e-5 if precision.startswith("fp32") else 2e-2
    for plain, chunked in zip(*results):
        assert plain.dtype == chunked.dtype and torch.allclose(plain, chunked, atol=tol, rtol=tol)
    if precision == "fp32":
        logits = torch.nn.functional.linear(*(x.detach() for x in leaves)) / 0.7
        assert torch.allclose(results[1][1], F.entropy(torch.log_softmax(logits, -1)), atol=1e-5)


def test_entropies_stay_float32_under_bf16_autocast():
    """Under bf16 autocast `torch.linalg.vecdot` rounds float32 inputs to bf16 and returns bf16: the entropies of
    a bf16-mixed run came 0.01-0.02 nats off, on a grid of 1/32 near 4.5 nats, where the forking-token quantile of a
    near-uniform policy then selected every token. `F.entropy`, `token_logprobs_and_entropy` (the sampler's) and both
    paths of `linear_token_logprobs` (the updates') reduce outside autocast: float32, equal to the same computation
    without autocast on the same logits (the head's matmul in bf16 either way), in value and gradient."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(7, 94)).requires_grad_()
    labels = torch.randint(0, 94, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = F.token_logprobs_and_entropy(logits, labels, 0.7)
    plain_logp, plain_ent = F.token_logprobs_and_entropy(logits, labels, 0.7)
    assert ent.dtype == torch.float32 and torch.equal(ent, plain_ent) and torch.equal(logp, plain_logp)
    assert torch.equal(torch.autograd.grad(ent.sum(), logits)[0], torch.autograd.grad(plain_ent.sum(), logits)[0])

    M, H, V = 37, 16, 50
    leaves = [torch.randn(shape).requires_grad_() for shape in ((M, H), (V, H), (V,))]
    labels = torch.randint(0, V, (M,))
    z = torch.nn.functional.linear(*(x.bfloat16() for x in leaves)).float() / 0.7      # the head in bf16
    want = F.entropy(torch.log_softmax(z, -1))
    want_grads = torch.autograd.grad(want.sum(), leaves)
    for chunk in (0, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, ent = F.linear_token_logprobs(*leaves, labels, temperature=0.7, chunk=chunk, with_entropy=True)
        assert ent.dtype == torch.float32 and torch.allclose(ent, want, atol=1e-6, rtol=0), chunk
        for got, expected in zip(torch.autograd.grad(ent.sum(), leaves), want_grads):
            assert torch.allclose(got, expected, atol=1e-2 * expected.abs().max(), rtol=0), chunk


def test_objective_input_policy_mask_weights_and_logp_literal_examples():
    """The docstrings' examples: `policy_mask` = loss mask x forks; `token_weights` 0 off the forks (times the
    mismatch weights unless `correction=False`); `policy_logp` the same values, its gradient on the forks alone."""
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    forks = torch.tensor([[False, True, True], [True, False, False]])
    batch = ObjectiveInput(logp=logp, old_logp=logp.detach(), ref_logp=logp.detach(),
                           mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), rewards=torch.zeros(2), group_size=2,
                           sampler_weights=torch.full((2, 3), 0.5), forks=forks)
    assert batch.policy_mask().tolist() == [[0, 1, 0], [1, 0, 0]]
    assert batch.token_weights().tolist() == [[0, 0.5, 0.5], [0.5, 0, 0]]
    assert batch.token_weights(correction=False).tolist() == [[0, 1, 1], [1, 0, 0]]
    assert torch.equal(batch.policy_logp(), logp)
    batch.policy_logp().sum().backward()
    assert logp.grad.tolist() == [[0, 1, 1], [1, 0, 0]]
    plain = ObjectiveInput(logp=logp, old_logp=logp, ref_logp=logp, mask=batch.mask, rewards=batch.rewards, group_size=2)
    assert plain.token_weights() == 1.0 and plain.policy_logp() is logp and torch.equal(plain.policy_mask(), batch.mask)


def _whole_logits_entropy(model, ids, mask, P, T=0.7):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=F.position_ids_from_mask(mask),
                   use_cache=False).logits[:, P - 1: -1]
    return F.token_logprobs_and_entropy(logits, ids[:, P:], T)


MODELS = {"llama": {**TINY_SHAPE, "model_type": "llama", "num_key_value_heads": 1},
          "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}}
PATHS = [("llama", 1, True, 0), ("llama", 1, True, 4), ("llama", 3, True, 4), ("llama", 3, False, 0),
         ("gpt2", 1, True, 0), ("gpt2", 3, True, 0)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch, group_size, packed, chunk", PATHS,
                         ids=["rows", "rows-chunked", "packed-chunked", "padded", "gpt2-whole-head", "gpt2-groups"])
def test_response_entropies_equal_the_whole_logits_in_value_and_gradient(tokenizer, arch, group_size, packed, chunk,
                                                                         lora):
    """`response_logprobs(entropy=True)` on every path (one row per response, the LM head in chunks, the packed
    and the padded shared-prompt layouts, a model whose head is not split off, LoRA): logprobs and entropies on
    the response tokens equal those of the whole logits, and the gradient of a loss reading both equals the
    whole logits' (1e-5)."""
    model = build_causal_lm(BackboneSpec(config=MODELS[arch], lora={"r": 4} if lora else None), tokenizer)
    ids, mask, response_mask = grouped_rows(tokenizer)
    torch.manual_seed(1)
    a, b = torch.randn(response_mask.shape), torch.randn(response_mask.shape)
    results = []
    for compute in (lambda: _whole_logits_entropy(model, ids, mask, 5),
                    lambda: response_logprobs(model, ids, mask, 5, 0.7, group_size, chunk, packed, entropy=True)):
        model.zero_grad()
        logp, entropy = compute()
        ((logp * a + entropy * b) * response_mask).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach() * response_mask, entropy.detach() * response_mask, grad))
    (logp, entropy, grad), (logp2, entropy2, grad2) = results
    assert torch.allclose(logp, logp2, atol=1e-5) and torch.allclose(entropy, entropy2, atol=1e-5)
    assert entropy.min() >= 0 and entropy.max() > 0
    assert (grad - grad2).abs().max() <= 1e-5 * grad.abs().max()


def _rl_module(sft_dir, tokenizer, objective, **options):
    from datamodules.collate import PairCollator, encode_prompt
    from datamodules.task import GoldReward
    from modules.rl import RLModule
    from modules.sampling import SamplingConfig

    module = RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=GoldReward(), objective=objective,
                      sampling=SamplingConfig(max_new_tokens=8), micro_batch_tokens=None, **options)
    module.configure_model()
    prompts = ["write a review of the cafe :", "write a review of the zoo :", "write a review of the park :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                 for t in prompts])
    torch.manual_seed(0)
    return module, module.make_rollout(batch)


def _update_gradient(module, roll):
    """The policy's gradient of one `backward_minibatch` over the whole rollout, and its output."""
    module.policy.zero_grad()
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    out = module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "test")
    return torch.cat([p.grad.flatten() for p in module.policy.parameters()]), out


def test_the_entropy_bonus_is_the_objectives_loss_minus_coef_times_the_mean_entropy(sft_dir, tokenizer):
    """P3O with `entropy_coef` 1 (large: the tiny random model's entropy is near its maximum, where its gradient
    is small): the loss is P3O's minus the mean entropy of the current policy over the response tokens (that of
    the whole logits), logged as `update_entropy`; its gradient is P3O's minus the gradient of that mean,
    computed apart."""
    from modules.objectives.p3o import P3O

    module, roll = _rl_module(sft_dir, tokenizer, P3O(), entropy_coef=1.0)
    with_bonus, out = _update_gradient(module, roll)
    module.entropy_control = EntropyControl(0.0)
    plain, plain_out = _update_gradient(module, roll)
    module.policy.zero_grad()
    _, entropy = module.logprobs(module.policy, roll, entropy=True)
    mean = F.masked_mean(entropy, roll.response_mask)
    mean.backward()
    expected = plain - torch.cat([p.grad.flatten() for p in module.policy.parameters()])
    assert torch.allclose(out.metrics["update_entropy"], mean.detach(), atol=1e-6)
    assert torch.allclose(out.loss, plain_out.loss - mean.detach(), atol=1e-6)
    assert (with_bonus - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (with_bonus - plain).abs().max() > 1e-3 * plain.abs().max()          # (the bonus moves the gradient)


@pytest.mark.parametrize("name", ["p3o", "grpo", "ppo"])
def test_forking_tokens_alone_carry_the_policy_gradient(sft_dir, tokenizer, name):
    """`top_entropy_quantile` 0.3: about 30% of the response tokens are forks, chosen by pi_old's entropies (the
    sampler's); the policy loss's gradient with respect to each token's logprob is 0 off the forks and not on
    them; KL terms keep theirs (GRPO's k3 term: nonzero everywhere with kl_coef). The loss value of P3O (a
    sequence-level loss) is unchanged; GRPO's and PPO's are TRL's: the masked tokens' policy terms 0."""
    from modules.objectives.grpo import GRPO
    from modules.objectives.p3o import P3O
    from modules.objectives.ppo import PPO

    objective = {"p3o": lambda: P3O(), "grpo": lambda: GRPO(k=2, kl_coef=0.0), "ppo": PPO}[name]()
    module, roll = _rl_module(sft_dir, tokenizer, objective, top_entropy_quantile=0.3)
    roll.forks = module.forking_tokens(roll)
    mask = roll.response_mask.bool()
    assert torch.equal(roll.forks, F.high_entropy_mask(roll.entropy, mask, 0.3))
    assert 0.2 < roll.timings["train/forking_tokens"] < 0.4
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    logp = (roll.old_logp + 0.05 * torch.randn_like(roll.old_logp)).requires_grad_()    # (ratios not all 1)
    values = None if module.value is None else roll.values.clone().requires_grad_()
    out = module.objective(module.objective_input(roll, logp, extra, values, float(mask.sum())))
    grad = torch.autograd.grad(out.loss, logp)[0]
    assert (grad[mask & ~roll.forks] == 0).all() and (grad[roll.forks] != 0).float().mean() > 0.9
    roll.forks = None
    unmasked = module.objective(module.objective_input(roll, logp, extra, values, float(mask.sum())))
    if name == "p3o":
        assert torch.allclose(out.loss, unmasked.loss)


def test_micro_batched_updates_with_entropy_options_equal_one_pass(sft_dir, tokenizer):
    """GRPO-4 with both options: micro-batches of at most 30 tokens (three or more, one forward each; then the
    general path, two forwards each) give the loss, `update_entropy` and gradient of one pass."""
    from modules.objectives.grpo import GRPO
    from tests.test_microbatch import _same_update

    module, roll = _rl_module(sft_dir, tokenizer, GRPO(k=4), entropy_coef=0.01, top_entropy_quantile=0.5)
    roll.forks = module.forking_tokens(roll)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    _same_update(module, roll)
    module.objective.separable_groups = False
    _same_update(module, roll)


def test_adaptive_entropy_control_literal_example():
    """The docstring's example (Skywork-OR1's rule, TRL's `use_adaptive_entropy`): nothing applied before the first
    step; up by delta after a step at or below the target, down after one above it, clamped at the bounds; a
    constant coefficient never moves and is always applied."""
    control = EntropyControl(0.01, target=0.2, delta=0.005, low=0.0, high=1.0)
    assert control.enabled and control.applied() == 0.0
    control.step(0.1)
    assert math.isclose(control.applied(), 0.015)
    coefs = []
    for entropy in (0.5, 0.5, 0.5):
        control.step(entropy)
        coefs.append(float(control.coef))
    assert coefs == pytest.approx([0.01, 0.005, 0.0], abs=1e-12) and control.applied() == 0.0
    control.step(0.2)                                                   # (at the target: up, and applied)
    assert math.isclose(control.applied(), 0.005)
    capped = EntropyControl(0.999, target=1.0, delta=0.005, high=1.0)
    capped.step(0.0)
    assert float(capped.coef) == 1.0
    constant = EntropyControl(0.05)
    constant.step(9.0)
    assert constant.applied() == 0.05 and not EntropyControl(0.0).enabled
    assert "coef" in EntropyControl(0.01, target=1.0).state_dict() and not constant.state_dict()   # (checkpointed)


@pytest.mark.parametrize("options, message", [
    ({"entropy_coef": float("nan")}, "entropy_coef=nan; expected a finite number"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile=1.5; expected 0 <= rho <= 1"),
    ({"entropy_target": -1.0}, "entropy_target=-1.0; expected an entropy >= 0"),
    ({"entropy_target": 1.0, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "expected delta > 0 and min <= max"),
    ({"entropy_target": 1.0, "entropy_coef_delta": 0.0}, "expected delta > 0 and min <= max")])
def test_entropy_options_are_checked(sft_dir, options, message):
    from datamodules.task import GoldReward
    from modules.objectives.p3o import P3O
    from modules.rl import RLModule

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=GoldReward(), objective=P3O(), **options)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_run_with_the_adaptive_entropy_bonus_and_forking_tokens(tmp_path, sft_dir, precision):
    """The quickstart P3O config, tiny (4 updates per rollout), with `entropy_coef: 0.01`, `entropy_target: 100`
    (above any entropy here: the coefficient rises by 0.005 after every step) and `top_entropy_quantile: 0.2`,
    pi_old from a forward pass (`old_logprobs: forward`: its entropies set the forks): it trains, and logs the
    share of forking tokens (about 0.2), the entropy in the loss, and the coefficient each rollout's updates
    applied: (0 + 0.015 + 0.02 + 0.025) / 4 = 0.015 (none before the first step), then (0.03 + ... + 0.045) / 4 =
    0.0375, then 0.0575 and 0.0775. The same under bf16-mixed, where the entropies (of this near-uniform tiny policy,
    all near log 94) came in bf16 before `F.row_dot` and every token was a fork."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_rl_config(tmp_path, sft_dir, model={"entropy_coef": 0.01, "top_entropy_quantile": 0.2,
                                                      "entropy_target": 100.0, "old_logprobs": "forward"},
                            precision=precision)
    run_train(config)
    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    forks = [e.value for e in events.Scalars("train/forking_tokens")]
    entropy = [e.value for e in events.Scalars("train/update_entropy")]
    coefs = [e.value for e in events.Scalars("train/entropy_coef")]
    assert forks and all(0.1 < f < 0.3 for f in forks)
    assert entropy and all(e > 0 for e in entropy)
    assert coefs == pytest.approx([0.015, 0.0375, 0.0575, 0.0775], abs=1e-6)


def test_the_forking_threshold_is_over_every_processs_tokens(sft_dir, tokenizer):
    """Under 2 processes (their collectives stood in for: the other process holds 100 trained tokens, all of
    entropy 10, more than this one's), the quantile is over both processes' entropies: with top 0.5 of 100 + n
    tokens, every one of this process's n < 100 tokens is below the threshold (10) and none is a fork; the
    padding (-1) of the shorter list is left out."""
    from types import SimpleNamespace

    from modules.objectives.p3o import P3O

    module, roll = _rl_module(sft_dir, tokenizer, P3O(), top_entropy_quantile=0.5)
    n = int(roll.response_mask.sum())
    assert n < 100
    others = torch.full((100,), 10.0)
    strategy = SimpleNamespace(reduce=lambda value, reduce_op: torch.maximum(value, torch.tensor(100.0)))
    module._trainer = SimpleNamespace(world_size=2, strategy=strategy)
    gathered = []
    module.all_gather = lambda padded: gathered.append(padded) or torch.stack([padded, others])
    forks = module.forking_tokens(roll)
    assert len(gathered[0]) == 100 and (gathered[0][n:] == -1).all()
    assert not forks.any()
    others = torch.zeros(100)                 # the other process's entropies all 0: this one's upper half are forks
    forks = module.forking_tokens(roll)
    pool = torch.cat([roll.entropy[roll.response_mask.bool()], others])
    assert torch.equal(forks, F.high_entropy_mask(roll.entropy, roll.response_mask, 0.5, pool)) and forks.any()


def test_forks_of_an_engine_without_entropies_come_from_a_forward_pass(sft_dir, tokenizer):
    """An engine that records no entropies (vLLM) with `old_logprobs: sampler`: with `top_entropy_quantile` the
    rollout's entropies come from one forward pass of the policy, equal (1e-5) to what our sampler records; without
    the option none are computed."""
    from modules.engines import Sampler
    from modules.objectives.p3o import P3O

    class NoEntropy(Sampler):
        def generate(self, *args, **kwargs):
            roll = super().generate(*args, **kwargs)
            self.recorded, roll.entropy = roll.entropy, None
            return roll

    engine = NoEntropy()
    module, roll = _rl_module(sft_dir, tokenizer, P3O(), top_entropy_quantile=0.5, old_logprobs="sampler", engine=engine)
    assert roll.entropy is not None and torch.allclose(roll.entropy, engine.recorded, atol=1e-5)
    assert engine.recorded.abs().sum() > 0
    _, plain = _rl_module(sft_dir, tokenizer, P3O(), old_logprobs="sampler", engine=NoEntropy())
    assert plain.entropy is None
