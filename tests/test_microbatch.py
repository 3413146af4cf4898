"""Micro-batches by token budget: every pass and every update equals the one-batch computation."""
import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules import functional as F
from modules.backbone import BackboneSpec
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
            "grpo_bnpo": lambda: GRPO(k=k, loss_type="bnpo")}[name]()


CASES = [("p3o", 2), ("p3o", 4), ("p3o_v1", 2), ("ppo", 2), ("ppo", 4), ("dpo", 2), ("rloo", 2), ("rloo", 4),
         ("grpo", 2), ("grpo", 4), ("grpo_dapo", 4), ("grpo_bnpo", 2)]


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
    (token counts for dapo / bnpo, means over pairs and groups, PPO's whitening in `prepare`)."""
    _same_update(*rollout_module(sft_dir, tokenizer, name, k, share_prompts, lora=False))


@pytest.mark.parametrize("name, k", [("p3o", 2), ("grpo", 4)])
def test_a_lora_update_in_micro_batches_has_the_gradient_of_the_whole_minibatch(sft_dir, tokenizer, name, k):
    _same_update(*rollout_module(sft_dir, tokenizer, name, k, share_prompts=True, lora=True))


@pytest.mark.parametrize("name, k, share_prompts, lora", [("p3o", 2, True, False), ("ppo", 2, False, False),
                                                         ("grpo_dapo", 4, True, False), ("p3o", 4, False, True)])
def test_the_first_minibatch_after_a_rollout_reuses_its_passes_with_the_gradient_of_the_whole_minibatch(
        sft_dir, tokenizer, name, k, share_prompts, lora):
    """With no step since the rollout, the micro-batched update takes step (1)'s logprobs (and PPO's values) from
    the rollout's pi_old instead of a forward: one forward per micro-batch instead of two, and the same loss and
    gradients as the whole minibatch in one pass (whose pi is a fresh forward) within float rounding."""
    module, roll = rollout_module(sft_dir, tokenizer, name, k, share_prompts, lora, perturb=False)
    forwards = []
    forward_part = module._forward_part
    module._forward_part = lambda part: forwards.append(len(part)) or forward_part(part)
    _same_update(module, roll, first=True)
    assert forwards[0] == len(roll) and sum(forwards[1:]) == len(roll)      # whole; then each micro-batch once


def test_the_rollout_passes_are_not_reused_under_dropout_or_after_a_step(sft_dir, tokenizer):
    module, roll = rollout_module(sft_dir, tokenizer, "p3o", 2, True, False, perturb=False)
    assert module.rollout_passes_reusable(roll)
    module.policy_spec.dropout = True
    assert not module.rollout_passes_reusable(roll)
    module.policy_spec.dropout = False
    module.micro_batch_tokens = 30
    forwards = []
    forward_part = module._forward_part
    module._forward_part = lambda part: forwards.append(len(part)) or forward_part(part)
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "test", first=False)
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
