"""Pairwise rewards (`modules.rewards.PairwiseReward`): every pair of a group asked once, the antisymmetric
matrix, a judge's position bias cancelled by asking it in both orders, the tournament for per-response objectives,
validation as strict as for scalar rewards, and P3O trained on r(a) - r(b) equal to P3O trained on r and on a
judge biased towards the first position."""
import math

import pytest
import torch

from modules.batch import Rollout
from modules.rewards import DifferenceOf, RewardError, score_pairs, tournament_scores
from tests.helpers import FirstPositionJudge, ScoreTable, tiny_rl_config
from train import cli_main


def _rollout(responses: list[str], K: int) -> Rollout:
    n = len(responses)
    ids = torch.ones(n, 3, dtype=torch.long)
    return Rollout(ids, torch.ones_like(ids), torch.ones(n, 1, dtype=torch.long), 2, K,
                   [f"p{i // K}" for i in range(n)], responses, torch.ones(n, dtype=torch.bool))


def test_every_pair_is_asked_once_and_the_matrix_is_antisymmetric():
    """K = 3, one prompt: pairs (0,1), (0,2), (1,2) in one call; M[a, b] = f(a, b), M[b, a] = -f(a, b)."""
    reward = ScoreTable({"x": 0.5, "y": 2.0, "z": -1.0})
    M, replaced, agreement = score_pairs(reward, _rollout(["x", "y", "z"], 3))
    assert replaced == 0 and agreement is None and len(reward.calls) == 1
    assert reward.calls[0][1:] == (["x", "x", "y"], ["y", "z", "z"])
    assert torch.allclose(M, torch.tensor([[0.0, -1.5, 1.5], [1.5, 0.0, 3.0], [-1.5, -3.0, 0.0]]))


def test_a_reward_not_declared_antisymmetric_is_asked_in_both_orders_and_its_position_bias_cancels():
    """The docstring's judge, at K = 3: f = s(a) - s(b) + 2 with s = (x 0.5, y 2.0, z -1.0). One call asks the 3
    pairs, then the 3 reversed. M is the unbiased matrix: M[x, y] = ((0.5 - 2 + 2) - (2 - 0.5 + 2)) / 2 = -1.5.
    Agreement: (x, y) 0.5 and 3.5, both > 0: no; (x, z) 3.5 and 0.5: no; (y, z) 5 and -1: yes. So 1/3."""
    reward = ScoreTable({"x": 0.5, "y": 2.0, "z": -1.0}, bias=2.0)
    M, replaced, agreement = score_pairs(reward, _rollout(["x", "y", "z"], 3))
    assert replaced == 0 and len(reward.calls) == 1
    assert reward.calls[0][1:] == (["x", "x", "y", "y", "z", "z"], ["y", "z", "z", "x", "x", "y"])
    assert torch.allclose(M, torch.tensor([[0.0, -1.5, 1.5], [1.5, 0.0, 3.0], [-1.5, -3.0, 0.0]]))
    assert agreement == pytest.approx(1 / 3)
    K2 = ScoreTable({"x": 0.5, "y": 2.0}, bias=1.0)                                      # the docstring's K = 2 example
    M, _, agreement = score_pairs(K2, _rollout(["x", "y"], 2))
    assert torch.allclose(M, torch.tensor([[0.0, -1.5], [1.5, 0.0]])) and agreement == 1.0


def test_tournament_is_the_win_fraction():
    """The docstring's example, and K = 3: mean of sigmoid over the 2 opponents."""
    M = torch.tensor([[0.0, -1.5], [1.5, 0.0]])
    assert torch.allclose(tournament_scores(M, 2), torch.tensor([0.1824, 0.8176]), atol=1e-4)
    M3 = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [(s(1) + s(2)) / 2, (s(-1) + s(0)) / 2, (s(-2) + s(0)) / 2]
    assert torch.allclose(tournament_scores(M3, 3), torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("broken, bias, message", [
    ("count", 0.0, r"returned 1 values for 3 pairs"),
    ("nan", 0.0, r"returned nan for pair 2 of 3 \(prompt 'p0', a 'y', b 'z'\)"),
    ("count", 1.0, r"returned 1 values for 6 pairs; .*asked in both orders"),
    ("nan", 1.0, r"returned nan for pair 2 of 6 \(prompt 'p0', a 'y', b 'z'\)")])
def test_a_bad_pairwise_reward_is_named_with_the_pair(broken, bias, message):
    with pytest.raises(RewardError, match=message):
        score_pairs(ScoreTable({"x": 0.0, "y": 1.0, "z": 2.0}, broken, bias), _rollout(["x", "y", "z"], 3))


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_p3o_on_a_pairwise_difference_equals_p3o_on_the_scalar_reward(tmp_path, sft_dir, k):
    """P3O (K = 2, and K = 4: all 6 pairs of a group) with f(x, a, b) = r(a) - r(b) (`DifferenceOf(GoldReward)`)
    takes the updates it takes with r: the same weights at the end within float rounding (r(a) - r(b) is rounded
    once instead of twice)."""
    gold = {"class_path": "datamodules.task.GoldReward"}
    runs = {}
    for name, reward in (("scalar", gold), ("pairwise", {"class_path": "modules.rewards.DifferenceOf",
                                                         "init_args": {"reward": gold}})):
        cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name=f"{name}.yaml",
                                                          model={"reward": reward, "objective": {"init_args": {"k": k}}})])
        assert cli.model.objective.responses_per_prompt == k
        runs[name] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
        if name == "pairwise":
            assert isinstance(cli.model.reward, DifferenceOf)
            assert "train/pair_reward_abs" in cli.trainer.callback_metrics
    assert (runs["scalar"] - runs["pairwise"]).abs().max() < 1e-5


