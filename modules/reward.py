"""Deprecated alias of `modules.reward_model` (the reward-model stage), kept so that configs written before the
rename still run: `class_path: modules.reward.RewardModule` now warns and loads `modules.reward_model.RewardModule`.
Reward *sources* for RL live in `modules.rewards`. This alias goes in 0.3.0."""
import warnings

from modules.reward_model import RewardModule, read_last_token_when_pad_is_eos  # noqa: F401

warnings.warn("modules.reward was renamed modules.reward_model (the alias goes in 0.3.0): write class_path: "
              "modules.reward_model.RewardModule",
              FutureWarning, stacklevel=2)
