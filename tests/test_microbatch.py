"""Micro-batches by token budget: every pass and every update equals the one-batch computation."""
import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules import functional as F
from modules.backbone import BackboneSpec
from modules.batch import ObjectiveInput, ObjectiveOutput
from modules.layout import micro_batch_groups
from modules.objectives.dpo import OnlineDPO
from modules.objectives.grpo import GRPO
from modules.objectives.p3o import P3O
from modules.objectives.ppo import PPO
from modules.objectives.rloo import RLOO
from modules.rl import RLModule
from modules.sampling import SamplingConfig

PROMPTS = ["write a review of the cafe :", "write a review of the hotel , please :", "write a review of the zoo :",
           "write a review of the park :", "write a review of the gym :", "write a review of the bar :"]


def test_micro_batch_groups_literal_example():
    """The docstring's example: tokens [3, 4, 2, 6, 1], budget 7 -> (0, 2), (2, 3), (3, 5); four parts -> the first
    (two groups, the most) halved; a group over the budget stays whole; never more parts than groups."""
    tokens = torch.tensor([3, 4, 2, 6, 1])
    assert micro_batch_groups(tokens, 7) == [(0, 2), (2, 3), (3, 5)]
    assert micro_batch_groups(tokens, 7, parts=4) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert micro_batch_groups(torch.tensor([9, 9]), 7) == [(0, 1), (1, 2)]
    assert micro_batch_groups(torch.tensor([1, 1]), 100, parts=5) == [(0, 1), (1, 2)]


def objective(name: str, k: int):
    if name == "ppo":
        made = PPO()
        made.responses_per_prompt = k        # PPO samples K per prompt as well (no group maths)
        return made
    return {"p3o": lambda: P3O(k=k), "p3o_v1": lambda: P3O(variant="v1", k=k), "dpo": OnlineDPO,
            "rloo": lambda: RLOO(k=k), "grpo": lambda: GRPO(k=k), "grpo_dapo": lambda: GRPO(k=k, loss_type="dapo"),
            "grpo_bnpo": lambda: GRPO(k=k, loss_type="bnpo"), "grpo_cispo": lambda: GRPO(k=k, loss_type="cispo"),
            "grpo_sapo": lambda: GRPO(k=k, loss_type="sapo"), "grpo_vespo": lambda: GRPO(k=k, loss_type="vespo"),
            "grpo_luspo": lambda: GRPO(k=k, loss_type="luspo", importance_sampling_level="sequence"),
            "grpo_opsm": lambda: GRPO(k=k, loss_type="dapo", off_policy_mask=0.0)}[name]()


CASES = [("p3o", 2), ("p3o", 4), ("p3o_v1", 2), ("ppo", 2), ("ppo", 4), ("dpo", 2), ("rloo", 2), ("rloo", 4),
         ("grpo", 2), ("grpo", 4), ("grpo_dapo", 4), ("grpo_bnpo", 2), ("grpo_cispo", 4), ("grpo_sapo", 2),
         ("grpo_luspo", 4), ("grpo_vespo", 2), ("grpo_opsm", 4)]


def rollout_module(sft_dir, tokenizer, name: str, k: int, share_prompts: bool, lora: bool, perturb: bool = True):
    from datamodules.task import GoldReward

    spec = BackboneSpec(pretrained=sft_dir, lora={"r": 4} if lora else None)
    module = RLModule(spec, sft_dir, reward=GoldReward(), objective=objective(name, k),
                      sampling=SamplingConfig(max_new_tokens=8), share_prompts=share_prompts,
                      value_model=BackboneSpec(pretrained=sft_dir) if name == "ppo" else None)
    module.configure_model()
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                 for t in PROMPTS])
    torch.manual_seed(0)
    roll = module.make_rollout(batch)
    if not perturb:
        return module, roll
    with torch.no_grad():          # the policy moves away from pi_old, so ratios and clipping are not trivial
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return module, roll


