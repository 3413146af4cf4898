"""Shift invariance: the per-prompt shift wrapper, and P3O vs PPO trained end to end on a
reward shifted per prompt."""
import pytest
import torch

from modules.batch import Rollout
from modules.rewards import PromptShift, RewardError
from tests.helpers import tiny_rl_config
from train import cli_main


def _rollout(prompts: list[str], responses: list[str]) -> Rollout:
    n = len(prompts)
    ids = torch.zeros(n, 3, dtype=torch.long)
    return Rollout(ids, torch.ones_like(ids), torch.ones(n, 2), 1, 2, prompts, responses, torch.ones(n, dtype=torch.bool))


class Const:
    """Test reward: 0.5 for every response."""

    def __call__(self, prompts, responses):
        return [0.5] * len(prompts)


def test_prompt_shift_offsets_are_a_deterministic_function_of_the_prompt():
    """z('a') = 1.3304975563392585, z('b') = 0.5327135823828313 for seed 0 (sha256 of b'0\\x00a' seeding Python's
    Mersenne Twister, then its gauss()). scale 2, reward_std 0.5: delta = 2 * 0.5 * z = z, so rewards 0.5 + z:
    [1.8305, 1.8305, 1.0327, 1.8305] for prompts a, a, b, a, the same in any order or batch."""
    shift = PromptShift(Const(), scale=2.0, seed=0, reward_std=0.5)
    rewards = shift.score(_rollout(["a", "a", "b", "a"], ["x", "y", "z", "w"]), tokenizer=None)
    expected = torch.tensor([0.5 + 1.3304975563392585, 0.5 + 1.3304975563392585, 0.5 + 0.5327135823828313,
                             0.5 + 1.3304975563392585])
    assert torch.allclose(rewards, expected, atol=1e-6)
    again = PromptShift(Const(), scale=2.0, seed=0, reward_std=0.5).score(_rollout(["b"], ["q"]), None)
    assert again.item() == pytest.approx(0.5 + 0.5327135823828313, abs=1e-6)
    other_seed = PromptShift(Const(), scale=2.0, seed=1, reward_std=0.5).score(_rollout(["a"], ["x"]), None)
    assert other_seed.item() != pytest.approx(rewards[0].item())
    assert torch.equal(PromptShift(Const(), scale=0.0).score(_rollout(["a", "b"], ["x", "y"]), None),
                       torch.tensor([0.5, 0.5]))


def test_prompt_shift_checks_the_wrapped_reward_and_its_arguments():
    class Short:
        def __call__(self, prompts, responses):
            return [0.0]

    with pytest.raises(RewardError, match=r"<locals>.Short returned 1 values for 2 responses"):
        PromptShift(Short()).score(_rollout(["a", "b"], ["x", "y"]), None)
    with pytest.raises(ValueError, match="expected scale >= 0 and reward_std > 0"):
        PromptShift(Const(), scale=-1.0)


def _final_weights(tmp_path, sft_dir, source: str, scale: float, name: str) -> torch.Tensor:
    config = tiny_rl_config(tmp_path, sft_dir, source=source, name=f"{name}.yaml", model={
        "reward": {"class_path": "modules.rewards.PromptShift",
                   "init_args": {"reward": {"class_path": "datamodules.task.GoldReward"}, "scale": scale}}})
    args = ["fit", "--config", config]
    if "ppo" in source:
        args.append(f"--model.init_args.value_model.pretrained={sft_dir}")
    cli = cli_main(args)
    return torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["p3o", "ppo"])
def test_a_per_prompt_reward_shift_leaves_p3o_unchanged_and_moves_ppo(tmp_path, sft_dir, objective):
    """4 rollouts x 8 updates on the gold reward, plus delta(x) ~ N(0, 10^2) per prompt (scale 10, reward_std 1:
    offsets 10-50x the gold reward's range [-1, 1]). P3O sees only r(x, y1) - r(x, y2): the offsets cancel
    exactly in real arithmetic; in float32, r + delta rounds r to the spacing of numbers near |delta| (2^-20 ~ 1e-6
    for |delta| < 16), so each reward difference moves by ~1e-6 and the weights by ~lr x that: the tolerance is
    1e-4 absolute on weights of order 0.1-1 (and a run is only this close if every sampled token was the same).
    PPO's value head must fit delta(x): its weights end far apart (> 1e-3)."""
    source = f"configs/quickstart/{objective}.yaml"
    start = _final_weights(tmp_path, sft_dir, source, 0.0, "scale0")
    shifted = _final_weights(tmp_path, sft_dir, source, 10.0, "scale10")
    gap = (start - shifted).abs().max().item()
    if objective == "p3o":
        assert gap < 1e-4, f"P3O moved by {gap} under a per-prompt shift"
    else:
        assert gap > 1e-3, f"PPO moved by only {gap} under a per-prompt shift"
