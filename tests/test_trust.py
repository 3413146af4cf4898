"""Runs either do what they say or stop and say why: rewards checked where they enter, non-finite
numbers never reach the weights, checkpoints on a cadence that fires, exact mid-epoch resume (also after
SIGKILL, on 2 processes under FSDP2, and after Ctrl-C)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from modules.backbone import build_causal_lm, save_pretrained
from modules.batch import Rollout
from modules.rewards import RewardError, check
from modules.rl import NonFiniteError
from tests.helpers import tiny_rl_config, tiny_stage_config
from train import cli_main


def rollout_of(n: int) -> Rollout:
    return Rollout(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3, dtype=torch.long),
                   response_mask=torch.ones(n, 1, dtype=torch.long), prompt_length=2, group_size=2,
                   prompts=[f"prompt {i}" for i in range(n)], responses=[f"response {i}" for i in range(n)],
                   has_eos=torch.ones(n, dtype=torch.bool))


class Scorer:
    pass


@pytest.mark.parametrize("values, message", [
    ([0.1, float("nan"), 0.3, float("inf")], r"reward \S*Scorer returned nan for response 1 of 4 \(prompt 'prompt 1', "
                                             r"response 'response 1'\) and 1 more non-finite"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], r"returned 5 values for 4 responses; expected one number per response"),
    ([0.1, 0.2, 0.3], r"returned 3 values for 4 responses"),
    ([[0.1], [0.2], [0.3], [0.4]], r"returned shape \(4, 1\) for 4 responses"),
    (["good", "bad", "ok", "fine"], r"not a sequence of numbers"),
])
def test_reward_check_rejects_what_is_not_one_finite_number_per_response(values, message):
    with pytest.raises(RewardError, match=message):
        check(values, Scorer(), rollout_of(4))


def test_reward_check_replaces_non_finite_rewards_by_the_chosen_penalty():
    rewards, replaced = check([0.1, float("nan"), float("-inf"), 0.4], Scorer(), rollout_of(4), nonfinite=-2.0)
    assert replaced == 2 and torch.equal(rewards, torch.tensor([0.1, -2.0, -2.0, 0.4]))


@pytest.mark.parametrize("mode, message", [("nan", "returned nan for response 1"), ("inf", "returned inf"),
                                           ("extra", "returned 9 values for 8 responses"),
                                           ("short", "returned 7 values for 8 responses")])
@pytest.mark.slow
def test_a_bad_reward_callable_stops_the_run_before_any_update(tmp_path, sft_dir, mode, message):
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "tests.helpers.BadReward",
                                                                 "init_args": {"mode": mode}}})
    with pytest.raises(RewardError, match="tests.helpers.BadReward " + message):
        cli_main(["fit", "--config", config])


def test_nonfinite_reward_penalty_is_applied_and_counted(tmp_path, sft_dir):
    config = tiny_rl_config(tmp_path, sft_dir, model={"nonfinite_reward": -1.0, "reward": {
        "class_path": "tests.helpers.BadReward", "init_args": {"mode": "nan"}}})
    cli = cli_main(["fit", "--config", config])
    assert cli.trainer.callback_metrics["train/nonfinite_rewards"] == 1.0   # one per rollout (response 1)
    assert all(torch.isfinite(p).all() for p in cli.model.policy.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("mode, what", [("loss", "non-finite loss"), ("grad", "non-finite gradient norm")])
def test_a_nonfinite_update_stops_before_the_step_keeping_the_last_good_checkpoint(tmp_path, sft_dir, mode, what):
    """Rollout 2 (the third) breaks: the run raises before that rollout's first optimizer step; last.ckpt, written
    after every rollout, holds the finite state after rollout 1; the export is never written."""
    export = tmp_path / "export"
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"dirpath": str(tmp_path / "ckpt"), "every_n_batches": 1},
                            extra_callbacks=[{"class_path": "tests.helpers.BreakAfter", "init_args": {"at": 2, "mode": mode}},
                                             {"class_path": "callbacks.export.HFExport", "init_args": {"dirpath": str(export)}}])
    with pytest.raises(NonFiniteError, match=f"P3O: {what} .* at rollout 2, epoch 0, minibatch 0; the optimizer step "
                                             "was skipped"):
        cli_main(["fit", "--config", config])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 * 2 * 2          # 2 rollouts x 2 epochs x 2 minibatches
    policy = {k: v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    assert policy and all(torch.isfinite(v).all() for v in policy.values())
    assert not export.exists()


def test_an_export_never_writes_nonfinite_weights(tiny_spec, tokenizer, tmp_path):
    model = build_causal_lm(tiny_spec, tokenizer)
    with torch.no_grad():
        model.lm_head.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="parameter 'lm_head.weight' holds NaN or inf; nothing was written"):
        save_pretrained(model, tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_rl_checkpoints_fire_every_n_rollouts_and_at_the_end(tmp_path, sft_dir):
    """4 rollouts of 4 optimizer steps each: a global_step cadence of 3 would fire at step 3, 6, ... never on a
    rollout boundary; every_n_batches: 3 saves after rollout 3, then once more when training ends."""
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"every_n_batches": 3},
                            extra_callbacks=[{"class_path": "tests.helpers.RecordingCheckpoint"}])
    cli = cli_main(["fit", "--config", config])
    recorder = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RecordingCheckpoint")
    assert recorder.saves == [3, 4]
    assert next((tmp_path / "runs").rglob("checkpoints/last.ckpt")).exists()


def _run(config: str, *args: str, expect: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config, *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]


def _digest(path: Path, rank: int = 0) -> dict:
    return torch.load(f"{path}.rank{rank}.pt")


def _resume_case(tmp_path, sft_dir, devices: int, interrupt: str, stage: str = "rl", strategy="ddp"):
    """Uninterrupted: 2 epochs of R rollouts (SFT / reward stages: R training batches). Interrupted when rollout
    R + 1 (the second of the second epoch) starts: SIGKILL dies at once, leaving last.ckpt of the rollout before
    (saved after every rollout); SIGINT finishes that rollout, saves and exits 130. Resumed from last.ckpt: bit-equal
    weights, and the resumed run trains on exactly the remaining batches."""
    extra = {"devices": devices, "strategy": strategy} if devices > 1 else {}
    rollouts = (4 if stage == "rl" else 8) // devices   # 16 prompts (32 records) / (4 per batch x ranks)

    def config(name, callbacks, every=1):
        checkpoint = {"dirpath": str(tmp_path / name), "every_n_batches": every}
        if stage != "rl":
            return tiny_stage_config(tmp_path, stage, sft_dir, f"{name}.yaml", callbacks, checkpoint, max_epochs=2)
        return tiny_rl_config(tmp_path, sft_dir, name=f"{name}.yaml", max_epochs=2, extra_callbacks=callbacks,
                              checkpoint=checkpoint, **extra)

    digest = lambda name: [{"class_path": "tests.helpers.ParamDigest",  # noqa: E731
                            "init_args": {"path": str(tmp_path / name)}}]
    at = rollouts + 1                             # second epoch, second batch
    _run(config("straight", digest("straight"), every=0))
    kill = [{"class_path": "tests.helpers.KillAt", "init_args": {"at": at, "signal": interrupt}}]
    # SIGKILL: dies at once (the last save was after the previous rollout); SIGINT: finishes rollout `at`, saves, stops.
    _run(config("killed", kill, every=1 if interrupt == "SIGKILL" else 0), expect=-9 if interrupt == "SIGKILL" else 130)
    last = tmp_path / "killed" / "last.ckpt"
    assert last.exists()
    loader = torch.load(last, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == [{"epoch": 1, "batches": 1 if interrupt == "SIGKILL" else 2}]    # mid-epoch
    _run(config("resumed", digest("resumed"), every=0), "--ckpt_path", str(last))
    for rank in range(devices):
        a, b = _digest(tmp_path / "straight", rank), _digest(tmp_path / "resumed", rank)
        assert not torch.equal(a["params"], a["initial"])
        assert torch.equal(a["params"], b["params"]), f"rank {rank}: resumed weights differ from the uninterrupted run"
        assert a["prompts"][-len(b["prompts"]):] == b["prompts"]      # the resumed run saw the remaining batches


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_resumes_bit_exactly(tmp_path, sft_dir):
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL")


@pytest.mark.slow
def test_ctrl_c_finishes_the_rollout_saves_and_resumes_bit_exactly(tmp_path, sft_dir):
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGINT")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sft_and_reward_stages_resume_bit_exactly_after_a_mid_epoch_sigkill(tmp_path, sft_dir, stage):
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", stage=stage)


@pytest.mark.slow
def test_sigkill_mid_epoch_resume_is_bit_exact_under_two_processes_with_fsdp2(tmp_path, sft_dir):
    """Two processes (every rank's sampling RNG and prompt shard restored, as under DDP, whose callbacks are the
    same), FSDP2: the checkpoint holds the whole weights and optimizer state gathered on rank 0; resumed, each
    rank takes its shards back."""
    _resume_case(tmp_path, sft_dir, devices=2, interrupt="SIGKILL",
                 strategy={"class_path": "modules.sharding.FSDP2Strategy"})


# Errors a user can act on.

@pytest.mark.slow
def test_a_missing_export_is_one_line_naming_the_field_and_the_command_that_makes_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/quickstart/p3o.yaml",
                           "--model.init_args.policy.pretrained=artifacts/none/sft"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("error: model.init_args.policy.pretrained: artifacts/none/sft does "
                                                    "not exist (a local directory or file was expected; hub ids look "
                                                    "like 'org/name')")
    from modules.backbone import how_to_make

    assert how_to_make("artifacts/quickstart/reward") == (" (it is the export of another stage: run `python train.py "
                                                           "fit --config configs/quickstart/reward.yaml` first)")


def test_dotted_overrides_reach_the_source_arguments():
    cli = cli_main(["--config", "configs/quickstart/sft.yaml", "--data.init_args.source.init_args.num_train=100"],
                   run=False)
    assert cli.datamodule.source.num_train == 100


def test_invalid_utf8_and_wrong_field_names_name_the_file_and_line(tmp_path):
    from datamodules.sources import DataError, FieldMap, read_file, validate_records

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b\xff", "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 \(line 2\): not valid UTF-8"):
        read_file(str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "a", "good": "b", "bad": "c"}\n')
    with pytest.raises(DataError, match=r"record 0: field 'prompt': missing \(the record has fields \['bad', 'good', "
                                        r"'question'\]; name yours with data fields"):
        validate_records(read_file(str(cols)), str(cols), FieldMap())


def test_a_bad_record_in_the_validation_tail_is_named_by_its_index_in_the_file(tmp_path, task_tokenizer_path, caplog):
    """10 records, val_fraction 0.2: records 0-7 train, 8-9 validation. The bad record is the file's record 9
    (split-relative it would be 1); with skip_invalid, a too-long prompt after a dropped record keeps its file index."""
    from datamodules.pairs import PairDataModule
    from datamodules.sources import DataError, LocalFiles

    rows = [{"prompt": "the film was", "chosen": "good", "rejected": "bad"} for _ in range(10)]
    rows[9] = {"prompt": "the film was", "chosen": "good"}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = PairDataModule(LocalFiles(str(path), val_fraction=0.2), tokenizer=task_tokenizer_path)
    with pytest.raises(DataError, match=r"data.jsonl: record 9: field 'rejected': missing"):
        dm.setup()
    rows[1] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    rows[3] = {"prompt": "word " * 40, "chosen": "good", "rejected": "bad"}
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = PairDataModule(LocalFiles(str(path), val_fraction=0.2), tokenizer=task_tokenizer_path, skip_invalid=True)
    dm.setup()
    assert len(dm.splits["train"]) == 6 and len(dm.splits["val"]) == 1
    assert "record 3: field 'prompt'" in caplog.text


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