@pytest.mark.slow
@pytest.mark.parametrize("share_prompts", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("name, k", CASES, ids=[f"{n}-k{k}" for n, k in CASES])
def test_an_update_in_micro_batches_has_the_gradient_of_the_whole_minibatch(sft_dir, tokenizer, name, k,
                                                                            share_prompts):
    """6 prompts x K responses, updated once as one batch and once in micro-batches of at most 30 real tokens
    (3 or more parts): the same loss, metrics and parameter gradients (policy and, for PPO, value head) within float
    rounding, for every objective, K = 2 and 4, the packed and the padded layouts. Normalisers are the minibatch's
    (token counts for dapo / bnpo, means over pairs and groups, PPO's whitening in `prepare`). Every shipped
    objective is `separable_groups`: one forward per micro-batch, on a minibatch that is not the first too."""
    module, roll = rollout_module(sft_dir, tokenizer, name, k, share_prompts, lora=False)
    assert module.objective.separable_groups
    forwards = count_forwards(module)
    _same_update(module, roll)
    assert forwards[0] == len(roll) and sum(forwards[1:]) == len(roll)      # whole; then each micro-batch once


@pytest.mark.parametrize("name, k", [("p3o", 2), ("grpo", 4)])
def test_a_lora_update_in_micro_batches_has_the_gradient_of_the_whole_minibatch(sft_dir, tokenizer, name, k):
    _same_update(*rollout_module(sft_dir, tokenizer, name, k, share_prompts=True, lora=True))


GENERAL = [("p3o", 2, True, False), ("ppo", 2, False, False), ("grpo_dapo", 4, True, False), ("p3o", 4, False, True)]


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("name, k, share_prompts, lora", GENERAL, ids=["p3o-k2", "ppo-padded", "grpo_dapo-k4",
                                                                       "p3o-k4-lora"])
def test_the_general_path_has_the_gradient_of_the_whole_minibatch(sft_dir, tokenizer, name, k, share_prompts, lora,
                                                                   first):
    """An objective that is not `separable_groups` (here a shipped one told so): a forward without a graph, the
    objective's gradient on the whole minibatch, then each micro-batch again with its graph: two forwards per
    micro-batch. With no step since the rollout (`first`), step (1)'s logprobs (and PPO's values) are the
    rollout's pi_old: one forward per micro-batch. The same loss and gradients as the whole minibatch in one pass
    (whose pi is a fresh forward) within float rounding either way."""
    module, roll = rollout_module(sft_dir, tokenizer, name, k, share_prompts, lora, perturb=not first)
    module.objective.separable_groups = False
    forwards = count_forwards(module)
    _same_update(module, roll, first=first)
    assert forwards[0] == len(roll) and sum(forwards[1:]) == (1 if first else 2) * len(roll)


SEPARABLE = {
    "p3o-v2-k2": lambda: P3O(), "p3o-v1-k4": lambda: P3O(variant="v1", k=4),
    "p3o-tokenwise-scale_q": lambda: P3O(k=4, avg_tokenwise=True, scale_q=True, reward_clip=1.0),
    "p3o-kl-in-loss": lambda: P3O(k=4, kl_in_loss=True), "gspo-kl-in-reward": lambda: GRPO(
        importance_sampling_level="sequence", kl_in_reward=True),
    "ppo": lambda: PPO(kl_estimator="k3", dual_clip=3.0), "dpo": OnlineDPO, "dpo-soft": lambda: OnlineDPO(soft_labels=True),
    "rloo-k4-current-kl": lambda: RLOO(k=4, kl_on_current_policy=True), "grpo-dr": lambda: GRPO(loss_type="dr_grpo"),
    "grpo-dapo": lambda: GRPO(loss_type="dapo"), "grpo-bnpo-batch": lambda: GRPO(loss_type="bnpo", scale_rewards="batch"),
}


class NormalisedByItsOwnLogprobs(torch.nn.Module):
    """Not separable: each response's logprob divided by their std over the minibatch (the checker must say so)."""

    def forward(self, batch):
        logp = F.sequence_logprobs(batch.logp, batch.mask)
        return ObjectiveOutput(-(logp * batch.rewards).sum() / logp.std(), {})


def coupled_rows(objective, k: int, weights: bool = False, pairwise: bool = False) -> list[int]:
    """Groups (of 3, K rows each) whose gradient with respect to their rows of logp (and values) moves when the
    other groups' rows change: none, for an objective that is `separable_groups`."""
    from modules.objectives.base import Objective

    torch.manual_seed(0)
    n, length = 3 * k, 5
    mask = (torch.arange(length) < torch.tensor([5, 3, 4, 2, 5, 1, 4, 3, 5, 2, 3, 4][:n])[:, None]).float()
    old, ref = -torch.rand(n, length) * mask, -torch.rand(n, length) * mask
    rewards, sampler_weights, pair_rewards = torch.randn(n), torch.rand(n, length) + 0.5, torch.randn(n, k)

    def batch_of(logp, values):
        return ObjectiveInput(logp=logp, old_logp=old, ref_logp=ref, mask=mask, rewards=rewards, group_size=k,
                              values=values, old_values=torch.zeros(n, length), max_new_tokens=length,
                              tokens_per_rank=float(mask.sum()), sampler_weights=sampler_weights if weights else None,
                              pair_rewards=pair_rewards if pairwise else None)

    prepare = objective.prepare if isinstance(objective, Objective) else (lambda b: {})
    extra = prepare(batch_of(old, torch.zeros(n, length)))
    logp = old + 0.02 * torch.randn(n, length) * mask          # inside the clip range: a gradient everywhere
    values = torch.randn(n, length)
    coupled = []
    for g in range(3):
        rows = slice(g * k, (g + 1) * k)
        grads = []
        for seed in (2, 3):
            other = torch.Generator().manual_seed(seed)
            x, v = logp.clone(), values.clone()
            keep = torch.zeros(n, dtype=torch.bool)
            keep[rows] = True
            x = torch.where(keep[:, None], x, old + torch.randn(n, length, generator=other) * mask).requires_grad_()
            v = torch.where(keep[:, None], v, torch.randn(n, length, generator=other)).requires_grad_()
            batch = batch_of(x, v)
            batch.extra = extra
            grad = torch.autograd.grad(objective(batch).loss, [x, v], allow_unused=True)
            grads.append(torch.cat([(t if t is not None else torch.zeros(n, length))[rows].flatten() for t in grad]))
        assert grads[0].abs().max() > 0
        if not torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5):
            coupled.append(g)
    return coupled


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "is-weights"])
@pytest.mark.parametrize("name", list(SEPARABLE))
def test_every_shipped_objective_is_separable_by_groups(name, weights):
    """The property `separable_groups` declares, checked directly on literal-shaped random tensors: with 3 groups,
    each group's gradient (logp and values) is the same whatever the other groups' rows hold, with the engine's
    importance weights too."""
    objective = SEPARABLE[name]()
    k = objective.responses_per_prompt if objective.responses_per_prompt > 1 else 2
    assert objective.separable_groups
    assert coupled_rows(objective, k, weights) == []
    if name.startswith(("p3o-v2", "dpo")):
        assert coupled_rows(objective, k, weights, pairwise=True) == []


