"""TRL's `log_metric` for reward functions: a scalar a reward logs, as `train/<name>` and `val/<name>`, its mean
over the calls and the processes (TRL 1.16's GRPOTrainer `_log_metric`)."""
import pytest

from modules.rewards import RewardError, call_text_reward, metric_means, reward_metrics
from tests.helpers import run_train, tiny_rl_config
from tests.test_rewards import _scalars
from train import cli_main


def test_metric_means_literal_example():
    """The docstring: {"a": [1, 3]} here, {"a": [5], "b": [2]} on another process -> a (1 + 3 + 5) / 3 = 3, b 2 (the
    other process's values and names stood in for by the two callables)."""
    elsewhere = {"a": [5.0], "b": [2.0]}
    names = lambda mine: sorted(set(mine) | set(elsewhere))  # noqa: E731

    def over_ranks(values, op):
        theirs = [x for name in names([]) for x in (sum(elsewhere.get(name, [])), len(elsewhere.get(name, [])))]
        return [a + b for a, b in zip(values, theirs)]

    assert metric_means({"a": [1.0, 3.0]}, over_ranks, names) == {"a": 3.0, "b": 2.0}
    assert metric_means({}, over_ranks, lambda mine: []) == {}


def test_a_reward_logs_through_log_metric_where_a_stage_collects_it():
    """Inside `reward_metrics()` a reward naming `log_metric`, or written for TRL with `**kwargs`, logs into the
    collected dict; with `keep=False` the values are dropped; outside, one requiring it is one line, one with a
    default gets None; a name that is not a string or a value that is not a number is one line."""
    def named(completions, log_metric):
        log_metric("len", float(len(completions)))
        return [0.0] * len(completions)

    def trl(completions, **kwargs):
        kwargs["log_metric"]("seen", 2)
        return [0.0] * len(completions)

    def optional(completions, log_metric=None):
        return [float(log_metric is None)] * len(completions)

    with reward_metrics() as logged:
        call_text_reward(named, ["p", "q"], ["a", "b"], {})
        call_text_reward(trl, ["p"], ["a"], {})
        call_text_reward(trl, ["p"], ["a"], {})
    assert logged == {"len": [2.0], "seen": [2.0, 2.0]}
    with reward_metrics(keep=False) as dropped:
        call_text_reward(named, ["p"], ["a"], {})
    assert dropped == {}
    with pytest.raises(RewardError, match=r"takes log_metric \(TRL's metric logger\), which only the RL module's"):
        call_text_reward(named, ["p"], ["a"], {})
    assert call_text_reward(optional, ["p"], ["a"], {}) == [1.0]

    def bad(completions, log_metric):
        log_metric("x", "high")
        return [0.0] * len(completions)

    with reward_metrics(), pytest.raises(RewardError, match=r"log_metric\('x', 'high'\): expected a number"):
        call_text_reward(bad, ["p"], ["a"], {})


def test_what_a_reward_logs_is_a_train_and_a_val_metric(tmp_path, sft_dir):
    """The tiny run with `logging_reward` as the RL reward and the evaluation's: `train/calls` and `train/rank` are
    logged (1 and 0: one process), and the evaluation's `val/calls` (the policy's samples only; not the reference's
    or the demonstrations')."""
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": "tests.helpers.logging_reward"},
                            evaluation={"reward": "tests.helpers.logging_reward"})
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/calls"]) == 1.0 and float(metrics["train/rank"]) == 0.0
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation").history[-1]
    assert evaluation["val/calls"] == 1.0 and "val/only_rank1" not in evaluation


@pytest.mark.slow
def test_under_two_processes_a_name_one_process_logs_does_not_hang_and_means_are_over_both(tmp_path, sft_dir):
    """DDP on 2 CPU processes, `logging_reward` in training and evaluation: rank 1 alone logs `only_rank1`, so the
    processes' names differ (a reduce of each process's own names would pair different metrics or wait for ever).
    `train/rank` is the mean over both processes' calls, 0.5; `train/only_rank1` rank 1's 7; the same for `val/`."""
    config = tiny_rl_config(tmp_path, sft_dir, devices=2, strategy="ddp",
                            model={"reward": "tests.helpers.logging_reward"},
                            evaluation={"reward": "tests.helpers.logging_reward"})
    run_train(config, timeout=300)
    assert _scalars(tmp_path / "runs", "train/rank") == [0.5, 0.5]
    assert _scalars(tmp_path / "runs", "train/only_rank1") == [7.0, 7.0]
    assert _scalars(tmp_path / "runs", "val/rank") == [0.5] and _scalars(tmp_path / "runs", "val/only_rank1") == [7.0]