@pytest.mark.slow
def test_p3o_on_a_judge_biased_to_the_first_position_trains_as_on_the_unbiased_one(tmp_path, sft_dir, caplog):
    """A judge f(a, b) = r(a) - r(b) + 3 (`tests.helpers.FirstPositionJudge`, not declared antisymmetric) is asked
    in both orders, so P3O on it takes the updates P3O takes on r(a) - r(b) (`DifferenceOf`): the same weights
    within float rounding, and `train/pair_order_agreement` logged. Asked once, every pair's Delta would be off by
    3 in favour of the first response. The gold reward is in [-1, 1], so the bias outweighs every difference: the
    two orders never agree, which a warning says once."""
    gold = {"class_path": "datamodules.task.GoldReward"}
    runs, metrics = {}, {}
    for name, reward in (("unbiased", {"class_path": "modules.rewards.DifferenceOf", "init_args": {"reward": gold}}),
                         ("judge", {"class_path": "tests.helpers.FirstPositionJudge", "init_args": {"bias": 3.0}})):
        cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name=f"{name}.yaml",
                                                          model={"reward": reward})])
        runs[name] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
        metrics[name] = cli.trainer.callback_metrics
    assert isinstance(cli.model.reward, FirstPositionJudge)
    assert (runs["unbiased"] - runs["judge"]).abs().max() < 1e-5
    assert "train/pair_order_agreement" not in metrics["unbiased"]
    assert float(metrics["judge"]["train/pair_order_agreement"]) == 0.0
    warnings = [r.getMessage() for r in caplog.records if "asked in both orders, it named" in r.getMessage()]
    assert warnings == ["pairwise reward tests.helpers.FirstPositionJudge: asked in both orders, it named the same "
                        "winner for 0% of this rollout's pairs (one answering at random would for half): its verdicts follow "
                        "the position more than the responses, and what is left after the bias cancels is small "
                        "(train/pair_order_agreement, train/pair_reward_abs)"]


@pytest.mark.parametrize("soft", [False, True])
def test_online_dpo_reads_the_pair_reward_as_the_reward_difference(soft):
    """OnlineDPO given M = [[0, r1 - r2], [r2 - r1, 0]] per pair has the loss it has with rewards (r1, r2)."""
    from modules.objectives.dpo import OnlineDPO
    from tests.test_objectives import make_input

    rewards = [1.0, 0.0, 0.2, 0.9]
    plain = make_input([-1.0, -2.0, -0.5, -3.0], ref=[-1.2, -1.5, -0.5, -2.0], rewards=rewards)
    paired = make_input([-1.0, -2.0, -0.5, -3.0], ref=[-1.2, -1.5, -0.5, -2.0], rewards=[0.5] * 4)
    paired.pair_rewards = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -0.7], [0.7, 0.0]])
    dpo = OnlineDPO(beta=0.1, soft_labels=soft)
    assert torch.allclose(dpo(plain).loss, dpo(paired).loss, atol=1e-6)


def test_rloo_trains_on_the_tournament_of_a_pairwise_reward(tmp_path, sft_dir, monkeypatch):
    """An objective that needs per-response scores (RLOO, K = 2) trains on a pairwise reward through the
    tournament: the rollout's rewards are win fractions sigmoid(f) in (0, 1), each pair's summing to 1."""
    gold = {"class_path": "datamodules.task.GoldReward"}
    reward = {"class_path": "modules.rewards.DifferenceOf", "init_args": {"reward": gold}}
    seen = []
    from modules.rl import RLModule

    original = RLModule.make_rollout

    def recording(self, batch):
        roll = original(self, batch)
        seen.append(roll.rewards.clone())
        return roll

    monkeypatch.setattr(RLModule, "make_rollout", recording)
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, source="configs/quickstart/rloo.yaml",
                                                      model={"reward": reward})])
    assert "train/loss" in cli.trainer.callback_metrics and seen
    for r in seen:
        assert ((r > 0) & (r < 1)).all() and torch.allclose(r.view(-1, 2).sum(-1), torch.ones(len(r) // 2))


def test_the_docs_pairwise_reward_example_scores_every_pair():
    """docs/relative.md's example class, as written, is a pairwise reward the RL module can ask."""
    from pathlib import Path

    code = Path("docs/relative.md").read_text().split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code, scope)
    reward = scope["ShorterIsBetter"]()
    assert reward.antisymmetric
    M, _, _ = score_pairs(reward, _rollout(["a b c", "a", "a b"], 3))
    torch.testing.assert_close(M, torch.tensor([[0.0, -0.2, -0.1], [0.2, 0.0, 0.1], [0.1, -0.1, 0.0]]))