def test_the_separability_check_finds_a_loss_normalised_by_its_own_logprobs():
    assert coupled_rows(NormalisedByItsOwnLogprobs(), 2) == [0, 1, 2]


def count_forwards(module) -> list[int]:
    """Rows of every `_forward_part` call of `module` from now on (the list fills as it runs)."""
    forwards = []
    forward_part = module._forward_part
    module._forward_part = lambda part: forwards.append(len(part)) or forward_part(part)
    return forwards


def test_the_rollout_passes_are_not_reused_under_dropout(sft_dir, tokenizer):
    module, roll = rollout_module(sft_dir, tokenizer, "p3o", 2, True, False, perturb=False)
    assert module.rollout_passes_reusable(roll)
    module.policy_spec.dropout = True
    assert not module.rollout_passes_reusable(roll)
    module.objective.separable_groups = False
    module.micro_batch_tokens = 30
    forwards = count_forwards(module)
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "test", first=True)
    assert sum(forwards) == 2 * len(roll)


def _same_update(module, roll, first: bool = False):
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    tokens = float(roll.response_mask.sum())
    results = []
    for budget in (None, 30):
        module.micro_batch_tokens = budget
        parts = module.micro_batches(roll)
        assert len(parts) == 1 if budget is None else len(parts) >= 3
        params = [p for m in (module.policy, module.value) if m is not None for p in m.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        out = module.backward_minibatch(roll, extra, tokens, "test", first)
        results.append((out, torch.cat([p.grad.flatten() for p in params if p.grad is not None])))
    (whole, whole_grad), (parts_out, parts_grad) = results
    assert torch.allclose(whole.loss.detach(), parts_out.loss, atol=1e-6, rtol=1e-5)
    for key, value in whole.metrics.items():
        assert torch.allclose(value.float(), parts_out.metrics[key].float(), atol=1e-5, rtol=1e-4), key
    assert whole_grad.abs().max() > 0 and whole_grad.shape == parts_grad.shape
    assert (whole_grad - parts_grad).abs().max() <= 1e-5 * whole_grad.abs().max()


def test_rollout_passes_in_micro_batches_equal_one_pass(sft_dir, tokenizer):
    """pi_ref / pi_old logprobs and PPO's values over a rollout, one pass against micro-batches of 30 tokens."""
    module, roll = rollout_module(sft_dir, tokenizer, "ppo", 2, share_prompts=True, lora=False)
    with torch.no_grad():
        whole = (module.logprobs(module.policy, roll), module.values(roll))
        module.micro_batch_tokens = 30
        assert len(module.micro_batches(roll)) >= 3
        parts = (module.logprobs(module.policy, roll), module.values(roll))
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


class TokenReward:
    """Test reward with token-level access: the sum of each row's ids (NaN for a row holding token 7 at column 0)."""

    def __init__(self):
        self.calls = []

    def score(self, rollout, tokenizer):
        self.calls.append(len(rollout))
        out = rollout.input_ids.sum(-1).float()
        return torch.where(rollout.input_ids[:, 0] == 7, torch.full_like(out, float("nan")), out)


def test_a_token_level_reward_is_scored_per_micro_batch_and_checked_as_a_whole():
    """Rows 0-7 in parts of 3, 3 and 2 rows: one call each, the rewards in row order; a NaN in the second part is
    named by its index in the rollout (5 of 8), not in its part."""
    from modules.rewards import RewardError, score
    from tests.test_rewards import rollout_of

    roll = rollout_of(8)
    roll.input_ids = torch.arange(24).view(8, 3) % 6 + 1          # ids 1..6: no 7 yet
    parts = [torch.arange(0, 3), torch.arange(3, 6), torch.arange(6, 8)]
    reward = TokenReward()
    rewards, replaced = score(reward, roll, None, parts=parts)
    assert reward.calls == [3, 3, 2] and replaced == 0
    assert torch.equal(rewards, roll.input_ids.sum(-1).float())
    roll.input_ids[5, 0] = 7
    with pytest.raises(RewardError, match=r"returned nan for response 5 of 8 \(prompt 'prompt 5'"):
        score(TokenReward(), roll, None, parts=parts)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sft_and_reward_micro_batches_give_the_whole_batch_loss_and_gradient(stage, sft_dir, tokenizer):
    """`micro_batch_tokens` on the SFT and reward stages: 6 rows (pairs) of different lengths in parts of at most
    30 real tokens; the loss and every gradient equal one pass over the batch (1e-5 relative), with one forward per
    part and one recomputation per part in the backward (the activations of one part at a time)."""
    from datamodules.collate import encode_response
    from modules.reward_model import RewardModule
    from modules.sft import SFTModule

    rows = [{"prompt": p, "prompt_ids": encode_prompt(tokenizer, p), "chosen": c, "rejected": r,
             "chosen_ids": encode_response(tokenizer, c), "rejected_ids": encode_response(tokenizer, r)}
            for p, c, r in zip(PROMPTS, ["great .", "the room was clean and the staff kind .", "fun", "ok .",
                                         "the view was lovely .", "too loud ."],
                               ["bad .", "dirty .", "the animals looked sad and tired .", "meh", "no .", "fine ."])]
    batch = PairCollator(tokenizer.pad_token_id)(rows)
    results = {}
    for budget in (None, 30):
        torch.manual_seed(0)
        if stage == "sft":
            module = SFTModule(BackboneSpec(pretrained=sft_dir), sft_dir, micro_batch_tokens=budget)
        else:
            module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir, micro_batch_tokens=budget)
        module.configure_model()
        model = module.policy if stage == "sft" else module.scorer
        calls = []
        model.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        if stage == "sft":
            loss = module.loss(batch)
        else:
            chosen, rejected = module.pair_rewards(batch)
            loss = F.bradley_terry_loss(chosen, rejected)
        forwards = len(calls)
        loss.backward()
        results[budget] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                           forwards, len(calls) - forwards)
    (plain, plain_grads, plain_fw, plain_re), (micro, micro_grads, micro_fw, micro_re) = results[None], results[30]
    assert (plain_fw, plain_re) == (1, 0) and micro_fw >= 3 and micro_re == micro_fw
    assert torch.allclose(micro, plain, rtol=1e-5, atol=0)
    assert len(micro_grads) == len(plain_grads) > 0
    for a, b in zip(micro_grads, plain_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
