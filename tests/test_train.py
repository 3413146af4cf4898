"""train.py: what a user reads on the console and in TensorBoard (one x-axis for train/* and val/*)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_rl_config, tiny_stage_config
from train import cli_main


def test_train_and_val_metrics_share_one_x_axis_in_tensorboard(tmp_path, sft_dir):
    """4 rollouts, evaluation every rollout: train/* of rollout b is logged at step b (b = 0..3) and val/* after b
    rollouts at step b (0 = before training .. 4 = the end), one x-axis (rollouts), not optimizer steps (0..16)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


    config = tiny_rl_config(tmp_path, sft_dir)
    data = yaml.safe_load(Path(config).read_text())
    for cb in data["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"]["every_n_batches"] = 1
    Path(config).write_text(yaml.safe_dump(data))
    cli = cli_main(["fit", "--config", config])
    assert cli.trainer.global_step == 16
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731
    assert steps("train/reward") == [0, 1, 2, 3]
    assert steps("val/kl") == [0, 1, 2, 3, 4]
    assert steps("val/gold_reward") == [0, 1, 2, 3, 4]
    assert steps("perf/peak_memory_gb") == [0, 1, 2, 3] and events.Scalars("perf/peak_memory_gb")[-1].value > 0.1


@pytest.mark.slow
def test_stage_output_keeps_to_what_a_user_reads(tmp_path, sft_dir):
    """The reward stage builds a scorer from a causal-LM export (a fresh head: transformers' LOAD REPORT table)
    and checkpoints (Lightning's weights_only line); none of that noise, nor the litlogger advert, reaches the
    console, while the stage's own report does."""
    config = tiny_stage_config(tmp_path, "reward", sft_dir, "reward.yaml",
                               [{"class_path": "callbacks.reward_report.RewardReport"}])
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[reward report] label_accuracy=" in out
    for noise in ("LOAD REPORT", "litlogger", "weights_only", "Loading weights", "Writing model shards",
                  "module(s) in eval mode", "LeafSpec"):
        assert noise not in out, noise
