"""train.py: what a user reads on the console and in TensorBoard (one x-axis for train/* and val/*)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_env, tiny_rl_config, tiny_stage_config
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
    env = child_env()
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[reward report] label_accuracy=" in out
    for noise in ("LOAD REPORT", "litlogger", "weights_only", "Loading weights", "Writing model shards",
                  "module(s) in eval mode", "LeafSpec"):
        assert noise not in out, noise


def test_validate_of_a_checkpoint_repeats_the_fits_last_evaluation_in_lightnings_table(tmp_path, sft_dir):
    """`python train.py validate --ckpt_path ...` of an SFT run: the stage's validation loop (loss, perplexity) and
    the Evaluation callback once after it, the same numbers as the fit's final evaluation (the same prompts, seed
    and weights), each logged once. In fit, the callback keeps to its own schedule: once at the end here, not at
    the sanity check or the epoch's validation loop. Before, `validate` left the callback out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evaluation = {"class_path": "callbacks.evaluation.Evaluation",
                  "init_args": {"reward": {"class_path": "datamodules.task.GoldReward"}, "num_prompts": 8, "show": 0}}
    config = tiny_stage_config(tmp_path, "sft", sft_dir, "sft.yaml", [evaluation],
                               num_sanity_val_steps=1, limit_train_batches=2)
    fit = cli_main(["fit", "--config", config])
    fitted = [cb for cb in fit.trainer.callbacks if type(cb).__name__ == "Evaluation"][0].history
    assert [row["step"] for row in fitted] == [2]
    last = Path(fit.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    checked = cli_main(["validate", "--config", config, "--ckpt_path", str(last)])
    metrics = {k: float(v) for k, v in checked.trainer.callback_metrics.items()}
    assert {"val/loss", "val/perplexity"} < metrics.keys()
    for key in ("val/gold_reward", "val/demo_gold_reward", "val/length", "val/eos_rate"):
        assert metrics[key] == pytest.approx(fitted[-1][key], abs=1e-6), key
    events = EventAccumulator(checked.trainer.logger.log_dir)
    events.Reload()
    assert len(events.Scalars("val/gold_reward")) == 1 and len(events.Scalars("val/loss")) == 1


def test_only_fit_and_validate_are_subcommands_and_an_rl_stage_does_not_validate(tmp_path, sft_dir, capsys):
    """No stage has a test or predict step: argparse names the two there are. The RL stage evaluates during fit;
    `validate` on it says so and how to evaluate an export, in one line. Before: Lightning's traceback."""
    from train import main

    config = tiny_rl_config(tmp_path, sft_dir)
    with pytest.raises(SystemExit) as stop:
        main(["test", "--config", config])
    assert str(stop.value) == ("error: argument subcommand: invalid choice: 'test' (choose from 'fit', 'validate') "
                               "(see python train.py --help)")
    assert main(["validate", "--config", config]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    advice = ("error: validate: modules.rl.RLModule has no validation loop: it evaluates (callbacks.evaluation."
              "Evaluation) during fit, every_n_batches and at the end. To evaluate an export on its own, validate it "
              "as an SFT policy: python train.py validate --config configs/quickstart/sft.yaml ")
    assert line.startswith(advice)
    override = line[len(advice):].replace("'", "").replace("<export>", sft_dir)     # (what the shell would pass)
    evaluation = {"class_path": "callbacks.evaluation.Evaluation",
                  "init_args": {"reward": {"class_path": "datamodules.task.GoldReward"}, "num_prompts": 8, "show": 0}}
    sft = tiny_stage_config(tmp_path, "sft", sft_dir, "sft.yaml", [evaluation])   # (the quickstart SFT, shrunk)
    checked = cli_main(["validate", "--config", sft, override])
    assert checked.model.backbone.pretrained == sft_dir and "val/gold_reward" in checked.trainer.callback_metrics
