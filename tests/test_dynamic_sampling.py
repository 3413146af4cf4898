"""`RLModule(keep_groups)`: DAPO's dynamic sampling. Of each rollout's prompts, training keeps those whose
responses' rewards differ (veRL's `filter_groups`), filled with tied ones when too few differ."""
import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules import functional as F
from modules.backbone import BackboneSpec
from modules.objectives.grpo import GRPO
from modules.objectives.p3o import P3O
from modules.objectives.ppo import PPO
from modules.rewards import Composed, DifferenceOf
from modules.rl import RLModule
from modules.sampling import SamplingConfig
from tests.helpers import tiny_rl_config
from tests.test_microbatch import PROMPTS
from train import cli_main, main

TIED = {PROMPTS[0], PROMPTS[2], PROMPTS[3]}        # every response to these gets the same reward


def text_reward(prompts, responses):
    """0 for the TIED prompts; otherwise a number that differs between different texts."""
    return [0.0 if p in TIED else float(sum((i + 1) * ord(c) for i, c in enumerate(r)) % 97) for p, r in
            zip(prompts, responses)]


def test_group_and_pair_ties_literal_examples():
    """The docstrings: [1, 1, 0, 1, 0, 0], K = 2 -> [True, False, True]; pairs M, K = 2, [[0, 0], [0, 0], [0, -1.5],
    [1.5, 0]] -> [True, False]; a tie within float tolerance counts."""
    assert F.group_ties(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2).tolist() == [True, False, True]
    assert F.group_ties(torch.tensor([0.5, 0.5 + 1e-9, 0.5, 0.6]), 2).tolist() == [True, False]
    pairs = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, -1.5], [1.5, 0.0]])
    assert F.pair_ties(pairs, 2).tolist() == [True, False]


def test_kept_groups_literal_examples():
    """The docstring: informative [F, T, F, T, T]: keep 2 -> [1, 3]; 4 -> [0, 1, 3, 4] (the first tied one fills
    in); more than there are -> all, in order."""
    informative = torch.tensor([False, True, False, True, True])
    assert F.kept_groups(informative, 2).tolist() == [1, 3]
    assert F.kept_groups(informative, 4).tolist() == [0, 1, 3, 4]
    assert F.kept_groups(informative, 9).tolist() == [0, 1, 2, 3, 4]
    assert F.kept_groups(torch.tensor([False, False]), 1).tolist() == [0]


def rollout(sft_dir, tokenizer, reward, keep_groups, k=2, name="p3o"):
    objective = P3O(k=k) if name == "p3o" else GRPO(k=k)
    module = RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=reward, objective=objective,
                      sampling=SamplingConfig(max_new_tokens=8), keep_groups=keep_groups, micro_batch_tokens=None)
    module.configure_model()
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                 for t in PROMPTS])
    torch.manual_seed(0)
    return module.make_rollout(batch)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("pairwise", [False, True], ids=["scalar", "pairwise"])
def test_the_kept_groups_are_the_sampled_rollouts_informative_ones(sft_dir, tokenizer, k, pairwise):
    """6 prompts x K responses, three prompts tied by the reward. keep_groups 3: exactly the three untied groups, each
    row (ids, rewards, pi_old, pi_ref, the composed reward's terms, the record fields) the unfiltered rollout's; keep 4:
    the first tied group fills in (the kept rollout's tied_groups 1/4). A pairwise reward (`DifferenceOf` the same
    scalar one) keeps the same groups: its pairs tie where the scalar rewards do. The sampled rollout's mean reward and
    share of tied groups are logged."""
    reward = DifferenceOf(text_reward) if pairwise else Composed({"text": text_reward})
    full = rollout(sft_dir, tokenizer, reward, None, k)
    informative = [p not in TIED for p in PROMPTS]
    assert (~(F.pair_ties(full.pair_rewards, k) if pairwise else F.group_ties(full.rewards, k))).tolist() == informative
    for keep, groups in [(3, [1, 4, 5]), (4, [0, 1, 4, 5])]:
        kept = rollout(sft_dir, tokenizer, reward, keep, k)
        rows = torch.tensor([g * k + j for g in groups for j in range(k)])
        assert len(kept) == keep * k and kept.prompts == [full.prompts[i] for i in rows]
        assert torch.equal(kept.input_ids, full.input_ids[rows]) and torch.equal(kept.rewards, full.rewards[rows])
        for name in ("old_logp", "ref_logp", "entropy"):
            torch.testing.assert_close(getattr(kept, name), getattr(full, name)[rows], rtol=1e-5, atol=1e-5)
        if pairwise:
            assert torch.equal(kept.pair_rewards, full.pair_rewards[rows])
        else:
            assert torch.equal(kept.reward_terms["text"], full.reward_terms["text"][rows])
            assert F.tied_groups(kept.rewards, k).item() == (keep - 3) / keep
        assert kept.timings["train/sampled_reward"] == pytest.approx(full.rewards.mean().item())
        assert kept.timings["train/sampled_tied_groups"] == 0.5


def test_dynamic_sampling_trains_end_to_end_and_logs_what_it_sampled(tmp_path, sft_dir):
    """The tiny GRPO run sampling 4 prompts x 4 and keeping 2: every step trains on 2 groups; the sampled rollout's
    reward and tied share are logged beside the kept one's."""
    config = tiny_rl_config(tmp_path, sft_dir, source="configs/quickstart/grpo.yaml", model={"keep_groups": 2})
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert {"train/sampled_reward", "train/sampled_tied_groups", "train/tied_groups"} <= set(metrics)
    rollouts = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "OnPolicyRollout")
    assert rollouts.samples == rollouts.rollouts * 2 * 4


def test_keep_groups_settings_are_checked(tmp_path, sft_dir, task_tokenizer_path, capsys):
    """keep_groups < 1 and an objective with K = 1 (PPO) are refused at construction; keeping more prompts than a
    rollout samples is one line at the start of the run."""
    with pytest.raises(ValueError, match=r"RLModule: keep_groups=0; expected prompts >= 1, or null"):
        RLModule(None, task_tokenizer_path, reward=text_reward, objective=P3O(), keep_groups=0)
    with pytest.raises(ValueError, match=r"PPO samples 1 response per prompt \(needs K >= 2\)"):
        RLModule(None, task_tokenizer_path, reward=text_reward, objective=PPO(), keep_groups=2)
    config = tiny_rl_config(tmp_path, sft_dir, model={"keep_groups": 5})
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: RLModule: keep_groups=5 keeps more prompts per rollout than it samples (data batch_size=4); sample "
        "more (DAPO: about 3x) or keep fewer")