def test_an_async_reward_logs_into_the_collector_of_its_call():
    """An `async def` reward runs on the event loop's thread, where the caller's context is not: its `log_metric` is
    bound to the collector in force at the call (two calls, both logged)."""
    from modules.rewards import awaited_all

    async def judge(completions, log_metric):
        log_metric("judged", float(len(completions)))
        return [0.0] * len(completions)

    with reward_metrics() as logged:
        awaited_all([call_text_reward(judge, ["p"], ["a"], {}), call_text_reward(judge, ["p", "q"], ["a", "b"], {})])
    assert sorted(logged["judged"]) == [1.0, 2.0]


def test_lightning_state_literal_example():
    """The docstring: 4 batches per epoch, 2 epochs, 4 optimizer steps per batch, after 5 batches (20 steps):
    global_step 20, max_steps 32, epoch 1.25; a max_steps of 24 bounds it; an unknown length is -1."""
    from types import SimpleNamespace

    from modules.rewards import lightning_state

    def trainer(batches=4, epochs=2, max_steps=-1):
        progress = SimpleNamespace(total=SimpleNamespace(processed=5, completed=5))
        loop = SimpleNamespace(_batches_that_stepped=5, batch_progress=progress)
        return SimpleNamespace(num_training_batches=batches, max_epochs=epochs, max_steps=max_steps, global_step=20,
                               current_epoch=1, is_global_zero=True, fit_loop=SimpleNamespace(epoch_loop=loop))

    state = lightning_state(trainer(), steps_per_batch=4)
    assert (state.global_step, state.max_steps, state.epoch, state.num_train_epochs) == (20, 32, 1.25, 2)
    assert lightning_state(trainer(max_steps=24), steps_per_batch=4).max_steps == 24
    assert lightning_state(trainer(batches=float("inf"), epochs=-1), steps_per_batch=4).max_steps == -1


def test_log_extra_columns_are_checked_and_collected_where_a_stage_shows_them():
    """`log_extra(column, values)`: one value per response of the call, else one line; collected in `reward_extras()`,
    dropped with `keep=False` (training: no table of samples); outside, one requiring it is one line."""
    from modules.rewards import reward_extras

    def parsed(completions, log_extra):
        log_extra("first", [c[:1] for c in completions])
        return [0.0] * len(completions)

    def short(completions, log_extra):
        log_extra("first", ["x"])
        return [0.0] * len(completions)

    with reward_extras() as columns:
        call_text_reward(parsed, ["p", "q"], ["ab", "cd"], {})
    assert columns == {"first": ["a", "c"]}
    with reward_extras(keep=False) as dropped:
        call_text_reward(parsed, ["p"], ["ab"], {})
    assert dropped == {}
    with reward_extras(), pytest.raises(RewardError, match=r"log_extra\('first', \.\.\.\): expected one value per "
                                                           r"response \(2\), got 1 values"):
        call_text_reward(short, ["p", "q"], ["ab", "cd"], {})
    with pytest.raises(RewardError, match=r"takes log_extra \(TRL's logger of extra columns\), which only the RL"):
        call_text_reward(parsed, ["p"], ["a"], {})


def extra_reward(completions, log_extra, **kwargs):
    """Test reward written for TRL: logs each completion's length as the column `chars`; scores 0."""
    log_extra("chars", [len(c) for c in completions])
    return [0.0] * len(completions)


def test_the_evaluation_and_the_rollouts_samples_show_log_extra_columns(tmp_path, sft_dir, capsys):
    """The tiny run with `extra_reward` as the RL reward and the evaluation's, showing 2 samples: each printed sample
    ends with `[chars: <its length>]`; the rollouts keep the training calls' columns (`Rollout.extras`), and
    `OnPolicyRollout log_samples: 2` shows them beside each response of `train/samples`."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": "tests.test_trl_arguments.extra_reward"},
                            evaluation={"reward": "tests.test_trl_arguments.extra_reward", "show": 2})
    derived = yaml.safe_load(open(config))
    [rollout] = [cb for cb in derived["trainer"]["callbacks"] if cb["class_path"].endswith("OnPolicyRollout")]
    rollout["init_args"] = {"log_samples": 2}
    (tmp_path / "logged.yaml").write_text(yaml.safe_dump(derived))
    cli = cli_main(["fit", "--config", str(tmp_path / "logged.yaml")])
    shown = [line for line in capsys.readouterr().out.splitlines() if " -> " in line]
    assert len(shown) == 2 and all(line.endswith("]") and "[chars: " in line for line in shown), shown
    for line in shown:
        response, chars = line.split(" -> ", 1)[1].rsplit("   [chars: ", 1)
        assert int(chars.rstrip("]")) == len(response)
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    tables = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("train/samples/text_summary")]
    assert len(tables) == 4
    for table in tables:
        rows = [row.split(" | ") for row in table.splitlines()[2:]]
        assert len(rows) == 2 and all(int(row[3].removeprefix("chars: ").rstrip(" |")) == len(row[2]) for row in rows)
